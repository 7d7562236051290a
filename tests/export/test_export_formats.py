"""Each storage format against its definition, per dtype, bit-exact (numpy level)."""

from __future__ import annotations

import itertools
import math

import format_spec_impl as spec
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


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (5,), (3, 8), (2, 4, 3)])
def test_every_dtype_roundtrips(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 50).to(torch.int64).clamp(0, 120).to(dtype)
    formats = [Format.DENSE] if dtype == torch.bool or not shape else [Format.DENSE, Format.BITMASK, Format.CSR]
    for fmt in formats:
        a, dname = to_numpy(t)
        parts, extra = FORMATS[fmt].compress(t)
        arr, _ = FORMATS[fmt].decompress(parts, tuple(shape), dname, **extra)
        assert arr.shape == tuple(shape) and arr.dtype == a.dtype
        assert arr.tobytes() == a.tobytes(), fmt


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
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_metadata_definition(shape, nm):
    """Decoded by hand from docs/format.md (tests/export/format_spec_impl.py: LSB-first bit
    reading, lexicographic subsets, grouping along the input dim), not by the library."""
    n, m = nm
    t = nm_tensor(shape, n, m, torch.float32)
    parts, extra = FORMATS[Format.NM].compress(t, n=n, m=m)
    bits = extra["index_bits"]
    assert bits == max(1, (math.comb(m, n) - 1).bit_length())
    groups = spec._groups(list(shape), m)
    assert parts["indices"].nbytes == math.ceil(len(groups) * bits / 8)
    assert parts["indices"].dtype == np.uint8 and parts["values"].ndim == 1
    raw = parts["indices"].tobytes()
    stream = spec.lsb_bits(raw, len(raw) * 8)
    assert not any(stream[len(groups) * bits:]), "padding bits must be 0"
    subsets = spec.combinations(m, n)
    assert subsets == list(itertools.combinations(range(m), n))
    dense = t.numpy()
    vals = parts["values"].reshape(len(groups), n)
    for gi, idx in enumerate(groups):
        code = sum(stream[gi * bits + j] << j for j in range(bits))
        assert code < len(subsets)
        kept = subsets[code]
        assert np.array_equal(vals[gi], np.array([dense[idx[p]] for p in kept]))
        assert all(dense[idx[p]] == 0 for p in range(m) if p not in kept)


def test_nm_codes_for_2_4_match_the_table_in_the_spec():
    """docs/format.md lists the 2:4 codes 0:(0,1) 1:(0,2) 2:(0,3) 3:(1,2) 4:(1,3) 5:(2,3)."""
    table = {(0, 1): 0, (0, 2): 1, (0, 3): 2, (1, 2): 3, (1, 3): 4, (2, 3): 5}
    for kept, code in table.items():
        row = np.zeros((1, 8), dtype=np.float32)
        row[0, list(kept)] = [1.0, 2.0]
        row[0, 4 + kept[0]] = 3.0  # second group: positions kept[0] and the lowest free one (padding)
        parts, _ = FORMATS[Format.NM].compress(row, n=2, m=4)
        first = parts["indices"][0] & 0b111
        assert first == code, kept
        out, sup = FORMATS[Format.NM].decompress(parts, (1, 8), "float32", n=2, m=4, index_bits=3)
        assert np.array_equal(out, row)


def test_bitmask_bytes_by_hand():
    """Element i is bit i % 8 (LSB first) of byte i // 8: a big-endian bit order on both sides
    would round-trip but fail here."""
    t = np.zeros(10, dtype=np.float32)
    t[[1, 8]] = [5.0, 7.0]  # bit 1 of byte 0, bit 0 of byte 1
    parts, _ = FORMATS[Format.BITMASK].compress(t)
    assert parts["bitmask"].tolist() == [0b00000010, 0b00000001]
    assert parts["values"].tolist() == [5.0, 7.0]
    hand = {"bitmask": np.array([0b10000000, 0b00000010], dtype=np.uint8), "values": np.array([1.5, 2.5], np.float32)}
    out, sup = FORMATS[Format.BITMASK].decompress(hand, (10,), "float32")
    expect = np.zeros(10, np.float32)
    expect[[7, 9]] = [1.5, 2.5]
    assert np.array_equal(out, expect) and np.array_equal(sup, expect != 0)
    bad = dict(hand, bitmask=np.array([0, 0b00000100], dtype=np.uint8), values=np.array([1.0], np.float32))
    with pytest.raises(FormatError, match="padding bits"):  # bit 10 is past numel = 10
        FORMATS[Format.BITMASK].decompress(bad, (10,), "float32")


