"""Turn the many accepted forms of calibration data into a list of token batches.

Accepted: a LongTensor ``[n, seq_len]`` (or 1-D, one sequence); a list of strings (tokenised
with ``tokenizer``, each truncated to ``seq_len``); an iterable of batches (dicts with
``input_ids`` and optional ``attention_mask``, or LongTensors); ``None`` with a tokenizer (the
embedded calibration windows of :func:`sparsetorch.data.calibration_windows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError, ModelError


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_len(model: nn.Module, length: int) -> None:
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ModelError(
            f"calibration sequences have {length} tokens but the model accepts at most {limit} "
            f"(config.max_position_embeddings); pass seq_len <= {limit}."
        )


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``config.vocab_size`` as a fallback), or None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and rows > 0:
        return rows
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def check_token_ids(model: nn.Module, batches: list[dict[str, Tensor]]) -> None:
    """DataError unless every calibration token id is a row of the model's embedding.

    An id ``>= vocab_size`` would fail deep inside the embedding lookup (IndexError) and a
    negative one would silently index from the end on some devices; both mean the calibration
    was tokenised for another model.
    """
    if not batches:
        return
    lo = min(int(b["input_ids"].min()) for b in batches)
    hi = max(int(b["input_ids"].max()) for b in batches)
    vocab = vocab_size(model)
    if lo < 0 or (vocab is not None and hi >= vocab):
        bound = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise DataError(
            f"calibration token ids must be in {bound} (the rows of the model's embedding), got ids from "
            f"{lo} to {hi}. Tokenise the calibration text with this model's tokenizer (or pass tokenizer=...)."
        )


def _batches_from_tensor(ids: Tensor, batch_size: int) -> list[dict[str, Tensor]]:
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]


def prepare_calibration(
    model: nn.Module,
    calibration: Any,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[dict[str, Tensor]]:
    """Return batches ``{"input_ids": [b, t], "attention_mask"?: [b, t]}`` (at most ``num_samples`` rows).

    Every token id is checked against the model's vocabulary (:func:`check_token_ids`).
    """
    for name, v, low in (("num_samples", num_samples, 1), ("seq_len", seq_len, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise DataError(f"{name} must be an integer >= {low}, got {v!r}.")
    batches = _prepare(model, calibration, tokenizer, num_samples=num_samples, seq_len=seq_len,
                       batch_size=batch_size)
    check_token_ids(model, batches)
    return batches


def _prepare(
    model: nn.Module,
    calibration: Any,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[dict[str, Tensor]]:
    """:func:`prepare_calibration` without the token id check."""
    if calibration is None:
        if tokenizer is None:
            raise DataError(
                "this method needs calibration data: pass calibration=<LongTensor [n, seq_len] | list of "
                "texts | iterable of batches>, or a tokenizer to use the embedded calibration text."
            )
        from ..data import calibration_windows

        _check_len(model, seq_len)
        calibration = calibration_windows(tokenizer, num_samples=num_samples, seq_len=seq_len)

    if isinstance(calibration, Tensor):
        ids = calibration
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise DataError(
                f"calibration tensor must be integer token ids [n, seq_len], got {tuple(ids.shape)} {ids.dtype}."
            )
        ids = ids[:num_samples].long()
        if ids.numel() == 0:
            raise DataError("calibration tensor is empty; pass at least one window of tokens.")
        _check_len(model, ids.shape[1])
        return _batches_from_tensor(ids, batch_size)

    if isinstance(calibration, str):
        calibration = [calibration]
    items = list(calibration) if isinstance(calibration, Iterable) else None
    if items is None:
        raise DataError(f"unsupported calibration data of type {type(calibration).__name__}.")
    if not items:
        raise DataError("calibration data is empty; pass at least one text or batch.")

    if all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise DataError("calibration texts need a tokenizer: pass tokenizer=...")
        _check_len(model, seq_len)
        seqs = []
        for text in items:
            if not text.strip():
                continue
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][
                :seq_len
            ]
            if ids.numel() > 0:
                seqs.append(ids)
            if len(seqs) >= num_samples:
                break
        if not seqs:
            raise DataError("calibration texts are empty (no tokens after tokenisation).")
        batches = []
        for i in range(0, len(seqs), batch_size):
            group = seqs[i : i + batch_size]
            t = max(s.numel() for s in group)
            ids = torch.zeros(len(group), t, dtype=torch.long)
            am = torch.zeros(len(group), t, dtype=torch.long)
            pad = (
                getattr(tokenizer, "pad_token_id", None)
                or getattr(tokenizer, "eos_token_id", None)
                or 0
            )
            ids.fill_(int(pad))
            for r, s in enumerate(group):  # right padding: causal attention keeps real tokens exact
                ids[r, : s.numel()] = s
                am[r, : s.numel()] = 1
            b = {"input_ids": ids}
            if bool((am == 0).any()):
                b["attention_mask"] = am
            batches.append(b)
        return batches

    batches, n = [], 0
    for x in items:
        if isinstance(x, Tensor):
            b = {"input_ids": x if x.dim() == 2 else x.unsqueeze(0)}
        elif isinstance(x, Mapping) and "input_ids" in x:
            b = {"input_ids": torch.as_tensor(x["input_ids"])}
            if b["input_ids"].dim() == 1:
                b["input_ids"] = b["input_ids"].unsqueeze(0)
            if x.get("attention_mask") is not None:
                am = torch.as_tensor(x["attention_mask"]).reshape(b["input_ids"].shape)
                if bool((am == 0).any()):
                    b["attention_mask"] = am
        else:
            raise DataError(
                f"calibration batches must be dicts with 'input_ids' or LongTensors, got {type(x).__name__}."
            )
        if b["input_ids"].numel() == 0:
            continue
        b["input_ids"] = b["input_ids"].long()
        _check_len(model, b["input_ids"].shape[1])
        room = num_samples - n
        if room <= 0:
            break
        if b["input_ids"].shape[0] > room:
            b = {k: v[:room] for k, v in b.items()}
        n += b["input_ids"].shape[0]
        batches.append(b)
    if not batches:
        raise DataError("calibration batches are empty.")
    return batches


@torch.no_grad()
def forward_batches(model: nn.Module, batches: list[dict[str, Tensor]], hooks: list[Any]) -> None:
    """Run ``model`` over ``batches`` (eval mode, no KV cache, no gradients) so that the forward
    ``hooks`` already registered on it collect statistics; the hooks are removed and the
    training mode restored afterwards, also on error."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for b in batches:
            model(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
