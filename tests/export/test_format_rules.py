"""The storage formats' helpers and decoders, rule by rule, against values worked out by hand.

``docs/format.md`` defines the parts; here every encoder input rule and decoder check gets one
case with its documented reason, and the small helpers (bit packing, index dtypes, grouping,
code tables) are compared with numbers computed by hand, not with their own output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetorch.export import formats as F
from sparsetorch.export.formats import FormatError

BITMASK, CSR, DENSE, NM = F.Bitmask(), F.CSR(), F.Dense(), F.NMPacked()


# --------------------------------------------------------------------------- to_numpy
@pytest.mark.parametrize("name", [n for n in F.DTYPES if n != "bfloat16"])
def test_to_numpy_names_every_numpy_dtype(name):
    a = np.zeros(3, dtype=F.DTYPES[name][0])
    got, got_name = F.to_numpy(a)
    assert got is a and got_name == name


def test_to_numpy_bf16_and_torch():
    bits = np.array([0x3F80], dtype=np.uint16)
    assert F.to_numpy(bits)[1] == "uint16"  # uint16 is uint16 unless the caller says bf16
    assert F.to_numpy(bits, "bfloat16")[1] == "bfloat16"
    with pytest.raises(FormatError, match=r"bfloat16 data must be given as uint16 bits, got float32"):
        F.to_numpy(np.zeros(2, np.float32), "bfloat16")
    with pytest.raises(FormatError, match=r"unsupported numpy dtype complex64"):
        F.to_numpy(np.zeros(2, np.complex64))
    with pytest.raises(FormatError, match=r"expected a numpy array or torch tensor, got list"):
        F.to_numpy([1.0])
    with pytest.raises(FormatError, match=r"tensor is on the meta device and has no data"):
        F.to_numpy(torch.zeros(2, device="meta"))
    with pytest.raises(FormatError, match=r"torch.sparse_coo tensors are not supported; convert it with .to_dense\(\)"):
        F.to_numpy(torch.zeros(2, 2).to_sparse())
    with pytest.raises(FormatError, match=r"unsupported tensor dtype torch.complex64"):
        F.to_numpy(torch.zeros(2, dtype=torch.complex64))
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    arr, name = F.to_numpy(t)
    assert name == "bfloat16" and arr.dtype == np.uint16 and arr.tolist() == [0x3F80, 0xC000, 0x3F00]
    nc = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: the array is its C-order copy
    arr, name = F.to_numpy(nc)
    assert name == "float32" and arr.flags.c_contiguous and arr.tolist() == [[0, 3], [1, 4], [2, 5]]
    w = torch.ones(2, requires_grad=True)
    assert F.to_numpy(w)[0].tolist() == [1.0, 1.0]  # detached


def test_contiguous_keeps_shape_and_identity():
    a = np.arange(6.0).reshape(2, 3)
    assert F.contiguous(a) is a
    t = F.contiguous(a.T)
    assert t.flags.c_contiguous and t.shape == (3, 2) and t.tolist() == a.T.tolist()
    z = F.contiguous(np.float32(3.0).reshape(()))
    assert z.shape == () and float(z) == 3.0


def test_nonzero_is_numeric():
    a = np.array([0.0, -0.0, np.nan, 1e-45, -1.0], np.float32)
    assert F.nonzero(a, "float32").tolist() == [False, False, True, True, True]
    bits = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x7FC0, 0x3F80], np.uint16)
    assert F.nonzero(bits, "bfloat16").tolist() == [False, False, True, True, True, True]
    assert F.nonzero(bits, "uint16").tolist() == [False, True, True, True, True, True]


@pytest.mark.parametrize(("value", "dtype"), [
    (0, "u1"), (255, "u1"), (256, "<u2"), (65535, "<u2"), (65536, "<u4"),
    (2**32 - 1, "<u4"), (2**32, "<u8"), (2**64 - 1, "<u8")])
def test_index_dtype_boundaries(value, dtype):
    assert F.index_dtype(value) == np.dtype(dtype)


def test_index_dtype_beyond_64_bits():
    with pytest.raises(FormatError, match=r"index 18446744073709551616 does not fit in 64 bits"):
        F.index_dtype(2**64)


# --------------------------------------------------------------------------- bit packing
def test_pack_bits_by_hand():
    # 3-bit codes 5 (101), 3 (011), 6 (110): LSB first -> bits 1,0,1, 1,1,0, 0,1,1 -> bytes
    # 0b00111101 (bits 0..7 = 1,0,1,1,1,0,0,1 read LSB first = 0x9D) then bit 8 = 1 -> 0x01
    got = F.pack_bits(np.array([5, 3, 6]), 3)
    assert got.dtype == np.uint8 and got.tolist() == [0x9D, 0x01]
    assert F.unpack_bits(got, 3, 3).tolist() == [5, 3, 6]
    # 9-bit values take the uint64 path: 511 = nine ones, 256 = bit 8 only
    got = F.pack_bits(np.array([511, 256]), 9)
    # positions 0-8 (511) and 9-17 (256: only its bit 8, at position 17) -> 0xFF, 0x01, 0b10
    assert got.tolist() == [0xFF, 0x01, 0x02]
    assert F.unpack_bits(got, 2, 9).tolist() == [511, 256]
    # 8 bits: one value per byte
    assert F.pack_bits(np.array([255, 1, 128]), 8).tolist() == [255, 1, 128]
    assert F.unpack_bits(np.array([255, 1, 128], np.uint8), 3, 8).tolist() == [255, 1, 128]
    big = F.pack_bits(np.array([2**40 + 3]), 41)
    assert F.unpack_bits(big, 1, 41).tolist() == [2**40 + 3]
    assert F.unpack_bits(F.pack_bits(np.array([1, 0, 1]), 1), 3, 1).dtype == np.int64


def test_pack_mask_by_hand():
    sup = np.array([[True, False, False, True, False], [False, False, False, False, True]])
    assert F.pack_mask(sup).tolist() == [0b00001001, 0b00000010]
    parts = {"m": F.pack_mask(sup)}
    assert F.unpack_mask(parts, "m", (2, 5)).tolist() == sup.tolist()
    with pytest.raises(FormatError, match=r"part 'm' has set padding bits past the last element"):
        F.unpack_mask({"m": np.array([0x09, 0x06], np.uint8)}, "m", (2, 5))
    with pytest.raises(FormatError, match=r"part 'm' has 1 entries, expected 2"):
        F.unpack_mask({"m": np.array([0x09], np.uint8)}, "m", (2, 5))


# --------------------------------------------------------------------------- grouping
def test_nm_groups_by_hand():
    lin = np.arange(8).reshape(2, 4)
    assert F.nm_groups(lin, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    conv = np.arange(2 * 4 * 1 * 2).reshape(2, 4, 1, 2)  # [out, in, kh, kw]
    g = F.nm_groups(conv, 4)
    # for out 0, kernel position (0, 0): in-channels 0..3 are elements 0, 2, 4, 6
    assert g.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert F.nm_ungroup(g, conv.shape).tolist() == conv.tolist()
    c3 = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    assert F.nm_ungroup(F.nm_groups(c3, 2), c3.shape).tolist() == c3.tolist()
    assert F.nm_groups(c3, 2)[0].tolist() == [0, 3]
    assert F.nm_groups(np.arange(4), 2).tolist() == [[0, 1], [2, 3]]
    assert F.nm_ungroup(np.arange(4).reshape(2, 2), (4,)).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- part checks
def test_part_checks():
    u8 = np.dtype("u1")
    with pytest.raises(FormatError, match=r"missing part 'x'"):
        F._check_part({}, "x")
    with pytest.raises(FormatError, match=r"part 'x' is not an array"):
        F._check_part({"x": [1]}, "x")
    with pytest.raises(FormatError, match=r"part 'x' must be 1-D, has shape \(1, 2\)"):
        F._check_part({"x": np.zeros((1, 2))}, "x")
    with pytest.raises(FormatError, match=r"part 'x' has dtype float64, expected uint8"):
        F._check_part({"x": np.zeros(2)}, "x", u8)
    with pytest.raises(FormatError, match=r"part 'x' has 2 entries, expected 3"):
        F._check_part({"x": np.zeros(2, u8)}, "x", u8, 3)
    ok = np.zeros(3, u8)
    assert F._check_part({"x": ok}, "x", u8, 3) is ok
    with pytest.raises(FormatError, match=r"part 'i' must be an unsigned integer array, has dtype int32"):
        F._check_index_part({"i": np.zeros(2, np.int32)}, "i")


def test_support_rules():
    a = np.array([1.0, 0.0, 2.0], np.float32)
    with pytest.raises(FormatError, match=r"mask shape \(2,\) differs from tensor shape \(3,\)"):
        BITMASK.compress(a, mask=np.ones(2, bool))
    with pytest.raises(FormatError, match=r"non-zero values where its mask says pruned; apply the mask first"):
        BITMASK.compress(a, mask=np.array([True, True, False]))
    parts, _ = BITMASK.compress(a, mask=np.array([1, 1, 1]))  # int masks are truthy masks
    assert parts["values"].tolist() == [1.0, 0.0, 2.0]
    parts, _ = BITMASK.compress(torch.tensor([1.0, 0.0, 2.0]), mask=torch.tensor([True, False, True]))
    assert parts["bitmask"].tolist() == [0b101] and parts["values"].tolist() == [1.0, 2.0]
    assert BITMASK.size(parts) == 1 + 8


# --------------------------------------------------------------------------- dense / bitmask
def test_dense_rules():
    a = np.arange(6, dtype=np.float32).reshape(2, 3).T
    parts, params = DENSE.compress(a)
    assert params == {} and set(parts) == {"values"} and parts["values"].flags.c_contiguous
    assert parts["values"].tolist() == a.tolist()
    with pytest.raises(FormatError, match=r"missing part 'values'"):
        DENSE.decompress({}, (2,), "float32")
    with pytest.raises(FormatError, match=r"dense values have shape \(3,\) and dtype float32, expected \(2,\) float32"):
        DENSE.decompress({"values": np.zeros(3, np.float32)}, (2,), "float32")
    with pytest.raises(FormatError, match=r"dense values have shape \(2,\) and dtype float64, expected \(2,\) float32"):
        DENSE.decompress({"values": np.zeros(2)}, (2,), "float32")
    v = np.array([1.0, 0.0], np.float32)
    with pytest.raises(FormatError, match=r"dense values are non-zero where the mask part says pruned"):
        DENSE.decompress({"values": v, "mask": np.array([0b10], np.uint8)}, (2,), "float32")
    out, sup = DENSE.decompress({"values": v, "mask": np.array([0b11], np.uint8)}, (2,), "float32")
    assert out is v and sup.tolist() == [True, True]
    assert DENSE.decompress({"values": v}, (2,), "float32")[1] is None


def test_bitmask_rules():
    assert not BITMASK.valid(np.array(1.0, np.float32), "float32")
    assert not BITMASK.valid(np.zeros(2, bool), "bool")
    assert BITMASK.valid(np.zeros(2, np.float32), "float32")
    with pytest.raises(FormatError, match=r"bitmask needs a non-bool tensor with at least 1 dimension, got \(\) float32"):
        BITMASK.compress(np.array(1.0, np.float32))
    with pytest.raises(FormatError, match=r"bitmask needs a non-bool tensor with at least 1 dimension, got \(2,\) bool"):
        BITMASK.compress(np.zeros(2, bool))
    out, sup = BITMASK.decompress({"bitmask": np.array([0b0110], np.uint8),
                                   "values": np.array([3.0, 4.0], np.float32)}, (2, 2), "float32")
    assert out.tolist() == [[0.0, 3.0], [4.0, 0.0]] and sup.tolist() == [[False, True], [True, False]]
    with pytest.raises(FormatError, match=r"part 'values' has 1 entries, expected 2"):
        BITMASK.decompress({"bitmask": np.array([0b0110], np.uint8),
                            "values": np.array([3.0], np.float32)}, (2, 2), "float32")


# --------------------------------------------------------------------------- csr
def test_csr_view_and_index_types():
    with pytest.raises(FormatError, match=r"csr needs a tensor with at least 1 dimension"):
        F._csr_view(())
    assert F._csr_view((5,)) == (1, 5) and F._csr_view((2, 3, 4)) == (2, 12) and F._csr_view((0, 3)) == (0, 3)
    assert not CSR.valid(np.array(1.0, np.float32), "float32") and not CSR.valid(np.zeros(2, bool), "bool")
    with pytest.raises(FormatError, match=r"csr needs a non-bool tensor with at least 1 dimension, got \(2,\) bool"):
        CSR.compress(np.zeros(2, bool))
    # 256 columns: the largest column index 255 fits u1; 257 columns need u2
    for cols, want in ((256, np.uint8), (257, np.uint16)):
        a = np.zeros((1, cols), np.float32)
        a[0, -1] = 1.0
        parts, _ = CSR.compress(a)
        assert parts["col_idx"].dtype == want and parts["col_idx"].tolist() == [cols - 1]
        assert parts["row_ptr"].dtype == np.uint8 and parts["row_ptr"].tolist() == [0, 1]
    # 256 stored values: row_ptr's last entry 256 needs u2
    parts, _ = CSR.compress(np.ones((2, 128), np.float32))
    assert parts["row_ptr"].dtype == np.uint16 and parts["row_ptr"].tolist() == [0, 128, 256]
    assert parts["col_idx"].dtype == np.uint8
    parts, _ = CSR.compress(np.zeros((0, 3), np.float32))
    assert parts["row_ptr"].tolist() == [0] and parts["col_idx"].size == 0


def _csr(row_ptr, col, vals, dt=np.uint8):
    return {"row_ptr": np.array(row_ptr, dt), "col_idx": np.array(col, dt), "values": np.array(vals, np.float32)}


def test_csr_decoder_rules():
    out, sup = CSR.decompress(_csr([0, 1, 3], [2, 0, 1], [5.0, 6.0, 7.0]), (2, 3), "float32")
    assert out.tolist() == [[0, 0, 5], [6, 7, 0]] and sup.sum() == 3
    cases = [
        (_csr([0, 1], [0], [1.0]), r"row_ptr has 2 entries, expected 3"),
        (_csr([1, 1, 1], [0], [1.0]), r"row_ptr must start at 0 and end at nnz=1, got 1\.\.1"),
        (_csr([0, 1, 2], [0], [1.0]), r"row_ptr must start at 0 and end at nnz=1, got 0\.\.2"),
        (_csr([0, 2, 1], [0], [1.0]), r"row_ptr is not non-decreasing"),
        (_csr([0, 2, 2], [0, 3], [1.0, 2.0]), r"column index 3 out of range for 3 columns"),
        (_csr([0, 2, 2], [1, 1], [1.0, 2.0]), r"column indices are not strictly increasing inside a row"),
        (_csr([0, 2, 2], [1, 0], [1.0, 2.0]), r"column indices are not strictly increasing inside a row"),
        (_csr([0, 1, 1], [0], [1.0, 2.0]), r"part 'values' has 2 entries, expected 1"),
        ({"row_ptr": np.array([0, 1, 1], np.int64), "col_idx": np.array([0], np.uint8),
          "values": np.array([1.0], np.float32)}, r"part 'row_ptr' must be an unsigned integer array"),
        ({"row_ptr": np.array([0, 2**63, 1], np.uint64), "col_idx": np.array([0], np.uint8),
          "values": np.array([1.0], np.float32)}, r"row_ptr value out of range"),
    ]
    for parts, match in cases:
        with pytest.raises(FormatError, match=match):
            CSR.decompress(parts, (2, 3), "float32")
    with pytest.raises(FormatError, match=r"row_ptr is not non-decreasing"):
        CSR.decompress(_csr([0, 2, 1, 2], [0, 1], [1.0, 2.0]), (3, 3), "float32")
    # a new row may restart at a lower column
    out, _ = CSR.decompress(_csr([0, 1, 2], [2, 0], [1.0, 2.0]), (2, 3), "float32")
    assert out.tolist() == [[0, 0, 1], [2, 0, 0]]


# --------------------------------------------------------------------------- n:m
def test_nm_tables_by_hand():
    assert F.nm_combinations(2, 4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert F.nm_combinations(1, 3).tolist() == [[0], [1], [2]]
    assert not F.nm_combinations(2, 4).flags.writeable
    lookup = F._nm_code_lookup(2, 4)
    assert lookup[0b0011] == 0 and lookup[0b1100] == 5 and lookup[0b0101] == 1 and lookup[0b0111] == -1
    assert len(lookup) == 16
    # index_bits = max(1, bit_length(C(m, n) - 1))
    for (n, m), bits in {(1, 2): 1, (2, 4): 3, (1, 4): 2, (3, 4): 2, (4, 8): 7, (8, 16): 14, (1, 16): 4}.items():
        assert F.NMPacked.index_bits(n, m) == bits, (n, m)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4), (2, 17), (True, 4), (2, 4.0), (-1, 2)])
def test_nm_bad_n_m(n, m):
    with pytest.raises(FormatError, match=r"n:m needs integers 0 < n < m <= 16, got n="):
        NM.compress(np.zeros((1, 16), np.float32), n=n, m=m)
    assert not NM.valid(np.zeros((1, 16), np.float32), "float32", n=n, m=m)


def test_nm_sixteen_is_allowed():
    a = np.zeros((1, 16), np.float32)
    a[0, 3] = 2.0
    parts, params = NM.compress(a, n=1, m=16)
    assert params == {"n": 1, "m": 16, "index_bits": 4}
    assert NM.decompress(parts, (1, 16), "float32", **params)[0].tolist() == a.tolist()


def test_nm_compress_by_hand():
    a = np.array([[0.0, 0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 2.0]], np.float32)
    parts, params = NM.compress(a)
    # group 0 keeps {2} padded with the lowest unused 0 -> (0, 2) = code 1, values [0, 5];
    # group 1 keeps {0, 3} -> code 2, values [1, 2]; codes 1, 2 in 3 bits: 001 010 -> 0b010001
    assert params == {"n": 2, "m": 4, "index_bits": 3}
    assert parts["values"].tolist() == [0.0, 5.0, 1.0, 2.0]
    assert parts["indices"].tolist() == [0b010001]
    out, sup = NM.decompress(parts, (1, 8), "float32", **params)
    assert out.tolist() == a.tolist()
    assert sup.tolist() == [[True, False, True, False, True, False, False, True]]
    assert NM.valid(a, "float32")
    assert not NM.valid(a, "float32", n=1, m=4)  # group 1 has two stored
    assert not NM.valid(np.zeros((1, 6), np.float32), "float32")  # 6 % 4
    assert not NM.valid(np.zeros(4, bool), "bool")
    assert NM.valid(a, "float32", mask=np.ones((1, 8), bool), n=3, m=4) is False
    with pytest.raises(FormatError, match=r"group 1 has 2 stored elements, more than n=1 of m=4"):
        NM.compress(a, n=1, m=4)
    with pytest.raises(FormatError, match=r"n:m with m=4 needs an input dimension divisible by 4, got shape \(1, 6\)"):
        NM.compress(np.zeros((1, 6), np.float32))


def test_nm_decoder_rules():
    parts, params = NM.compress(np.ones((1, 8), np.float32) * np.array([1, 1, 0, 0, 0, 0, 1, 1], np.float32))
    with pytest.raises(FormatError, match=r"index_bits is 4, expected 3 for 2:4"):
        NM.decompress(parts, (1, 8), "float32", n=2, m=4, index_bits=4)
    with pytest.raises(FormatError, match=r"index_bits is None, expected 3 for 2:4"):
        NM.decompress(parts, (1, 8), "float32", n=2, m=4)
    with pytest.raises(FormatError, match=r"shape \(1, 6\) has an input dimension not divisible by m=4"):
        NM.decompress(parts, (1, 6), "float32", **params)
    with pytest.raises(FormatError, match=r"shape \(\) has an input dimension not divisible by m=4"):
        NM.decompress(parts, (), "float32", **params)
    with pytest.raises(FormatError, match=r"part 'values' has 4 entries, expected 8"):
        NM.decompress(parts, (2, 8), "float32", **params)
    bad = dict(parts, indices=np.array([0b11_000_000], np.uint8))  # bits 6, 7 past the 2 codes
    with pytest.raises(FormatError, match=r"n:m indices have set padding bits past the last group code"):
        NM.decompress(bad, (1, 8), "float32", **params)
    bad = dict(parts, indices=np.array([0b000_110], np.uint8))  # code 6: there are 6 subsets (0..5)
    with pytest.raises(FormatError, match=r"n:m group code 6 out of range \(there are 6 2-of-4 subsets\)"):
        NM.decompress(bad, (1, 8), "float32", **params)
    # 8 groups x 3 bits = 24 bits: no padding to check, all codes decode
    parts8, params8 = NM.compress(np.tile(np.array([1, 0, 1, 0], np.float32), 8).reshape(2, 16))
    assert len(parts8["indices"]) == 3
    assert NM.decompress(parts8, (2, 16), "float32", **params8)[1].sum() == 16


def test_get_format_names():
    for name, cls in (("dense", F.Dense), ("bitmask", F.Bitmask), ("csr", F.CSR), ("n:m", F.NMPacked)):
        assert type(F.get_format(name)) is cls and F.get_format(F.Format(name)) is F.FORMATS[F.Format(name)]
    with pytest.raises(FormatError, match=r"unknown format 'zip'; known: dense, bitmask, csr, n:m"):
        F.get_format("zip")


def test_csr_outputs_and_bf16_zero():
    # the mask comes back as bool in the tensor's own shape, 1-D and N-D alike
    for shape in ((5,), (2, 3, 2)):
        a = np.zeros(shape, np.float32)
        a.reshape(-1)[[1, 4]] = [2.0, -3.0]
        parts, _ = CSR.compress(a)
        out, sup = CSR.decompress(parts, shape, "float32")
        assert out.shape == shape and sup.shape == shape and sup.dtype == np.bool_ and out.dtype == np.float32
        assert out.tolist() == a.tolist() and int(sup.sum()) == 2
    # bf16 bits: -0.0 (0x8000) is zero and is not stored; the dtype name must reach the support
    bits = np.array([[0x8000, 0x3F80, 0x0000, 0x4000]], np.uint16)
    parts, _ = CSR.compress(bits, dtype="bfloat16")
    assert parts["values"].tolist() == [0x3F80, 0x4000] and parts["col_idx"].tolist() == [1, 3]
    assert parts["row_ptr"].dtype == np.uint8
    out, _ = CSR.decompress(parts, (1, 4), "bfloat16")
    assert out.tolist() == [[0, 0x3F80, 0, 0x4000]]
    # uint64 index parts with small values are valid; only values beyond int64 are out of range
    ok = {"row_ptr": np.array([0, 1, 2], np.uint64), "col_idx": np.array([2, 0], np.uint64),
          "values": np.array([1.0, 2.0], np.float32)}
    assert CSR.decompress(ok, (2, 3), "float32")[0].tolist() == [[0, 0, 1], [2, 0, 0]]
    edge = dict(ok, row_ptr=np.array([0, 2**63 - 1, 2], np.uint64))
    with pytest.raises(FormatError, match=r"^row_ptr must start at 0 and end at nnz=2, got 0\.\.2$|^row_ptr is not"):
        CSR.decompress(edge, (2, 3), "float32")
    with pytest.raises(FormatError, match=r"^row_ptr value out of range$"):
        CSR.decompress(dict(ok, row_ptr=np.array([0, 2**63, 2], np.uint64)), (2, 3), "float32")
    with pytest.raises(FormatError, match=r"^csr needs a tensor with at least 1 dimension$"):
        CSR.decompress(ok, (), "float32")


def test_csr_order_check_spans_rows_and_value_dtype():
    # row 1 holds columns 2 then 1: not increasing, although it starts a new row after row 0
    with pytest.raises(FormatError, match=r"^column indices are not strictly increasing inside a row$"):
        CSR.decompress(_csr([0, 1, 3], [0, 2, 1], [1.0, 2.0, 3.0]), (2, 3), "float32")
    bad = dict(_csr([0, 1, 1], [0], [1.0]), values=np.array([1.0]))  # float64 values for a float32 tensor
    with pytest.raises(FormatError, match=r"^part 'values' has dtype float64, expected float32$"):
        CSR.decompress(bad, (2, 3), "float32")


def test_nm_valid_edges():
    one_of_four = np.array([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], np.float32)
    assert NM.valid(one_of_four, "float32", n=1, m=4)  # n = 1 is allowed
    sixteen = np.zeros((1, 16), np.float32)
    sixteen[0, 5] = 1.0
    assert NM.valid(sixteen, "float32", n=1, m=16)  # m = MAX_M is allowed
    assert NM.valid(np.array([1.0, 0.0, 0.0, 2.0], np.float32), "float32")  # 1-D tensors group too
    # bf16 -0.0 (0x8000) is zero: two real values + one -0.0 per group still fit 2:4
    bits = np.array([[0x3F80, 0x8000, 0x4000, 0x0000]], np.uint16)
    assert NM.valid(bits, "bfloat16")
    assert not NM.valid(np.array([[0x3F80, 0x3F80, 0x4000, 0x0000]], np.uint16), "bfloat16")
