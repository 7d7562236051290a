"""Tiny models for tests, importable as ``from tiny_models import make_tiny_llama``.

(Not ``from conftest import ...``: several conftest.py files exist, and which one Python
finds under the name ``conftest`` depends on collection order.)
"""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 128, seed: int = 0):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (needs transformers)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model
