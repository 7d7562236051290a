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


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 ids (one per byte), no merges."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_hf(path, model=None):
    """Save ``model`` (default: a tiny Llama with a 256-token vocabulary) and the byte tokenizer as
    a Hugging Face folder at ``path``; return the path."""
    (model if model is not None else make_tiny_llama(vocab=256)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
