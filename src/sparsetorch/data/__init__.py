"""Embedded defaults: the pydoc text corpus (fixed protocol) and the SmolLM2 loader."""

from __future__ import annotations

from .llm import load_causal_lm, save_hf_model, smollm2_gguf_path
from .text import (
    CALIB_SAMPLES,
    EVAL_WINDOWS,
    SEQ_LEN,
    calibration_windows,
    eval_windows,
    pydoc_topics_split,
    token_windows,
)

__all__ = [
    "CALIB_SAMPLES",
    "EVAL_WINDOWS",
    "SEQ_LEN",
    "calibration_windows",
    "eval_windows",
    "load_causal_lm",
    "pydoc_topics_split",
    "save_hf_model",
    "smollm2_gguf_path",
    "token_windows",
]
