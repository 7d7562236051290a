"""Every validation rule of the numpy reader, one case each (docs/format.md, "Reading safely").

Each case breaks exactly one rule of a small valid file and requires a :class:`ReadError` with
the documented reason and, where the rule is about one tensor, ``.tensor`` naming it. The values
the reader reports (decoded size, stored bytes, the default limit, bf16 widening) are checked
against numbers worked out by hand.
"""

from __future__ import annotations

import json
import struct

import format_spec_impl as spec
import numpy as np
import pytest
import torch

import sparsetorch
from sparsetorch.errors import LimitError
from sparsetorch.export import reader as rd
from sparsetorch.export import save


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    """A bitmask checkpoint of Linear(8, 8) + Linear(8, 4) at 50% (checksummed, version 2)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    sparsetorch.prune(net, "magnitude", 0.5)
    return save(net, tmp_path_factory.mktemp("b") / "s.safetensors", format="bitmask").read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _write(tmp_path, data: bytes):
    p = tmp_path / "case.safetensors"
    p.write_bytes(data)
    return p


def _raises(tmp_path, data: bytes, match: str, tensor: str | None = None, **kw):
    with pytest.raises(rd.ReadError, match=match) as exc:
        rd.Checkpoint(_write(tmp_path, data), **kw)
    assert exc.value.tensor == tensor, exc.value
    if tensor is not None:
        assert str(exc.value).startswith(f"{tensor}: ") and exc.value.reason in str(exc.value)
    return exc.value


# --------------------------------------------------------------------------- container
def _container_edit(fn):
    def edit(data):
        h, body = _split(data)
        return fn(h, body)
    return edit


def _entry(**changes):
    """Change one field of the stored entry '0.bias'."""
    def fn(h, body):
        h["0.bias"].update(changes)
        return _pack(h, body)
    return _container_edit(fn)


CONTAINER = {
    "shorter than a length": (lambda d: d[:5], r"is truncated: 5 bytes, not even a safetensors header length", None),
    "header beyond the limit": (lambda d: struct.pack("<Q", 100_000_001) + d[8:],
                                r"header of 100000001 bytes is larger than 100000000", None),
    "header beyond the file": (lambda d: struct.pack("<Q", len(d) - 7) + d[8:],
                               r"is truncated: header says \d+ header bytes but the file has \d+ after", None),
    "empty header": (lambda d: struct.pack("<Q", 0) + d[8:], r"header does not start with '\{'", None),
    "header not starting with a brace": (_container_edit(lambda h, b: _pack(b" " + json.dumps(h).encode(), b)),
                                         r"header does not start with '\{'", None),
    "header not utf-8": (_container_edit(lambda h, b: _pack(b"{\xff}", b)), r"header is not valid JSON", None),
    "header a list": (_container_edit(lambda h, b: _pack(b"[1]", b)), r"header does not start with '\{'", None),
    "metadata not strings": (_container_edit(lambda h, b: _pack({**h, "__metadata__": {"a": 1}}, b)),
                             r"__metadata__ must map strings to strings", None),
    "metadata a list": (_container_edit(lambda h, b: _pack({**h, "__metadata__": ["a"]}, b)),
                        r"__metadata__ must map strings to strings", None),
    "metadata null": (_container_edit(lambda h, b: _pack({**h, "__metadata__": None}, b)),
                      r"without a sparsetorch header \(metadata key 'sparsetorch'\)", None),
    "entry with an extra field": (_entry(extra=1), r"exactly dtype, shape and data_offsets", "0.bias"),
    "entry not an object": (_container_edit(lambda h, b: _pack({**h, "0.bias": [1]}, b)),
                            r"exactly dtype, shape and data_offsets", "0.bias"),
    "unknown dtype code": (_entry(dtype="F8"), r"unsupported dtype 'F8'", "0.bias"),
    "dtype code not a string": (_entry(dtype=5), r"unsupported dtype 5", "0.bias"),
    "negative dimension": (_entry(shape=[-8]), r"invalid shape \[-8\]", "0.bias"),
    "float dimension": (_entry(shape=[8.0]), r"invalid shape \[8\.0\]", "0.bias"),
    "bool dimension": (_entry(shape=[True]), r"invalid shape \[true\]|invalid shape \[True\]", "0.bias"),
    "17 dimensions": (_entry(shape=[1] * 17), r"invalid shape", "0.bias"),
    "shape not a list": (_entry(shape=8), r"invalid shape 8", "0.bias"),
    "three offsets": (_entry(data_offsets=[0, 32, 32]), r"invalid data_offsets \[0, 32, 32\]", "0.bias"),
    "float offsets": (_entry(data_offsets=[0.0, 32]), r"invalid data_offsets", "0.bias"),
    "offsets not a list": (_entry(data_offsets=32), r"invalid data_offsets 32", "0.bias"),
    "begin after end": (_entry(data_offsets=[32, 0]), r"invalid data_offsets \[32, 0\]", "0.bias"),
    "negative begin": (_entry(data_offsets=[-4, 28]), r"invalid data_offsets \[-4, 28\]", "0.bias"),
    "end beyond the buffer": (_entry(data_offsets=[0, 10**6]), r"lie outside the \d+-byte data buffer", "0.bias"),
    "bytes do not match the shape": (_entry(shape=[7]), r"shape \[7\] F32 needs 28 bytes, has 32", "0.bias"),
    "trailing bytes": (_container_edit(lambda h, b: _pack(h, b + b"\0" * 3)),
                       r": 3 trailing bytes after the last stored tensor", None),
}


@pytest.mark.parametrize("case", sorted(CONTAINER))
def test_container_rules(tmp_path, base, case):
    edit, match, tensor = CONTAINER[case]
    _raises(tmp_path, edit(base), match, tensor)


def test_entries_must_tile_the_buffer(tmp_path, base):
    h, body = _split(base)
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    e = h[first]["data_offsets"]
    gap = {k: (dict(v, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4])
               if k != "__metadata__" else v) for k, v in h.items()}
    _raises(tmp_path, _pack(gap, b"\0" * 4 + body), r"leaves a gap after the previous entry", first)
    h2 = json.loads(json.dumps(h))
    second = sorted((k for k in h2 if k != "__metadata__"), key=lambda k: h2[k]["data_offsets"][0])[1]
    n = h2[second]["data_offsets"][1] - h2[second]["data_offsets"][0]
    h2[second]["data_offsets"] = [e[1] - 4, e[1] - 4 + n]  # starts inside the first entry
    # the rest keep their offsets, so the buffer is now 4 bytes longer than what the entries tile
    _raises(tmp_path, _pack(h2, body), r"overlaps the previous entry", second)


# --------------------------------------------------------------------------- sparsetorch header
def _header(fn):
    return lambda d: spec.rewrite(d, edit_header=fn)


def _tensor(name, **changes):
    def fn(h):
        t = h["tensors"][name]
        for k, v in changes.items():
            if v is _DEL:
                t.pop(k, None)
            else:
                t[k] = v
    return _header(fn)


_DEL = object()


def _raw_header(text: str):
    """Replace the sparsetorch header by ``text`` (checksum recomputed over it)."""
    def edit(d):
        entries, meta = spec.parse(d)
        meta = dict(meta, sparsetorch=text)
        meta["sparsetorch.sha256"] = spec.checksum(text, spec.body_of(entries))
        return spec.build(entries, meta)
    return edit


def _entries(fn):
    return lambda d: spec.rewrite(d, edit_entries=fn)


HEADER = {
    "no sparsetorch key": (lambda d: spec.build(spec.parse(d)[0], {}),
                           r"safetensors file without a sparsetorch header", None),
    "header not json": (_raw_header("{not json"), r"the sparsetorch header is not valid JSON", None),
    "header NaN": (_raw_header('{"format": NaN}'), r"the sparsetorch header is not valid JSON", None),
    "header a list": (_raw_header("[]"), r"does not declare format 'sparsetorch-compressed'", None),
    "other format": (_header(lambda h: h.update(format="other")),
                     r"does not declare format 'sparsetorch-compressed'", None),
    "newer version": (_header(lambda h: h.update(format_version=4)),
                      r"has format_version 4, newer than the 3 this reader understands; upgrade", None),
    "version 0": (_header(lambda h: h.update(format_version=0)),
                  r"invalid format_version 0 \(an integer >= 1\)", None),
    "checksum md5": (_header(lambda h: h.update(checksum="md5")),
                     r"unknown checksum 'md5' for format_version 2", None),
    "hf_config a list": (_header(lambda h: h.update(hf_config=[])), r"header field 'hf_config' must be a JSON dict", None),
    "hf_class a number": (_header(lambda h: h.update(hf_class=1)), r"header field 'hf_class' must be a JSON str", None),
    "user_metadata a list": (_header(lambda h: h.update(user_metadata=[])),
                             r"header field 'user_metadata' must be a JSON dict", None),
    "user_metadata numbers": (_header(lambda h: h.update(user_metadata={"a": 1})),
                              r"user_metadata must map strings to strings", None),
    "no tensors": (_header(lambda h: h.pop("tensors")), r"has no 'tensors' object", None),
    "tensors a list": (_header(lambda h: h.update(tensors=[])), r"has no 'tensors' object", None),
    # one tensor's entry
    "entry not an object": (_header(lambda h: h["tensors"].update({"0.bias": 1})), r"header entry is not an object", "0.bias"),
    "masked not a bool": (_tensor("0.weight", masked=1), r"invalid masked flag 1", "0.weight"),
    "tied_to not a name": (_tensor("0.bias", tied_to=3), r"tied_to must be a tensor name, got 3", "0.bias"),
    "unknown format": (_tensor("0.weight", format="zip"),
                       r"unknown format 'zip'; known: dense, bitmask, csr, n:m", "0.weight"),
    "no format": (_tensor("0.weight", format=_DEL), r"unknown format None", "0.weight"),
    "negative shape": (_tensor("0.weight", shape=[-1, 8]), r"invalid shape \[-1, 8\]", "0.weight"),
    "bool shape": (_tensor("0.weight", shape=[True, 8]), r"invalid shape", "0.weight"),
    "shape of 17 dims": (_tensor("0.weight", shape=[1] * 17), r"invalid shape", "0.weight"),
    "no shape": (_tensor("0.weight", shape=_DEL), r"invalid shape None", "0.weight"),
    "unknown dtype": (_tensor("0.weight", dtype="float8"), r"unsupported dtype 'float8'", "0.weight"),
    "parts not strings": (_tensor("0.weight", parts={"values": 1}), r"invalid parts \{'values': 1\}", "0.weight"),
    "parts a list": (_tensor("0.weight", parts=["values"]), r"invalid parts \['values'\]", "0.weight"),
    "a part missing": (_tensor("0.weight", parts={"values": "0.weight::values"}),
                       r"bitmask needs parts \['bitmask', 'values'\], has \['values'\]", "0.weight"),
    "an unknown part": (_tensor("0.bias", parts={"values": "0.bias", "extra": "0.weight::bitmask"}),
                        r"dense needs parts \['values'\] \(optional: \['mask'\]\), has \['extra', 'values'\]", "0.bias"),
    "mask part on an unmasked tensor": (_tensor("0.bias", parts={"values": "0.bias", "mask": "0.weight::bitmask"}),
                                        r"a tensor that is not masked has a 'mask' part", "0.bias"),
    "part names a missing key": (_tensor("0.bias", parts={"values": "nope"}),
                                 r"part 'values' refers to stored tensor 'nope', which is missing", "0.bias"),
    "values of another dtype": (_tensor("0.bias", dtype="float16"),
                                r"part 'values' is stored as F32, expected F16", "0.bias"),
    "bitmask of another dtype": (_tensor("0.weight", parts={"values": "0.weight::values", "bitmask": "1.bias"}),
                                 r"part 'bitmask' is stored as F32, expected U8", "0.weight"),
    "params not ints": (_tensor("0.weight", params={"n": 1.5}), r"invalid params \{'n': 1\.5\}", "0.weight"),
    "params a list": (_tensor("0.weight", params=[]), r"invalid params \[\]", "0.weight"),
    "params for a format without": (_tensor("0.weight", params={"n": 2}),
                                    r"bitmask needs params \[\], has \['n'\]", "0.weight"),
    "pattern not a string": (_tensor("0.weight", pattern=4), r"invalid pattern 4", "0.weight"),
    # relations between tensors
    "tied to nothing": (_header(lambda h: h["tensors"].update({"lm": {"tied_to": "nope"}})),
                        r"tied_to names 'nope', which is not a stored tensor", "lm"),
    "tied to a tied tensor": (_header(lambda h: h["tensors"].update({"a": {"tied_to": "0.bias"}, "b": {"tied_to": "a"}})),
                              r"tied_to names 'a', which is not a stored tensor", "b"),
    "masked tie to unmasked": (_header(lambda h: h["tensors"].update({"lm": {"tied_to": "0.bias", "masked": True}})),
                               r"is masked but the tensor it is tied to \('0.bias'\) is not", "lm"),
    "one stored tensor in two": (_tensor("1.bias", parts={"values": "0.bias"}, shape=[8]),
                                 r"stored tensor '0.bias' is a part of both '0.bias' and '1.bias'", "1.bias"),
    "orphan stored tensor": (_header(lambda h: h["tensors"].pop("1.bias")),
                             r"stored tensor '1.bias' belongs to no tensor of the header; the file is corrupt", None),
}


@pytest.mark.parametrize("case", sorted(HEADER))
def test_header_rules(tmp_path, base, case):
    edit, match, tensor = HEADER[case]
    _raises(tmp_path, edit(base), match, tensor)


def test_tied_tensor_reads_under_both_names(tmp_path, base):
    data = _header(lambda h: h["tensors"].update({"lm": {"tied_to": "0.bias"}}))(base)
    path = _write(tmp_path, data)
    out = rd.read(path)
    assert out["lm"] is out["0.bias"]
    ck = rd.Checkpoint(path)
    assert ck.info("lm") is ck.infos["0.bias"]
    assert ck.stored_bytes("lm") == 0 and ck.stored_bytes("0.bias") == 32
    # the tie adds nothing to the decoded size
    assert ck.decoded_bytes == rd.Checkpoint(_write(tmp_path, base)).decoded_bytes


def test_bad_checksum_digest_is_refused_without_verification(tmp_path, base):
    entries, meta = spec.parse(base)
    for digest in ("A" * 64, "0" * 63, "g" * 64):
        data = spec.build(entries, dict(meta, **{"sparsetorch.sha256": digest}))
        _raises(tmp_path, data, r"is not 64 lowercase hex digits", None, verify=False)
        _raises(tmp_path, data, r"content checksum mismatch", None)  # verified first by default


def test_unverified_open_reads_a_changed_file(tmp_path, base):
    """verify=False skips only the digest comparison (the file still has to be well-formed)."""
    h, body = _split(base)
    changed = _pack(h, body[:-1] + bytes([body[-1] ^ 1]))
    path = _write(tmp_path, changed)
    with pytest.raises(rd.ReadError, match="checksum mismatch"):
        rd.Checkpoint(path)
    ck = rd.Checkpoint(path, verify=False)
    assert ck.checksummed is True
    assert rd.read_header(path, verify=False)["format_version"] == 2
    with pytest.raises(rd.ReadError, match="checksum mismatch"):
        rd.read_header(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(rd.ReadError, match=r"checkpoint .*nope\.safetensors does not exist") as e:
        rd.read(tmp_path / "nope.safetensors")
    assert e.value.tensor is None
    with pytest.raises(rd.ReadError, match=r"is a directory, not a checkpoint file"):
        rd.read(tmp_path)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(LimitError, match=r"max_bytes must be a non-negative integer number of bytes or None"):
            rd.Checkpoint(tmp_path / "nope.safetensors", max_bytes=bad)


def test_access_errors_and_values(tmp_path, base):
    path = _write(tmp_path, base)
    ck = rd.Checkpoint(path)
    assert ck.version == 2 and ck.checksummed is True and ck.header_only is False
    assert len(ck) == 4 and ck.names() == list(ck) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    with pytest.raises(rd.ReadError, match="no such tensor in the checkpoint") as e:
        ck.info("x")
    assert e.value.tensor == "x"
    with pytest.raises(rd.ReadError, match="no such tensor in the checkpoint"):
        ck.stored_bytes("x")
    with pytest.raises(rd.ReadError, match=r"no stored tensor 'x' in the file"):
        ck.raw("x")
    with pytest.raises(ValueError, match=r"bf16 must be 'bits' or 'float32', got 'f16'"):
        ck.get("0.bias", bf16="f16")
    with pytest.raises(ValueError, match=r"bf16 must be 'bits' or 'float32', got 'f16'"):
        rd.read(tmp_path / "not-opened.safetensors", bf16="f16")  # checked before the file is opened
    # sizes by hand: 0.weight bitmask = 32 values x 4 B + 8 B bitmask; decoded = every tensor's
    # elements x 4 B plus one mask byte per element of the masked ones
    assert ck.stored_bytes("0.weight") == 32 * 4 + 8 and ck.stored_bytes("1.weight") == 16 * 4 + 4
    assert ck.decoded_bytes == (8 + 64 + 4 + 32) * 4 + 64 + 32
    assert ck.limit == rd.default_limit(len(base)) == (1 << 26) + 64 * len(base)
    info = ck.info("0.weight")
    assert (info.numel, info.nbytes, info.masked, info.pattern) == (64, 256, True, "unstructured")
    raw = ck.raw("0.weight::bitmask")
    assert raw.dtype == np.uint8 and raw.shape == (8,) and not raw.flags.writeable
    arr, mask = ck.get("0.weight")
    assert arr.flags.writeable and arr.flags.owndata and mask.dtype == bool and mask.sum() == 32
    assert ck.get("0.bias")[1] is None
    hdr = rd.Checkpoint(path, header_only=True, max_bytes=0)  # no size check for the header
    with pytest.raises(rd.ReadError, match=r"opened with header_only=True; open it again to decode"):
        hdr.get("0.bias")
    with pytest.raises(rd.ReadLimitError, match=rf"decoding needs {ck.decoded_bytes} bytes, more than max_bytes = 0; "
                       rf"if you trust this file, pass max_bytes={ck.decoded_bytes}") as lim:
        rd.Checkpoint(path, max_bytes=0)
    assert (lim.value.needed, lim.value.limit) == (ck.decoded_bytes, 0)


def test_default_limit_message(tmp_path):
    header = {"format": "sparsetorch-compressed", "format_version": 2, "tensors": {"w": {
        "format": "csr", "shape": [1, 1 << 26], "dtype": "float32", "masked": True,
        "parts": {"row_ptr": "w::row_ptr", "col_idx": "w::col_idx", "values": "w::values"}}}}
    entries = {"w::row_ptr": ("U8", [2], b"\0\0"), "w::col_idx": ("U8", [0], b""), "w::values": ("F32", [0], b"")}
    path = _write(tmp_path, spec.build(entries, {"sparsetorch": json.dumps(header)}))
    with pytest.raises(rd.ReadLimitError, match=r"more than the default limit for this file \(64 MiB \+ 64x its size"):
        rd.Checkpoint(path)
    ck = rd.Checkpoint(path, header_only=True)
    assert ck.decoded_bytes == 5 * (1 << 26) and ck.checksummed is False


def test_corrupt_part_data_names_the_format(tmp_path, base):
    # a bitmask claiming more kept positions than there are values
    data = _entries(lambda e: e.update({"0.weight::bitmask": ("U8", [8], b"\xff" * 8)}))(base)
    with pytest.raises(rd.ReadError, match=r"^0\.weight: bitmask data is corrupt: ") as exc:
        rd.read(_write(tmp_path, data))
    assert exc.value.tensor == "0.weight"


def test_bf16_widening_is_exact():
    bits = np.array([0x3F80, 0xBF80, 0x0000, 0x8000, 0x7F80, 0x4049, 0x0001], dtype=np.uint16)
    got = rd.bf16_bits_to_float32(bits)
    assert got.dtype == np.float32
    want = np.array([1.0, -1.0, 0.0, -0.0, np.inf, 3.140625, 2.0**-133], dtype=np.float32)
    assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))


def test_version_1_dense_mask_is_its_nonzeros(tmp_path):
    header = {"format": "sparsetorch-compressed", "format_version": 1, "tensors": {"w": {
        "format": "dense", "shape": [2, 2], "dtype": "float32", "masked": True, "parts": {"values": "w"}}}}
    vals = np.array([[0.0, 1.5], [-0.0, 2.0]], dtype="<f4")
    path = _write(tmp_path, spec.build({"w": ("F32", [2, 2], vals.tobytes())}, {"sparsetorch": json.dumps(header)}))
    arr, mask = rd.Checkpoint(path).get("w")
    assert np.array_equal(arr, vals) and mask.tolist() == [[False, True], [False, True]]
    header["tensors"]["w"]["masked"] = False
    path = _write(tmp_path, spec.build({"w": ("F32", [2, 2], vals.tobytes())}, {"sparsetorch": json.dumps(header)}))
    assert rd.Checkpoint(path).get("w")[1] is None
