"""The small fp64 MLP and per-(step, rank) batches shared by the hook and outer-loop tests."""

from __future__ import annotations

import torch
from torch import nn

STEPS = 6


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 4)).double()


def toy_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: the same on every run, different on every rank."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
