"""Sparse training on Fashion-MNIST: accuracy and wall time per epoch for every method.

Same model (2-conv CNN), epochs, seed, optimizer (SGD 0.05, momentum 0.9, cosine) and data
order for all runs. Default sweep: dense, static ERK, SNIP, GMP, SET, RigL, SNFS at
80/90/95% and SR-STE 2:4, plus the headline comparison dense vs RigL 90% on the *full*
training set. Writes ``benchmarks/results/sparse_training.json`` and prints a table.

Claims checked (reported as fields of the JSON):
* ``rigl90_gap``: dense accuracy minus RigL-90% accuracy at equal epochs, full training set (target <= 1.0);
* ``step_ratio``: amortized step time of each method over the dense step time in the same run
  (target <= 1.10 for RigL and SET). Timings on a shared machine are noisy.

Usage::

    python benchmarks/sparse_training.py --threads 1           # full default sweep (~30 min at 1 thread)
    python benchmarks/sparse_training.py --epochs 1 --subset 10000 --methods dense,rigl,set --sparsities 0.9
    # the headline at 10 epochs, ERK and global layer budgets (~20 min at 1 thread)
    python benchmarks/sparse_training.py --threads 1 --no-sweep --full-epochs 10 --full-allocations erk,global \
        --out benchmarks/results/sparse_training_full10.json
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, write_json  # noqa: E402

from sparsetorch.data.fashion_mnist import load_fashion_mnist
from sparsetorch.models import get_model
from sparsetorch.training.loop import NM_METHODS, build_sparsifier, fit

DEFAULT_METHODS = "dense,static,snip,gmp,set,rigl,snfs,srste"


def run_one(method: str, sparsity: float | None, train, test, args, *,  # noqa: ANN001
            epochs: int | None = None, allocation: str | None = None, extra: dict | None = None,
            model_out: list | None = None) -> dict:
    """One training run; ``extra`` adds method options, ``model_out`` (a list) receives the model
    and the sparsifier (for callers that inspect them, e.g. ``learned_sparsity.py``)."""
    epochs = epochs or args.epochs
    steps_per_epoch = math.ceil(len(train[0]) / args.batch_size)
    total = steps_per_epoch * epochs
    kw: dict = {"seed": args.seed}
    if allocation:
        kw["allocation"] = allocation
    if method in NM_METHODS:
        kw["pattern"] = args.pattern
    if method == "snfs":
        kw["update_every"] = steps_per_epoch  # reference: once per epoch
    if method in ("static", "snfs"):
        kw["allocation"] = "erk"  # same initial layer budget as RigL/SET (SNFS' own default is uniform)
    if method in ("set", "rigl"):
        kw["update_every"] = args.update_every
    if method == "gmp":
        kw["frequency"] = args.update_every
    kw.update(extra or {})
    sp = build_sparsifier(method, sparsity, total, **kw)
    torch.manual_seed(args.seed)
    model = get_model(args.model)
    res = fit(model, sp, train, test, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
              seed=args.seed, progress=not args.no_progress, desc=f"{method} {sparsity}")
    if model_out is not None:
        model_out.extend([model, sp])
    return {
        "method": method,
        "sparsity_target": 0.0 if sp is None else sp.sparsity,
        "sparsity_actual": res.sparsity_actual,
        "accuracy": res.accuracy,
        "accuracy_per_epoch": res.accuracy_per_epoch,
        "seconds_per_epoch": res.seconds_per_epoch,
        "seconds_per_step": res.seconds_per_step,
        "train_examples": len(train[0]),
        "epochs": epochs,
        **({"allocation": allocation} if allocation else {}),
    }


def table(rows: list[dict], dense_step: float | None) -> str:
    out = ["| method | sparsity | actual | test acc (%) | s/epoch | step / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds_per_step'] / dense_step:.2f}" if dense_step else "-"
        out.append(f"| {r['method']} | {r['sparsity_target']:.2f} | {r['sparsity_actual']:.4f} | {r['accuracy']:.2f} | "
                   f"{r['seconds_per_epoch']:.1f} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=20000, help="training examples for the sweep (0 = all 60k)")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-every", type=int, default=100, help="mask update period of SET/RigL and GMP frequency")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for the whole run (0 = torch's default); use 1 on a shared machine")
    ap.add_argument("--no-full-rigl", action="store_true", help="skip dense vs RigL 90%% on the full training set")
    ap.add_argument("--no-sweep", action="store_true", help="only the full-training-set dense vs RigL 90%% comparison")
    ap.add_argument("--full-epochs", type=int, default=0, help="epochs of the full-set comparison (0 = --epochs)")
    ap.add_argument("--full-allocations", default="erk,global",
                    help="layer budgets of RigL 90%% in the full-set comparison, e.g. erk,global")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/sparse_training.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_fashion_mnist("test", args.data_dir)
    sweep_train = load_fashion_mnist("train", args.data_dir, subset=args.subset or None)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    t0 = time.time()
    rows: list[dict] = []
    for m in [] if args.no_sweep else methods:
        levels = [None] if m in ("dense", *NM_METHODS) else sparsities
        for s in levels:
            rows.append(run_one(m, s, sweep_train, test, args))
            print(f"{m} {s}: acc {rows[-1]['accuracy']:.2f}  {rows[-1]['seconds_per_epoch']:.1f}s/epoch", file=sys.stderr)
    dense_rows = [r for r in rows if r["method"] == "dense"]
    dense_step = dense_rows[0]["seconds_per_step"] if dense_rows else None
    for r in rows:
        r["step_ratio"] = r["seconds_per_step"] / dense_step if dense_step else None
    full = None
    if not args.no_full_rigl:
        full_train = load_fashion_mnist("train", args.data_dir)
        fe = args.full_epochs or args.epochs
        d = run_one("dense", None, full_train, test, args, epochs=fe)
        full = {"epochs": fe, "dense": d}
        for i, alloc_name in enumerate(a.strip() for a in args.full_allocations.split(",") if a.strip()):
            rg = run_one("rigl", 0.9, full_train, test, args, epochs=fe, allocation=alloc_name)
            key = "" if i == 0 else f"_{alloc_name}"
            full[f"rigl90{key}"] = rg
            full[f"rigl90{key}_gap"] = d["accuracy"] - rg["accuracy"]
            full[f"rigl90{key}_target_met"] = d["accuracy"] - rg["accuracy"] <= 1.0
            full[f"step_ratio{key}"] = rg["seconds_per_step"] / d["seconds_per_step"]
    result = {
        "_meta": run.meta(),
        "benchmark": "sparse_training",
        "dataset": "fashion-mnist",
        "model": args.model,
        "epochs": args.epochs,
        "sweep_train_examples": len(sweep_train[0]),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "wall_seconds": time.time() - t0,
        "sweep": rows,
        "full_training_set": full,
    }
    out = Path(args.out)
    write_json(out, result)
    if rows:
        print(table(rows, dense_step))
    if full:
        for k, r in full.items():
            if k.startswith("rigl90") and isinstance(r, dict):
                print(f"full training set, {full['epochs']} epoch(s): dense {full['dense']['accuracy']:.2f}%  "
                      f"RigL 90% ({r.get('allocation', 'erk')}) {r['accuracy']:.2f}%  gap {full[k + '_gap']:.2f} pt "
                      f"(target <= 1.0: {'met' if full[k + '_target_met'] else 'MISSED'})")
    try:
        if not rows:
            raise RuntimeError("no sweep")
        from sparsetorch.training.plots import plot_accuracy_vs_sparsity

        plot_accuracy_vs_sparsity(rows, out.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - plotting is a bonus
        print(f"plot skipped: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
