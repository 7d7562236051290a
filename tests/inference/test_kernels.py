"""Every kernel computes F.linear exactly (fp32 tolerance) on awkward sparse weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsetorch.inference import KERNELS, _ext, get_kernel

CPU_KERNELS = ["dense", "bitmask", "csr", "bitmask_serial", "csr_serial", "scipy", "torch_csr"]


def _weight(out: int, inn: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    if out >= 4:
        w[1] = 0  # an empty row
        w[2] = torch.randn(inn, generator=g)  # a fully dense row
    return w


def _usable(name: str) -> None:
    k = get_kernel(name)
    if not k.available():
        pytest.skip(f"kernel {name} not available here ({_ext.extension_error()})")


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("shape", [(37, 50), (64, 16), (48, 1000), (5, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("batch", [1, 3, 8, 17, 70])
def test_matches_dense(name: str, shape: tuple[int, int], sparsity: float, batch: int) -> None:
    _usable(name)
    w = _weight(*shape, sparsity)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, shape[1], generator=g)
    b = torch.randn(shape[0], generator=g)
    k = KERNELS[name]
    packed = k.pack(w)
    for bias in (b, None):
        y = k.matmul(x, packed, bias, shape[0])
        ref = F.linear(x, w, bias)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bitmask", "csr"])
def test_all_zero_weight(name: str) -> None:
    _usable(name)
    w = torch.zeros(20, 33)
    b = torch.arange(20, dtype=torch.float32)
    k = KERNELS[name]
    y = k.matmul(torch.randn(4, 33), k.pack(w), b, 20)
    torch.testing.assert_close(y, b.expand(4, 20))


@pytest.mark.parametrize("name", ["bitmask", "csr"])
def test_large_input_dim_uses_high_column_bits(name: str) -> None:
    """Column indices >= 32768 are stored in int16 and must be read back as unsigned."""
    _usable(name)
    w = torch.zeros(3, 40000)
    w[0, 39999] = 2.0
    w[1, 32768] = -1.5
    w[2, 5] = 1.0
    x = torch.randn(2, 40000)
    k = KERNELS[name]
    torch.testing.assert_close(k.matmul(x, k.pack(w), None, 3), F.linear(x, w))


def test_packed_sizes_are_compact() -> None:
    w = _weight(64, 128, 0.9)
    nnz = int((w != 0).sum())
    csr = KERNELS["csr"].pack(w)
    assert csr["values"].numel() == nnz and csr["cols"].element_size() == 2
    bm = KERNELS["bitmask"].pack(w)
    assert bm["values"].numel() == nnz and bm["masks"].shape == (64, 8)


def test_unknown_kernel_is_a_typed_error() -> None:
    from sparsetorch.errors import MethodError

    with pytest.raises(MethodError, match="bitmask"):
        get_kernel("bitmsk")


def test_csr_refuses_too_wide_weight() -> None:
    assert KERNELS["csr"].supports(torch.zeros(2, 70000)) is not None
    assert KERNELS["bitmask"].supports(torch.zeros(2, 4, dtype=torch.float16)) is not None
