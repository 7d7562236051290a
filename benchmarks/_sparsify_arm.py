"""eai-sparsify's side of benchmarks/dictionaries.py; runs in .venv-sparsify (eai-sparsify 1.3.3).

Trains eai-sparsify's own ``SparseCoder`` with the optimizer and per-step sequence of its
``Trainer`` (``sparsify/trainer.py``: b_dec = mean of the first batch, unit-norm decoder rows,
FVU loss against the batch variance, parallel-gradient removal, signum wrapped in schedule-free
with momentum 0.95 and lr 5e-3 / sqrt(width / 2^14), ``optimizer.eval()`` before saving, AuxK off
as in its defaults) on the same activation shards as ours, read by the same shuffled reader.
We drive the steps ourselves because its Trainer runs the language model itself and cannot read
pre-harvested activations. Writes the weights (safetensors) and a JSON summary.

    .venv-sparsify/bin/python benchmarks/_sparsify_arm.py SHARDS OUT_DIR --width 4608 --k 32 \
        --tokens 500000 --batch 65536 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr-mult", type=float, default=1.0, help="times its automatic learning rate")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from safetensors.torch import save_file
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    from sparsetorch.dictionaries.harvest import ActivationStore

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    store = ActivationStore(a.shards)
    sae = SparseCoder(store.d, SparseCoderConfig(num_latents=a.width, k=a.k), device="cpu", dtype=torch.float32)
    lr = a.lr_mult * 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    steps = a.tokens // a.batch
    fvus = []
    t0 = time.perf_counter()
    n = 0
    for i, x in enumerate(store.batches(a.batch, seed=a.seed, epochs=a.tokens / store.rows)):
        if i >= steps:
            break
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        fvus.append(float(out.fvu.detach()))
        n += x.shape[0]
    secs = time.perf_counter() - t0
    opt.eval()  # schedule-free: swap in the averaged weights, as its Trainer does before saving
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": sae.encoder.weight.detach().contiguous(), "b_enc": sae.encoder.bias.detach().contiguous(),
               "W_dec": sae.W_dec.detach().contiguous(), "b_dec": sae.b_dec.detach().contiguous()},
              str(a.out / "weights.safetensors"))
    tail = max(1, min(20, len(fvus) // 10))
    info = {"steps": steps, "tokens": n, "seconds": secs, "tokens_per_s": n / secs, "lr": lr,
            "batch": a.batch, "lr_mult": a.lr_mult, "final_train_fvu": sum(fvus[-tail:]) / tail, "width": a.width, "k": a.k,
            "torch_threads": torch.get_num_threads()}
    (a.out / "summary.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
