"""Shared fixtures: fixed seeds and tiny models (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama, save_tiny_hf


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama (256-token byte vocabulary) saved as a Hugging Face folder, per test module."""
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny-llama")
