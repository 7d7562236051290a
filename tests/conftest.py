"""Shared fixtures: fixed seeds and tiny models (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
