"""Fixtures of the fine-tuning tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids oversubscription (the LoRA tests
    ran 20x faster that way under load). Results do not depend on it: every check is exact or
    toleranced the same at any thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