def test_dense_mask_keeps_kept_zeros():
    """A kept position whose value is exactly 0 stays kept (the mask is stored, not t != 0)."""
    t = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, False, True, False]])
    parts, _ = FORMATS[Format.DENSE].compress(t, mask)
    assert parts["mask"].tolist() == [0b00001011]
    out, sup = FORMATS[Format.DENSE].decompress(parts, (1, 5), "float32")
    assert np.array_equal(sup, mask.numpy()) and np.array_equal(out, t.numpy())
    parts["values"] = np.array([[0, 1, 3, 2, 0]], dtype=np.float32)  # non-zero where the mask is 0
    with pytest.raises(FormatError, match="non-zero where the mask"):
        FORMATS[Format.DENSE].decompress(parts, (1, 5), "float32")


def test_zero_dim_keeps_its_shape():
    """np.ascontiguousarray would turn a 0-d array into shape (1,): stored shape != header shape."""
    for a in (np.array(3.5, dtype=np.float32), torch.tensor(7, dtype=torch.int64)):
        parts, _ = FORMATS[Format.DENSE].compress(a)
        assert parts["values"].shape == ()
        out, _ = FORMATS[Format.DENSE].decompress(parts, (), to_numpy(a)[1])
        assert out.shape == () and float(out) == float(a)


def test_csr_zero_rows_and_1d_views():
    a = np.zeros((0, 5), dtype=np.float16)
    parts, _ = FORMATS[Format.CSR].compress(a)
    assert parts["row_ptr"].tolist() == [0] and parts["col_idx"].size == 0
    out, _ = FORMATS[Format.CSR].decompress(parts, (0, 5), "float16")
    assert out.shape == (0, 5)
    v = np.array([0, 0, 4, 0, 9], dtype=np.int32)
    parts, _ = FORMATS[Format.CSR].compress(v)
    assert parts["row_ptr"].tolist() == [0, 2] and parts["col_idx"].tolist() == [2, 4]
    with pytest.raises(FormatError, match="at least 1 dimension"):
        FORMATS[Format.CSR].decompress(parts, (), "int32")


def _csr_parts(row_ptr, col_idx, values):
    return {"row_ptr": np.array(row_ptr, np.uint8), "col_idx": np.array(col_idx, np.uint8),
            "values": np.array(values, np.float32)}


def test_csr_row_ptr_must_be_non_decreasing():
    # row_ptr [0, 3, 1, 3]: starts at 0 and ends at nnz, but row 1 would have -2 entries
    with pytest.raises(FormatError, match="row_ptr is not non-decreasing"):
        FORMATS[Format.CSR].decompress(_csr_parts([0, 3, 1, 3], [0, 1, 2], [1, 2, 3]), (3, 4), "float32")


@pytest.mark.parametrize("cols", [[2, 1], [1, 1]])
def test_csr_columns_strictly_increasing_in_a_row(cols):
    with pytest.raises(FormatError, match="not strictly increasing inside a row"):
        FORMATS[Format.CSR].decompress(_csr_parts([0, 2, 2], cols, [1, 2]), (2, 4), "float32")
    # the same column in two different rows is fine
    out, _ = FORMATS[Format.CSR].decompress(_csr_parts([0, 1, 2], [1, 1], [1, 2]), (2, 4), "float32")
    assert out.tolist() == [[0, 1, 0, 0], [0, 2, 0, 0]]


def test_nm_padding_bits_must_be_zero():
    t = nm_tensor((1, 4), 2, 4, torch.float32)  # one group: 3 bits, 5 padding bits
    parts, extra = FORMATS[Format.NM].compress(t, n=2, m=4)
    parts["indices"] = parts["indices"] | np.uint8(0b1000_0000)
    with pytest.raises(FormatError, match="padding bits"):
        FORMATS[Format.NM].decompress(parts, (1, 4), "float32", **extra)


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
