"""Sparsifier state files: no pickle, bit-exact round trip for every method, Trainer resume."""

from __future__ import annotations

import math
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from _train_helpers import TinyCNN, batches, train
from test_lifecycle import KW, make

from sparsetorch.errors import CheckpointError
from sparsetorch.statefile import flatten_state, load_state, save_state, unflatten_state
from sparsetorch.training import METHODS


def _same(a, b, where="state"):
    """Equal values of equal types; tensors equal in dtype, shape and every bit."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() and a.dtype != torch.bool else a,
                           b.reshape(-1).view(torch.uint8) if b.numel() and b.dtype != torch.bool else b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_every_method_is_covered():
    assert set(METHODS) == set(KW)


@pytest.mark.parametrize("method", sorted(KW))
def test_state_file_round_trips_every_method_bit_exactly(method, tmp_path):
    torch.manual_seed(0)
    data = batches(6, (1, 8, 8))
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = make(method)
    sp.attach(model, opt, data=data)
    train(model, opt, sp, data[:4])
    state = sp.state_dict()
    path = save_state(state, tmp_path / "sparsifier.safetensors")
    back = load_state(path)
    _same(state, back)
    with open(path, "rb") as fh:  # a safetensors file, not a pickle
        assert not fh.read(16).startswith(b"\x80")


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "imp", "nm_decay"])
def test_resume_through_the_state_file_is_identical(method, tmp_path):
    torch.manual_seed(0)
    data = batches(8, (1, 8, 8))
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = make(method)
    sp.attach(model, opt, data=data)
    train(model, opt, sp, data[:3])
    ck_model = {k: v.clone() for k, v in model.state_dict().items()}
    ck_opt = {k: v for k, v in opt.state_dict().items()}
    ck_opt = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ck_opt)
    save_state(sp.state_dict(), tmp_path / "s.safetensors")
    train(model, opt, sp, data[3:])

    torch.manual_seed(123)
    model2 = TinyCNN()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    sp2 = make(method)
    sp2.attach(model2, opt2, data=data)
    model2.load_state_dict(ck_model)
    opt2.load_state_dict(ck_opt)
    sp2.load_state_dict(load_state(tmp_path / "s.safetensors"))
    train(model2, opt2, sp2, data[3:])
    for n, m in sp.masks.items():
        assert torch.equal(m, sp2.masks[n]), n
    for (n, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p1, p2), n


def test_tree_types_round_trip():
    state = {"a": (1, 2.5, float("inf"), float("-inf"), float("nan")), "b": [None, True, "x"],
             3: {"__tensor__": "not a tensor ref"}, "t": torch.arange(6, dtype=torch.int16).reshape(2, 3)[:, 1:],
             "empty": torch.zeros(0, 4), "bool": torch.tensor([True, False])}
    tensors, tree = flatten_state(state)
    _same(state, unflatten_state(tensors, tree))


def test_unsupported_values_are_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="cannot store a set"):
        save_state({"x": {1, 2}}, tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "not_safetensors", "no_meta", "bad_ref"])
def test_corrupt_state_files_raise_checkpoint_error(tmp_path, damage):
    from safetensors.torch import save_file

    path = save_state({"m": torch.ones(3)}, tmp_path / "s.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "not_safetensors":
        path.write_bytes(b"garbage" * 10)
    elif damage == "no_meta":
        save_file({"t0": torch.ones(1)}, str(path))
    else:
        save_file({"t1": torch.ones(1)}, str(path),
                  metadata={"sparsetorch_state": '{"version": 1, "state": {"__tensor__": "t0"}}'})
    with pytest.raises(CheckpointError):
        load_state(path)


# --------------------------------------------------------------------------- Trainer callback
class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _callback_begin(sp, ckpt, model, opt):
    pytest.importorskip("transformers")
    from sparsetorch.training.hf import SparsifierCallback

    cb = SparsifierCallback(sp, resume_from=str(ckpt))
    args = SimpleNamespace(resume_from_checkpoint=None, output_dir=str(ckpt.parent))
    cb.on_train_begin(args, SimpleNamespace(max_steps=8, global_step=0), None, model=model, optimizer=opt)
    return cb


def test_crafted_legacy_checkpoint_does_not_run_code(tmp_path, mlp):
    from sparsetorch.training import get_method

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    with open(ckpt / "sparsifier.pt", "wb") as fh:
        pickle.dump({"method": "rigl", "x": _Payload(marker)}, fh)
    sp = get_method("rigl", sparsity=0.8, update_every=1, end=4)
    with pytest.raises(CheckpointError, match="refused"):
        _callback_begin(sp, ckpt, mlp, torch.optim.SGD(mlp.parameters(), lr=0.1))
    assert not marker.exists()


def test_legacy_torch_save_checkpoint_still_resumes(tmp_path, mlp):
    from sparsetorch.training import get_method

    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sp = get_method("set", sparsity=0.8, update_every=1, end=4)
    sp.attach(mlp, opt)
    train(mlp, opt, sp, batches(2))
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    torch.save(sp.state_dict(), ckpt / "sparsifier.pt")  # what older versions wrote
    sp2 = get_method("set", sparsity=0.8, update_every=1, end=4)
    from _train_helpers import tiny_mlp

    mlp2 = tiny_mlp()
    _callback_begin(sp2, ckpt, mlp2, torch.optim.SGD(mlp2.parameters(), lr=0.1))
    assert sp2.step_count == 2
    for n, m in sp.masks.items():
        assert torch.equal(m, sp2.masks[n])


def _trainer_run(out, make_sparsifier, resume=None):
    """8 Trainer steps of a small classifier (checkpoints at step 4) driven by a sparsifier."""
    transformers = pytest.importorskip("transformers")
    from torch import nn

    from sparsetorch.training.hf import SparsifierCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x, labels=None):
            logits = self.fc2(torch.relu(self.fc1(x)))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(0)
    ds = [{"x": torch.randn(8, generator=g), "labels": int(i % 2)} for i in range(32)]
    torch.manual_seed(0)
    model = Net()
    sp = make_sparsifier()
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=8, report_to=[],
        save_strategy="steps", save_steps=4, logging_strategy="no", use_cpu=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifierCallback(sp)])
    trainer.train(resume_from_checkpoint=resume)
    return model, sp


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_trainer_resume_is_bit_identical(tmp_path, method):
    from sparsetorch.training import get_method
    from sparsetorch.training.hf import STATE_FILE

    def make():
        return get_method(method, sparsity=0.75, update_every=1, drop_fraction=0.5, decay="constant", end=7)

    m1, sp1 = _trainer_run(tmp_path / "a", make)
    assert (tmp_path / "a" / "checkpoint-4" / STATE_FILE).is_file()
    assert not (tmp_path / "a" / "checkpoint-4" / "sparsifier.pt").exists()
    m2, sp2 = _trainer_run(tmp_path / "a", make, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert sp2.step_count == 8
    for n, m in sp1.masks.items():
        assert torch.equal(m, sp2.masks[n]), n
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n


def test_missing_resume_folder_is_a_typed_error(tmp_path, mlp):
    from sparsetorch.training import get_method

    sp = get_method("rigl", sparsity=0.8, update_every=1, end=4)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        _callback_begin(sp, tmp_path / "checkpoint-9", mlp, torch.optim.SGD(mlp.parameters(), lr=0.1))


@pytest.mark.parametrize("method", ["l0", "ste_gates"])
def test_trainer_resume_with_gates_on_is_bit_identical(tmp_path, method):
    """A checkpoint written while the gates are parametrizations (names ``*.parametrizations.
    weight.original`` and the gate tensors in the Trainer's model file) resumes to the same run."""
    from sparsetorch.training import get_method

    def make():
        return get_method(method, sparsity=0.75, total_steps=8, harden_at=6)

    m1, sp1 = _trainer_run(tmp_path / "a", make)
    assert sp1.hardened
    m2, sp2 = _trainer_run(tmp_path / "a", make, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert sp2.step_count == 8 and sp2.hardened
    for n, m in sp1.masks.items():
        assert torch.equal(m, sp2.masks[n]), n
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert sorted(p1) == sorted(p2) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    for n in p1:
        assert torch.equal(p1[n], p2[n]), n
