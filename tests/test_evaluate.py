"""Perplexity equals exp(mean NLL) computed the slow way, token by token; greedy samples."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.data.text import token_windows
from sparsetorch.errors import DataError
from sparsetorch.evaluate import generate_sample, perplexity


class CharTokenizer:
    """Characters to ids (code point mod 128); decode maps back through chr."""

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None):
        ids = [ord(c) % 128 for c in text]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def slow_reference(model, windows: torch.Tensor, score_from: int = 0) -> float:
    """Each window alone; each next token predicted from its prefix only, one forward per token
    (the tokens after position ``score_from``)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1 + score_from, w.numel()):
                logits = model(input_ids=w[None, :t]).logits[0, -1].double()
                total += -torch.log_softmax(logits, dim=-1)[w[t]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_matches_slow_reference(batch_size: int) -> None:
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 128, (3, 12), generator=g)
    ref = slow_reference(model, windows)
    got = perplexity(model, windows=windows, batch_size=batch_size, progress=False)
    assert got == pytest.approx(ref, rel=1e-5)


def test_score_from_scores_only_the_later_tokens() -> None:
    model = make_tiny_llama()
    windows = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    got = perplexity(model, windows=windows, batch_size=2, progress=False, score_from=7)
    assert got == pytest.approx(slow_reference(model, windows, score_from=7), rel=1e-5)
    assert got != pytest.approx(perplexity(model, windows=windows, progress=False), rel=1e-3)
    for bad in (-1, 11, 2.5):
        with pytest.raises(DataError, match="score_from"):
            perplexity(model, windows=windows, progress=False, score_from=bad)


def test_perplexity_is_deterministic_and_text_path_matches_windows() -> None:
    model = make_tiny_llama()
    tok = CharTokenizer()
    text = "def f(x):\n    return x * 2\n" * 10
    a = perplexity(model, tok, text, seq_len=16, max_windows=3, progress=False)
    b = perplexity(model, tok, text, seq_len=16, max_windows=3, progress=False)
    w = token_windows(tok, text, seq_len=16, max_windows=3)
    c = perplexity(model, windows=w, progress=False)
    assert a == b == c
    assert model.training is False


def test_perplexity_needs_windows_or_tokenizer() -> None:
    with pytest.raises(DataError, match="tokenizer"):
        perplexity(make_tiny_llama(), progress=False)


def test_generate_sample_is_greedy() -> None:
    model = make_tiny_llama()
    tok = CharTokenizer()
    ids = tok("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    expected = tok.decode(ids[0, 5:])
    assert generate_sample(model, tok, "hello", max_new_tokens=5) == expected
