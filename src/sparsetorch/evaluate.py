"""Perplexity on the embedded evaluation text (fixed protocol) and greedy samples.

Protocol (see :mod:`sparsetorch.data.text`): the first ``max_windows`` consecutive,
non-overlapping windows of ``seq_len`` tokens of the evaluation half, tokenized without
special tokens; each window is scored on its own (no context carried over), and
``ppl = exp(mean NLL over max_windows * (seq_len - 1) predicted tokens)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.text import EVAL_WINDOWS, SEQ_LEN, pydoc_topics_split, token_windows
from .errors import DataError


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    try:
        out = model(input_ids=input_ids, use_cache=False)
    except TypeError:
        out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def window_nll(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = False,
               score_from: int = 0) -> Tensor:
    """Summed next-token NLL of each window (float64 ``[n]``), every window scored alone;
    ``score_from``: only the predictions made at positions ``score_from`` onwards (of the tokens
    after them) count, the earlier tokens serve as context."""
    from tqdm.auto import tqdm

    if windows.ndim != 2 or windows.shape[1] < 2:
        raise DataError(f"windows must be a [n, seq_len>=2] tensor of token ids, got shape {tuple(windows.shape)}.")
    if isinstance(score_from, bool) or not isinstance(score_from, int) or not 0 <= score_from < windows.shape[1] - 1:
        raise DataError(f"score_from must be a position in [0, {windows.shape[1] - 1}) of the {windows.shape[1]}-token "
                        f"windows, got {score_from!r}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    device = _device(model)
    was_training = model.training
    model.eval()
    sums = []
    try:
        with torch.no_grad():
            bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress, leave=False)
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start : start + batch_size].to(device)
                logits = _logits(model, ids)
                for i in range(ids.shape[0]):  # one window at a time: no batch-sized copies
                    nll = F.cross_entropy(logits[i, score_from:-1].float(), ids[i, score_from + 1:], reduction="none")
                    sums.append(nll.double().sum().reshape(1).cpu())
                del logits
                bar.update(ids.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    return torch.cat(sums)


def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    text: str | None = None,
    *,
    windows: Tensor | None = None,
    seq_len: int = SEQ_LEN,
    max_windows: int | None = EVAL_WINDOWS,
    batch_size: int = 4,
    progress: bool = True,
    score_from: int = 0,
) -> float:
    """Perplexity of a causal LM over fixed token windows (default: E16 of the evaluation half);
    ``score_from``: score only the tokens after that position of each window (see :func:`window_nll`)."""
    if windows is None:
        if tokenizer is None:
            raise DataError("perplexity needs either `windows` (token ids) or a `tokenizer`.")
        if text is None:
            text = pydoc_topics_split()[1]
        windows = token_windows(tokenizer, text, seq_len=seq_len, max_windows=max_windows)
    elif max_windows is not None:
        windows = windows[:max_windows]
    sums = window_nll(model, windows, batch_size=batch_size, progress=progress, score_from=score_from)
    predicted = windows.shape[0] * (windows.shape[1] - 1 - score_from)
    return math.exp(float(sums.sum()) / predicted)


def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (the new text only), to eyeball what pruning did."""
    device = _device(model)
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if hasattr(model, "generate"):
                pad = getattr(tokenizer, "pad_token_id", None)
                if pad is None:
                    pad = getattr(tokenizer, "eos_token_id", None)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            else:
                out = ids
                for _ in range(max_new_tokens):
                    nxt = _logits(model, out)[:, -1].argmax(-1, keepdim=True)
                    out = torch.cat([out, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
