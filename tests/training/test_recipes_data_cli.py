"""Recipes build Sparsifiers with typed errors; Fashion-MNIST reader; the train CLI; the HF callback."""

import gzip
import json

import numpy as np
import pytest
import torch

from sparsetorch.errors import DataError, MethodError
from sparsetorch.recipes import load_recipe, sparsifier_from_recipe
from sparsetorch.training.rigl import RigL


def test_recipe_flat_and_sectioned(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("training:\n  method: rigl\n  sparsity: 0.9\n  allocation: erk\n  total_steps: 400\n")
    sp = sparsifier_from_recipe(p)
    assert isinstance(sp, RigL) and sp.sparsity == 0.9 and sp.end == 300
    sp2 = load_recipe("method: gmp\nsparsity: 0.5\nend: 100\n").training
    assert sp2.schedule.final == 0.5


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"method": "rigl", "sparsty": 0.9, "total_steps": 10}, "sparsity"),
        ({"method": "rigle", "sparsity": 0.9}, "rigl"),
        ({"trainin": {"method": "rigl"}}, "training"),
        ({"training": {"sparsity": 0.9}}, "method"),
    ],
)
def test_recipe_errors(recipe, match):
    with pytest.raises(MethodError, match=match):
        load_recipe(recipe)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fmnist(d, n=64):
    rng = np.random.default_rng(0)
    for split, k in (("train", n), ("t10k", n // 2)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (k, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (k,)))


def test_fashion_mnist_reader(tmp_path):
    from sparsetorch.data.fashion_mnist import load_fashion_mnist

    _fake_fmnist(tmp_path)
    x, y = load_fashion_mnist("train", tmp_path, subset=10)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(DataError, match="dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist("train", tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(DataError):
        load_fashion_mnist("train", tmp_path / "bad")


def test_train_cli_json(tmp_path):
    from sparsetorch.cli import main

    _fake_fmnist(tmp_path)
    out = tmp_path / "r.json"
    main(["train", "--method", "rigl", "--sparsity", "0.8", "--model", "mlp", "--epochs", "1",
          "--data-dir", str(tmp_path), "--json", str(out), "--compare-dense", "--no-progress",
          "--batch-size", "16", "--plot", str(tmp_path / "p.png")])
    r = json.loads(out.read_text())
    for k in ("method", "sparsity_target", "sparsity_actual", "accuracy", "accuracy_dense", "seconds", "seconds_dense"):
        assert k in r
    assert r["sparsity_actual"] == pytest.approx(0.8, abs=1e-3)
    assert (tmp_path / "p.png").stat().st_size > 0


def test_train_cli_dense_first(tmp_path):
    from sparsetorch.cli import main

    _fake_fmnist(tmp_path)
    out = tmp_path / "r.json"
    main(["train", "--method", "rigl", "--sparsity", "0.8", "--model", "mlp", "--epochs", "1", "--allocation", "uniform",
          "--dense", "first", "--data-dir", str(tmp_path), "--json", str(out), "--no-progress", "--batch-size", "16"])
    layers = json.loads(out.read_text())["layer_sparsity"]
    first, *rest = list(layers)
    assert layers[first] == 0.0
    assert all(layers[n] == pytest.approx(0.8, abs=1e-3) for n in rest)


def test_cli_unknown_method_exits_2(tmp_path):
    from sparsetorch.cli import main

    _fake_fmnist(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "rigle", "--data-dir", str(tmp_path), "--no-progress"])
    assert e.value.code == 2


def test_hf_callback_drives_sparsifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch import nn

    from sparsetorch.training import get_method
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
    sp = get_method("rigl", sparsity=0.75, update_every=2, drop_fraction=0.5, decay="constant", end=6)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, gradient_accumulation_steps=2,
    )
    model = Net()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifierCallback(sp)])
    trainer.train()
    assert sp.step_count == 8
    assert len(sp.history) > 1  # masks changed during training
    sp.masks.verify(model)
    assert sp.sparsity_actual() == pytest.approx(0.75, abs=1e-2)
