"""Corrupted checkpoints: a typed error (naming the tensor where one is at fault) or exactly the
original content -- never changed weights, a crash or a hang."""

from __future__ import annotations

import json
import random
import struct
import time

import format_spec_impl as spec
import numpy as np
import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import CheckpointError
from sparsetorch.errors import LimitError
from sparsetorch.export import load, load_state_dict, save
from sparsetorch.export import reader as rd

N_CASES = 1200


def small_net(dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4, bias=False), nn.Linear(4, 8)).to(dtype)
    sparsetorch.prune(net, "magnitude", 0.5, "2:4", targets=["0", "2"])
    sparsetorch.prune(net, "magnitude", 0.75, targets=["1"])
    return net


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes, *, length_delta: int = 0) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", max(len(h) + length_delta, 0)) + h + body


def edit_header(data: bytes, rng: random.Random) -> bytes:
    """Change one field of the safetensors header or of the sparsetorch header inside it."""
    st, body = split(data)
    meta = st.get("__metadata__", {})
    sp = json.loads(meta["sparsetorch"])
    keys = [k for k in st if k != "__metadata__"]
    names = list(sp["tensors"])
    choice = rng.randrange(16)
    weird = rng.choice([-1, 0, 1, 3, 7, 2**31, 2**40, 2**63, 10**30, "x", None, 1.5, [], {}, True])
    if choice == 0:  # stored entry shape
        k = rng.choice(keys)
        st[k]["shape"] = [weird] if rng.random() < 0.5 else [s + rng.choice([-1, 1]) for s in st[k]["shape"]] or [1]
    elif choice == 1:  # stored entry offsets
        k = rng.choice(keys)
        st[k]["data_offsets"][rng.randrange(2)] += rng.choice([-8, -1, 1, 8, 10**9])
    elif choice == 2:
        st[rng.choice(keys)]["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I64", "F8_E4M3", "Q"])
    elif choice == 3:
        del st[rng.choice(keys)]
    elif choice == 4:  # logical shape
        t = sp["tensors"][rng.choice(names)]
        if "shape" in t:
            t["shape"] = rng.choice([[weird], [10**9, 10**9], [], [s * 2 for s in t["shape"]], t["shape"][::-1], [0]])
    elif choice == 5:
        t = sp["tensors"][rng.choice(names)]
        t["dtype"] = rng.choice(["float16", "bfloat16", "float32", "int8", "bool", "float8", weird])
    elif choice == 6:
        t = sp["tensors"][rng.choice(names)]
        t["format"] = rng.choice(["dense", "bitmask", "csr", "n:m", "coo", weird])
    elif choice == 7:
        t = sp["tensors"][rng.choice(names)]
        t["params"] = {"n": rng.choice([0, 1, 2, 3, 4, weird]), "m": rng.choice([2, 4, 8, 300, weird]),
                       "index_bits": rng.choice([1, 2, 3, 4, 7, weird])}
    elif choice == 8:
        t = sp["tensors"][rng.choice(names)]
        if t.get("parts"):
            part = rng.choice(list(t["parts"]))
            t["parts"][part] = rng.choice([rng.choice(keys), "nope", weird])
    elif choice == 9:
        sp["format_version"] = rng.choice([0, 2, 99, -1, "1", None, 1.0])
    elif choice == 10:
        sp["tensors"][rng.choice(names)] = rng.choice([{"tied_to": rng.choice(names)}, {"tied_to": "missing"}, weird, {}])
    elif choice == 11:
        sp["tensors"][rng.choice(names)]["pattern"] = rng.choice(["2:4", "5:4", "blockx", "0:0", weird])
    elif choice == 12:
        meta["sparsetorch"] = meta["sparsetorch"][: rng.randrange(len(meta["sparsetorch"]))]
        return join(st, body)
    elif choice == 13:
        sp["tensors"] = rng.choice([[], None, {}, "x"])
    elif choice == 14:
        return join(st, body, length_delta=rng.choice([-5, -1, 1, 5, 10**12]))
    else:
        sp["format"] = rng.choice(["other", None])
    meta["sparsetorch"] = json.dumps(sp)
    return join(st, body)


def corrupt(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # random byte flips anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # flips inside the JSON header
        b = bytearray(data)
        n = struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 3)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # truncation
        return data[: rng.randrange(len(data))]
    return edit_header(data, rng)


