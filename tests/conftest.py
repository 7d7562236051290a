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


@pytest.fixture(scope="module")
def pruned_dir(hf_dir, tmp_path_factory):
    """``hf_dir`` pruned to 2:4 by ``sparsetorch prune --out`` (HF folder + masks.safetensors), per module."""
    from test_cli_main import run

    out = tmp_path_factory.mktemp("pruned") / "p24"
    assert run(["prune", "--model", str(hf_dir), "--pattern", "2:4", "--seq-len", "32", "--eval-windows", "0",
                "--no-table", "--out", str(out)]) == 0
    return out
