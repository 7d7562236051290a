"""Fixtures for the training tests."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import TinyCNN, tiny_mlp
from torch import nn


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return tiny_mlp()


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()
