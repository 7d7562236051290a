"""Each storage format against its definition, per dtype, bit-exact (numpy level)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sparsetorch.export.checkpoint import choose_format
from sparsetorch.export.formats import (
    FORMATS,
    Format,
    FormatError,
    NMPacked,
    get_format,
    index_dtype,
    nm_groups,
    nm_ungroup,
    to_numpy,
    unpack_bits,
)
from sparsetorch.patterns import NM, _nm_groups

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern of a float tensor (for bit-exact comparisons, NaN payloads included)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def sparse_tensor(shape, dtype, sparsity=0.6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t


def nm_tensor(shape, n, m, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    mask = NM(n, m).mask(torch.rand(shape, generator=g))
    return t.masked_fill(~mask, 0)  # +0.0 at pruned positions, as MaskSet.apply


def roundtrip(fmt: Format, t: torch.Tensor, mask=None, **params):
    a, dname = to_numpy(t)
    parts, extra = FORMATS[fmt].compress(t, mask, **params)
    arr, sup = FORMATS[fmt].decompress(parts, tuple(t.shape), dname, **extra)
    if dname == "bfloat16":
        out = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(np.ascontiguousarray(arr))
    return parts, extra, out, sup


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [Format.DENSE, Format.BITMASK, Format.CSR])
@pytest.mark.parametrize("shape", [(8, 24), (5,), (4, 6, 3, 3)])
def test_roundtrip_bit_exact(fmt, dtype, shape):
    t = sparse_tensor(shape, dtype)
    _, _, out, _ = roundtrip(fmt, t)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(bits_of(out), bits_of(t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)])
def test_nm_roundtrip_bit_exact(dtype, nm):
    n, m = nm
    t = nm_tensor((6, 32), n, m, dtype)
    parts, extra, out, sup = roundtrip(Format.NM, t, n=n, m=m)
    assert torch.equal(bits_of(out), bits_of(t))
    assert extra == {"n": n, "m": m, "index_bits": max(1, (math.comb(m, n) - 1).bit_length())}
    assert parts["values"].size == t.numel() // m * n


@pytest.mark.parametrize("fmt", [Format.BITMASK, Format.CSR, Format.NM])
def test_nan_payload_kept_and_negative_zero_becomes_positive_zero(fmt):
    bits = torch.tensor([0x7FC00001, 0, -0x80000000, 0x3F800000, 0, 0, 0x7F800001, 0], dtype=torch.int32)
    t = bits.view(torch.float32).reshape(2, 4)  # NaN with payload, +0, -0, 1.0, ..., signalling NaN
    _, _, out, _ = roundtrip(fmt, t, **({"n": 2, "m": 4} if fmt is Format.NM else {}))
    expect = bits.clone()
    expect[2] = 0  # -0.0 is a pruned position: it comes back as exact +0.0
    assert torch.equal(bits_of(out).reshape(-1), expect)


def test_negative_zero_kept_when_mask_says_kept():
    t = torch.tensor([[-0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    for fmt in (Format.BITMASK, Format.CSR):
        _, _, out, sup = roundtrip(fmt, t, mask)
        assert torch.equal(bits_of(out), bits_of(t))
        assert np.array_equal(sup, mask.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_bits_are_tensor_nonzero(dtype):
    t = sparse_tensor((7, 13), dtype)
    t[0, 0] = -0.0
    parts, _ = FORMATS[Format.BITMASK].compress(t)
    unpacked = np.unpackbits(parts["bitmask"], bitorder="little")
    numel = t.numel()
    assert parts["bitmask"].nbytes == math.ceil(numel / 8)
    assert np.array_equal(unpacked[:numel].astype(bool), (t != 0).reshape(-1).numpy())
    assert not unpacked[numel:].any()
    vals = t.reshape(-1)[t.reshape(-1) != 0]
    assert np.array_equal(parts["values"].view(np.uint8), bits_of(vals).numpy().view(np.uint8))


def test_csr_matches_definition():
    t = sparse_tensor((9, 300), torch.float16, 0.9)
    parts, _ = FORMATS[Format.CSR].compress(t)
    rows, cols = torch.nonzero(t, as_tuple=True)
    nnz = int((t != 0).sum())
    assert parts["row_ptr"].dtype == (np.uint8 if nnz <= 255 else np.uint16)
    assert parts["col_idx"].dtype == np.uint16  # 300 columns do not fit uint8
    expect_ptr = np.concatenate([[0], np.cumsum((t != 0).sum(1).numpy())])
    assert np.array_equal(parts["row_ptr"].astype(np.int64), expect_ptr)
    assert np.array_equal(parts["col_idx"].astype(np.int64), cols.numpy())
    assert np.array_equal(parts["values"], t[rows, cols].numpy())


def test_index_dtype_smallest():
    assert index_dtype(255) == np.uint8 and index_dtype(256) == np.uint16
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.uint32
    assert index_dtype(2**32) == np.uint64


@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3), (16,)])
def test_nm_metadata_definition(shape):
    """Group codes name n distinct in-group indices < m; the values sit at exactly those indices."""
    n, m = 2, 4
    t = nm_tensor(shape, n, m, torch.float32)
    parts, extra = FORMATS[Format.NM].compress(t, n=n, m=m)
    bits = extra["index_bits"]
    assert bits == 3  # C(4, 2) = 6 subsets fit in 3 bits (vs 4 for a bitmask)
    groups = _nm_groups(t, m).reshape(-1, m)  # the library's own grouping along the input dim
    g = groups.shape[0]
    assert parts["indices"].nbytes == math.ceil(g * bits / 8)
    codes = unpack_bits(parts["indices"], g, bits)
    subsets = list(itertools.combinations(range(m), n))
    assert codes.max() < len(subsets)
    vals = parts["values"].reshape(g, n)
    for gi in range(g):
        idx = subsets[codes[gi]]
        assert len(set(idx)) == n and all(0 <= i < m for i in idx)
        assert np.array_equal(vals[gi], groups[gi, list(idx)].numpy())
        rest = [i for i in range(m) if i not in idx]
        assert (groups[gi, rest] == 0).all()


def test_nm_grouping_matches_patterns():
    t = torch.arange(2 * 8 * 3 * 3).reshape(2, 8, 3, 3)
    ours = nm_groups(t.numpy(), 4)
    assert np.array_equal(ours, _nm_groups(t, 4).reshape(-1, 4).numpy())
    assert np.array_equal(nm_ungroup(ours, tuple(t.shape)), t.numpy())


def test_nm_pads_groups_with_fewer_than_n():
    t = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    parts, extra, out, sup = roundtrip(Format.NM, t, n=2, m=4)
    assert torch.equal(out, t)
    assert sup.sum() == 4  # two stored positions per group, zeros as padding


def test_nm_rejects_too_many_per_group():
    t = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    with pytest.raises(FormatError, match="more than n=2"):
        FORMATS[Format.NM].compress(t, n=2, m=4)
    assert not NMPacked().valid(t.numpy(), "float32", n=2, m=4)


def test_mask_must_cover_nonzeros():
    t = torch.tensor([[1.0, 2.0]])
    with pytest.raises(FormatError, match="apply the mask"):
        FORMATS[Format.BITMASK].compress(t, torch.tensor([[True, False]]))


def test_get_format_unknown():
    assert get_format("csr") is FORMATS[Format.CSR]
    with pytest.raises(FormatError, match="unknown format"):
        get_format("coo")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["s50", "s90", "s10", "nm24", "nm48", "dense"])
def test_auto_picks_smallest_encoded(case, dtype):
    """auto's choice is the smallest of the actually encoded valid formats, and its size estimate is exact."""
    if case.startswith("nm"):
        n, m = int(case[2]), int(case[3])
        t = nm_tensor((16, 64), n, m, dtype)
    elif case == "dense":
        t = torch.randn(16, 64).to(dtype)
    else:
        t = sparse_tensor((16, 64), dtype, int(case[1:]) / 100)
    fmt, params, sizes = choose_format(t)
    actual = {}
    for f in (Format.DENSE, Format.BITMASK, Format.CSR):
        actual[f] = sum(p.nbytes for p in FORMATS[f].compress(t)[0].values())
    for m in (4, 8, 16):
        counts = _nm_groups(t != 0, m).sum(-1)
        n = max(int(counts.max()), 1)
        if n < m:
            size = sum(p.nbytes for p in FORMATS[Format.NM].compress(t, n=n, m=m)[0].values())
            actual[Format.NM] = min(actual.get(Format.NM, size), size)
    assert sizes == actual
    assert actual[fmt] == min(actual.values())
    if case.startswith("nm"):
        assert fmt is Format.NM and (params["n"], params["m"]) == (int(case[2]), int(case[3]))
    if case == "dense":
        assert fmt is Format.DENSE