def edit_header_resigned(data: bytes, rng: random.Random) -> bytes:
    """A header edit with the checksum recomputed (a forged or buggy writer, not damage)."""
    bad = edit_header(data, rng)
    try:
        entries, meta = spec.parse(bad)
        json.loads(meta["sparsetorch"])
    except Exception:  # noqa: BLE001 - the edit broke the container itself: nothing to re-sign
        return bad
    if "sparsetorch.sha256" in meta:
        meta = dict(meta, **{"sparsetorch.sha256": spec.checksum(meta["sparsetorch"], spec.body_of(entries))})
    return spec.build(entries, meta)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(file bytes, model, expected state, expected masks, expected patterns, numpy arrays, numpy masks)."""
    out = []
    d = tmp_path_factory.mktemp("orig")
    cases = [(torch.float32, "auto", True), (torch.float16, "csr", True), (torch.bfloat16, "bitmask", True),
             (torch.float16, "dense", True), (torch.float32, "n:m", True), (torch.float32, "auto", False)]
    for i, (dtype, fmt, checksum) in enumerate(cases):
        net = small_net(dtype)
        kw = {"targets": ["0.weight", "2.weight"]} if fmt == "n:m" else {}
        p = save(net, d / f"{i}.safetensors", format=fmt, checksum=checksum, **kw)
        sd, masks = load_state_dict(p)
        ck = rd.Checkpoint(p)
        arrays = {n: ck.get(n) for n in ck}
        out.append((p.read_bytes(), net, sd, masks, arrays))
    return out


def _has_checksum(data: bytes) -> bool:
    return "sparsetorch.sha256" in spec.parse(data)[1]


def _torch_result_is_original(path, net, sd0, masks0) -> bool:
    """Loads the file with the torch loader; True if it loaded to exactly the original, False if
    it was refused with a typed error. Anything else fails the test."""
    try:
        sd, masks = load_state_dict(path)
    except (CheckpointError, LimitError):
        return False
    assert sd.keys() == sd0.keys()
    for k in sd0:
        assert sd[k].dtype == sd0[k].dtype and torch.equal(sd[k].view(torch.uint8), sd0[k].view(torch.uint8)), k
    assert set(masks.names()) == set(masks0.names())
    for k in masks0:
        assert torch.equal(masks[k], masks0[k]) and str(masks.patterns[k]) == str(masks0.patterns[k]), k
    fresh = small_net(next(iter(sd0.values())).dtype)
    load(path, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v.view(torch.uint8), sd0[k].view(torch.uint8)), k
    return True


def _numpy_result_is_original(path, arrays0) -> bool:
    try:
        ck = rd.Checkpoint(path)
        got = {n: ck.get(n) for n in ck}
    except rd.ReadError:
        return False
    assert got.keys() == arrays0.keys()
    for k, (a, m) in arrays0.items():
        assert got[k][0].dtype == a.dtype and got[k][0].tobytes() == a.tobytes(), k
        assert (got[k][1] is None) == (m is None) and (m is None or np.array_equal(got[k][1], m)), k
    return True


def test_fuzz_corrupted_files(originals, tmp_path):
    """Damage (bit flips anywhere, JSON edits, truncation) of a checksummed file: every result is
    a typed refusal or exactly the original -- for the torch loader and for the numpy reader."""
    rng = random.Random(1234)
    path = tmp_path / "bad.safetensors"
    outcomes = {"rejected": 0, "original": 0}
    named = 0
    checksummed = [o for o in originals if _has_checksum(o[0])]
    assert len(checksummed) == len(originals) - 1
    for case in range(N_CASES):
        data, net, sd0, masks0, arrays0 = checksummed[case % len(checksummed)]
        bad = corrupt(data, rng)
        path.write_bytes(bad)
        try:
            ok_torch = _torch_result_is_original(path, net, sd0, masks0)
            ok_numpy = _numpy_result_is_original(path, arrays0)
        except AssertionError as exc:
            pytest.fail(f"case {case}: a damaged file loaded with changed content: {exc}")
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: untyped {type(exc).__name__}: {exc}")
        assert ok_torch == ok_numpy, f"case {case}: torch loader {ok_torch}, numpy reader {ok_numpy}"
        outcomes["original" if ok_torch else "rejected"] += 1
        if not ok_torch and bad != data:
            try:
                load_state_dict(path)
            except CheckpointError as exc:
                named += any(n in str(exc) for n in sd0)
            except LimitError:
                pass
    assert outcomes["rejected"] > N_CASES * 0.9, outcomes
    assert named > 50, named


@pytest.mark.parametrize("resign", [True, False])
def test_fuzz_no_crash(originals, tmp_path, resign):
    """Forged headers (checksum recomputed) and damaged files without a checksum cannot be told
    from real content; they must still give a typed error or a load -- never a crash or a hang."""
    rng = random.Random(99 if resign else 7)
    path = tmp_path / "bad.safetensors"
    pool = originals if resign else [o for o in originals if not _has_checksum(o[0])]
    assert pool
    for case in range(N_CASES // 2):
        data, net, *_ = pool[case % len(pool)]
        bad = edit_header_resigned(data, rng) if resign else corrupt(data, rng)
        path.write_bytes(bad)
        t0 = time.perf_counter()
        try:
            load_state_dict(path)
            load(path, small_net(torch.float32))
        except (CheckpointError, LimitError):
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
        try:
            rd.read(path)
        except rd.ReadError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case} (numpy reader): {type(exc).__name__}: {exc}")
        assert time.perf_counter() - t0 < 5, f"case {case} took too long"


def test_truncations_all_rejected(originals, tmp_path):
    data = originals[0][0]
    path = tmp_path / "t.safetensors"
    for cut in sorted({0, 1, 7, 8, 9, len(data) // 2, len(data) - 1} | set(range(0, len(data), max(1, len(data) // 50)))):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_state_dict(path)


def test_index_out_of_range_names_tensor(originals, tmp_path):
    """A CSR column index past the last column is caught and the tensor named (the file re-signed,
    so the check behind the checksum is reached)."""
    data = originals[1][0]  # csr

    def edit(entries):
        code, shape, raw = entries["0.weight::col_idx"]
        entries["0.weight::col_idx"] = (code, shape, bytes([200]) + raw[1:])

    src = tmp_path / "csr.safetensors"
    src.write_bytes(spec.rewrite(data, edit_entries=edit))
    with pytest.raises(CheckpointError, match=r"0\.weight: csr data is corrupt: column index 200 out of range"):
        load_state_dict(src)
    with pytest.raises(rd.ReadError, match=r"0\.weight: csr data is corrupt: column index 200"):
        rd.read(src)


@pytest.mark.parametrize("what", ["row_ptr", "col_idx"])
def test_csr_order_violations_name_tensor(originals, tmp_path, what):
    data = originals[1][0]
    entries, _ = spec.parse(data)
    rp = [int(x) for x in spec.array(entries["0.weight::row_ptr"])]
    cols = [int(x) for x in spec.array(entries["0.weight::col_idx"])]
    r = next(i for i in range(len(rp) - 1) if rp[i + 1] - rp[i] >= 2)  # a row with two entries

    def edit(e):
        if what == "row_ptr":  # row r ends before it starts; start and end stay 0 and nnz
            new = list(rp)
            new[r + 1] = new[r] - 1 if new[r] > 0 else new[r + 2] + 1
            code, shape, _ = e["0.weight::row_ptr"]
            e["0.weight::row_ptr"] = (code, shape, np.array(new, dtype=spec.ST_DTYPES[code]).tobytes())
        else:  # the two first columns of row r swapped
            new = list(cols)
            new[rp[r]], new[rp[r] + 1] = new[rp[r] + 1], new[rp[r]]
            code, shape, _ = e["0.weight::col_idx"]
            e["0.weight::col_idx"] = (code, shape, np.array(new, dtype=spec.ST_DTYPES[code]).tobytes())

    bad = tmp_path / "order.safetensors"
    bad.write_bytes(spec.rewrite(data, edit_entries=edit))
    msg = "row_ptr is not non-decreasing" if what == "row_ptr" else "column indices are not strictly increasing inside a row"
    with pytest.raises(CheckpointError, match=rf"0\.weight: csr data is corrupt: {msg}"):
        load_state_dict(bad)
    with pytest.raises(rd.ReadError, match=msg):
        rd.read(bad)


def test_missing_part_names_tensor(originals, tmp_path):
    data = originals[2][0]  # bitmask

    def edit(h):
        h["tensors"]["1.weight"]["parts"]["bitmask"] = "nope"

    path = tmp_path / "m.safetensors"
    path.write_bytes(spec.rewrite(data, edit_header=edit))
    with pytest.raises(CheckpointError, match=r"1\.weight: part 'bitmask'.*missing"):
        load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without a sparsetorch header"):
        load_state_dict(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nothing.safetensors")
