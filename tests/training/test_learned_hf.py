"""The learned methods through the Hugging Face ``Trainer`` callback (data for the ones that read
training data at attach goes through ``SparsifierCallback(..., data=...)``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetorch.training import get_method


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        logits = self.fc2(torch.relu(self.fc1(x)))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("method,kw,needs_data", [
    ("group_lasso", {"lam": 1e-2, "harden_at": 6}, False),
    ("ste_gates", {"harden_at": 6, "ramp_end": 4}, False),
    ("hypersparse", {"art_every": 1, "probe_batches": 2, "warmup": 2, "harden_at": 6}, True),
    ("random_search", {"trials": 2, "proxy_steps": 2, "val_batches": 2, "inner_args": {"update_every": 2}}, True),
])
def test_trainer_callback(tmp_path, method: str, kw: dict, needs_data: bool) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    from sparsetorch.training.hf import SparsifierCallback

    g = torch.Generator().manual_seed(0)
    ds = [{"x": torch.randn(8, generator=g), "labels": int(i % 2)} for i in range(32)]
    batches = [{"x": torch.stack([d["x"] for d in ds[i:i + 4]]), "labels": torch.tensor([d["labels"] for d in ds[i:i + 4]])}
               for i in range(0, 32, 4)]
    sp = get_method(method, sparsity=0.75, total_steps=8, **kw)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True,
    )
    model = Net()
    cb = SparsifierCallback(sp, data=batches if needs_data else None)
    transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    assert sp.step_count == 8
    sp.masks.verify(model)
    assert sp.sparsity_actual() == pytest.approx(0.75, abs=0.02)
