"""Corrupted checkpoints: CheckpointError (naming the tensor where one is at fault), never a crash or hang."""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import CheckpointError
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


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    out = []
    d = tmp_path_factory.mktemp("orig")
    for i, (dtype, fmt) in enumerate([(torch.float32, "auto"), (torch.float16, "csr"), (torch.bfloat16, "bitmask"),
                                      (torch.float16, "dense")]):
        net = small_net(dtype)
        p = save(net, d / f"{i}.safetensors", format=fmt)
        out.append((p.read_bytes(), net))
    return out


def test_fuzz_corrupted_files(originals, tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "bad.safetensors"
    outcomes = {"error": 0, "loaded": 0}
    named = 0
    start = time.perf_counter()
    for case in range(N_CASES):
        data, net = originals[case % len(originals)]
        bad = corrupt(data, rng)
        path.write_bytes(bad)
        t0 = time.perf_counter()
        try:
            sd, masks = load_state_dict(path)
            load(path, net)  # may also be a CheckpointError (shape/name mismatch)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            outcomes["error"] += 1
            named += any(n in str(exc) for n in net.state_dict())
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
        try:
            rd.read(path)
        except rd.ReadError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case} (numpy reader): {type(exc).__name__}: {exc}")
        assert time.perf_counter() - t0 < 5, f"case {case} took too long"
    assert outcomes["error"] > N_CASES // 2, outcomes
    assert named > 100, named
    assert time.perf_counter() - start < 60


def test_truncations_all_rejected(originals, tmp_path):
    data, _ = originals[0]
    path = tmp_path / "t.safetensors"
    for cut in sorted({0, 1, 7, 8, 9, len(data) // 2, len(data) - 1} | set(range(0, len(data), max(1, len(data) // 50)))):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_state_dict(path)


def test_index_out_of_range_names_tensor(originals, tmp_path):
    """A CSR column index past the last column is caught and the tensor named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    data, _ = originals[1]  # csr
    src = tmp_path / "csr.safetensors"
    src.write_bytes(data)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = "0.weight::col_idx"
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 200
    save_file(tensors, str(src), metadata=meta)
    with pytest.raises(CheckpointError, match=r"0\.weight: csr data is corrupt: column index 200 out of range"):
        load_state_dict(src)


def test_missing_part_names_tensor(originals, tmp_path):
    data, _ = originals[2]
    st, body = split(data)
    del st["1.weight::bitmask"]
    path = tmp_path / "m.safetensors"
    path.write_bytes(join(st, body))
    with pytest.raises(CheckpointError, match=r"1\.weight: part 'bitmask'.*missing"):
        load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without a sparsetorch header"):
        load_state_dict(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nothing.safetensors")
