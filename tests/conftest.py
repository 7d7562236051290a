"""Shared fixtures: fixed seeds and tiny models (no downloads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
