"""The embedded text protocol: deterministic split of sorted pydoc topics, exact windows."""

from __future__ import annotations

import pytest
import torch

from sparsetorch.data.text import (
    calibration_windows,
    eval_windows,
    pydoc_topics_split,
    token_windows,
)
from sparsetorch.errors import DataError


class CharTokenizer:
    """One token per character (code point mod 1000); adds BOS=999 only with special tokens."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % 999 for c in text]
        return {"input_ids": ([999] if add_special_tokens else []) + ids}


def test_split_is_sorted_halves_joined_by_blank_lines() -> None:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    calib, evaluation = pydoc_topics_split()
    assert calib == "\n\n".join(topics[k] for k in keys[:half])
    assert evaluation == "\n\n".join(topics[k] for k in keys[half:])
    assert calib.startswith(topics[keys[0]]) and evaluation.startswith(topics[keys[half]])
    assert pydoc_topics_split() == (calib, evaluation)  # deterministic


def test_windows_are_consecutive_non_overlapping_and_exact() -> None:
    tok = CharTokenizer()
    text = "abcdefghij" * 10 + "xyz"  # 103 characters
    w = token_windows(tok, text, seq_len=10)
    ids = [ord(c) % 999 for c in text]
    assert w.dtype == torch.long and w.shape == (10, 10)  # remainder of 3 dropped
    for i in range(10):
        assert w[i].tolist() == ids[i * 10 : (i + 1) * 10]
    assert 999 not in w  # no special tokens
    assert token_windows(tok, text, seq_len=10, max_windows=4).tolist() == w[:4].tolist()


def test_calibration_and_eval_windows_come_from_their_halves() -> None:
    tok = CharTokenizer()
    calib, evaluation = pydoc_topics_split()
    c = calibration_windows(tok, num_samples=3, seq_len=64)
    e = eval_windows(tok, num_windows=2, seq_len=64)
    assert c.shape == (3, 64) and e.shape == (2, 64)
    assert c.flatten().tolist() == [ord(ch) % 999 for ch in calib[: 3 * 64]]
    assert e.flatten().tolist() == [ord(ch) % 999 for ch in evaluation[: 2 * 64]]


def test_fewer_windows_than_requested_warns() -> None:
    tok = CharTokenizer()
    n_all = len(pydoc_topics_split()[1]) // 50_000
    with pytest.warns(UserWarning, match="windows"):
        w = eval_windows(tok, num_windows=n_all + 5, seq_len=50_000)
    assert w.shape == (n_all, 50_000)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_a_data_error(text: str) -> None:
    with pytest.raises(DataError, match="empty"):
        token_windows(CharTokenizer(), text, seq_len=4)


def test_text_shorter_than_one_window_is_a_data_error() -> None:
    with pytest.raises(DataError, match="too short"):
        token_windows(CharTokenizer(), "short text", seq_len=512)
