"""The embedded text corpus and its fixed windowing protocol.

Every perplexity and calibration number sparsetorch reports uses this protocol, so numbers
can be compared across versions and against other tools. Do not change it silently.

* Corpus: the Python standard library's ``pydoc_data.topics.topics`` (a dict of help
  topics shipped with CPython, no download).
* Split: sort the topic keys; the **calibration** half is the values of the first
  ``len(keys) // 2`` keys, the **evaluation** half the values of the remaining keys; each
  half is the values joined with a blank line (``"\\n\\n"``).
* Tokenization: the whole half is tokenized once, **without special tokens** (no BOS/EOS).
* Windows: consecutive, non-overlapping slices of ``seq_len`` tokens (default 512) from the
  start; the incomplete remainder is dropped.
* Calibration uses the first ``num_samples`` windows (default 64) of the calibration half.
* Evaluation uses the first ``num_windows`` windows (default 16, "E16") of the evaluation
  half; each window is scored on its own and perplexity is
  ``exp(mean NLL over num_windows * (seq_len - 1) predicted tokens)``
  (see :func:`sparsetorch.evaluate.perplexity`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError

SEQ_LEN = 512
CALIB_SAMPLES = 64
EVAL_WINDOWS = 16


def pydoc_topics_split() -> tuple[str, str]:
    """Return ``(calibration_text, evaluation_text)`` from stdlib ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - stripped-down Python builds
        raise DataError(
            "the stdlib module pydoc_data.topics is missing from this Python; "
            "install the full Python standard library (e.g. Debian package libpython3-stdlib)."
        ) from exc
    keys = sorted(topics)
    half = len(keys) // 2
    calib = "\n\n".join(topics[k] for k in keys[:half])
    evaluation = "\n\n".join(topics[k] for k in keys[half:])
    return calib, evaluation


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    try:
        out = tokenizer(text, add_special_tokens=False)
        ids = out["input_ids"] if not isinstance(out, list) else out
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if ids and isinstance(ids[0], list):  # batched output of a single string
        ids = ids[0]
    return [int(i) for i in ids]


def token_windows(
    tokenizer: Any, text: str, seq_len: int = SEQ_LEN, max_windows: int | None = None
) -> Tensor:
    """Tokenize ``text`` once (no special tokens); return consecutive windows ``[n, seq_len]``."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}.")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1, got {max_windows}.")
    if not text or not text.strip():
        raise DataError("the text is empty; pass a non-empty text (or use the default corpus).")
    import logging

    # HF tokenizers warn when the text is longer than the model context; windows handle that.
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        ids = _encode(tokenizer, text)
    finally:
        log.setLevel(level)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, too short for one window of {seq_len} tokens; "
            "pass a longer text or a smaller seq_len."
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _windows(tokenizer: Any, text: str, count: int, seq_len: int, what: str) -> Tensor:
    if count < 1:
        raise DataError(f"{what} must be at least 1, got {count}.")
    w = token_windows(tokenizer, text, seq_len=seq_len, max_windows=count)
    if w.shape[0] < count:
        warnings.warn(
            f"only {w.shape[0]} windows of {seq_len} tokens are available, fewer than the "
            f"requested {what}={count}; using {w.shape[0]}.",
            stacklevel=3,
        )
    return w


def calibration_windows(
    tokenizer: Any, num_samples: int = CALIB_SAMPLES, seq_len: int = SEQ_LEN
) -> Tensor:
    """First ``num_samples`` windows of the calibration half, LongTensor ``[n, seq_len]``."""
    return _windows(tokenizer, pydoc_topics_split()[0], num_samples, seq_len, "num_samples")


def eval_windows(tokenizer: Any, num_windows: int = EVAL_WINDOWS, seq_len: int = SEQ_LEN) -> Tensor:
    """First ``num_windows`` windows of the evaluation half, LongTensor ``[n, seq_len]``."""
    return _windows(tokenizer, pydoc_topics_split()[1], num_windows, seq_len, "num_windows")
