"""DP-SGD on sparse models: does a fixed sparse mask buy accuracy at equal privacy?

Fashion-MNIST, the library's CNN (``get_model("cnn")``: 2 conv + 2 linear), the full training
set. For each epsilon (delta 1e-5, PRV accountant) and each sparsity (0 = dense DP-SGD; static
random ERK masks, chosen at initialisation without data, so they cost no privacy), DP-SGD with
the noise multiplier calibrated to epsilon over the same epochs, expected batch size and
learning rate; several seeds; mean ± std. The non-private dense model trained with
``training.loop.fit`` (SGD 0.05, batch 128, the same epochs) is the ceiling.

    .venv/bin/python benchmarks/dp_sparse.py                  # the issue's grid (about an hour on 2 cores)
    .venv/bin/python benchmarks/dp_sparse.py --eps 3 --sparsities 0,0.9 --seeds 0
    .venv/bin/python benchmarks/dp_sparse.py --table          # print the table from the JSON

Entries merge into ``benchmarks/results/dp_sparse.json`` keyed ``EPS|SPARSITY|SEED`` (``ceiling|SEED``
for the non-private runs), each with its own provenance; a run that stops part-way keeps what
it finished and a rerun skips it (``--redo`` reruns). Target (issue 14): at epsilon 3 the best
sparse model beats dense DP-SGD by >= 1 point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import Job, load_results, run_jobs, saver  # noqa: E402
from _provenance import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dp_sparse.json"
TARGET_EPS, TARGET_POINTS = 3.0, 1.0


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def key(eps: float | str, sparsity: float, seed: int) -> str:
    return f"{eps:g}|{sparsity:g}|{seed}" if not isinstance(eps, str) else f"{eps}|{seed}"


def entries(results: dict) -> dict[str, dict]:
    """The measured runs of a results file (without ``_meta``, ``summary`` and ``verdict``)."""
    return {k: e for k, e in results.items() if not k.startswith("_") and k not in ("summary", "verdict")}


def summarise(results: dict) -> dict:
    """{eps: {sparsity: {mean, std, n}}} and {"ceiling": {mean, std, n}} from the entries."""
    cells: dict[str, dict[str, list[float]]] = {}
    ceiling: list[float] = []
    for k, e in entries(results).items():
        if k.startswith("ceiling|"):
            ceiling.append(e["accuracy"])
            continue
        cells.setdefault(f"{e['epsilon_target']:g}", {}).setdefault(f"{e['sparsity']:g}", []).append(e["accuracy"])

    def stat(v: list[float]) -> dict:
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}

    out = {eps: {sp: stat(v) for sp, v in sorted(d.items(), key=lambda kv: float(kv[0]))}
           for eps, d in sorted(cells.items(), key=lambda kv: float(kv[0]))}
    return {"by_epsilon": out, "ceiling": stat(ceiling) if ceiling else None}


def verdict(summary: dict) -> dict | None:
    """The issue's target at epsilon 3: best sparse mean minus dense DP-SGD mean, in points."""
    cell = summary["by_epsilon"].get(f"{TARGET_EPS:g}")
    if not cell or "0" not in cell or len(cell) < 2:
        return None
    best_sp, best = max(((sp, c) for sp, c in cell.items() if sp != "0"), key=lambda kv: kv[1]["mean"])
    gain = best["mean"] - cell["0"]["mean"]
    return {"epsilon": TARGET_EPS, "best_sparsity": float(best_sp), "best_mean": best["mean"],
            "dense_mean": cell["0"]["mean"], "gain_points": gain, "target_points": TARGET_POINTS,
            "met": gain >= TARGET_POINTS}


def _cell(c: dict) -> str:
    """mean ± std over seeds; a cell with one seed says so (no spread to show)."""
    return f"{c['mean']:.2f} ± {c['std']:.2f}" if c["n"] > 1 else f"{c['mean']:.2f} (1 seed)"


def table(results: dict) -> str:
    s = summarise(results)
    sps = sorted({float(sp) for d in s["by_epsilon"].values() for sp in d})
    head = "| epsilon | " + " | ".join("dense DP-SGD" if sp == 0 else f"{sp:.0%} sparse" for sp in sps) + " |"
    lines = [head, "|" + "---|" * (len(sps) + 1)]
    for eps, d in s["by_epsilon"].items():
        row = [_cell(d[f"{sp:g}"]) if f"{sp:g}" in d else "–" for sp in sps]
        lines.append(f"| {eps} | " + " | ".join(row) + " |")
    if s["ceiling"]:
        c = s["ceiling"]
        lines.append(f"\nnon-private dense (ceiling): {_cell(c)}")
    v = verdict(s)
    if v:
        lines.append(f"target at epsilon {v['epsilon']:g}: best sparse ({v['best_sparsity']:.0%}) "
                     f"{v['gain_points']:+.2f} points over dense DP-SGD (target +{v['target_points']:g}): "
                     + ("MET" if v["met"] else "MISSED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=_floats, default=[1.0, 3.0, 8.0])
    ap.add_argument("--sparsities", type=_floats, default=[0.0, 0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512, help="expected Poisson batch size")
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--accountant", default="prv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the non-private dense runs")
    ap.add_argument("--redo", action="store_true", help="rerun entries already in the results")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the table of --results")
    a = ap.parse_args(argv)
    results = load_results(a.results)
    if a.table:
        print(table(results))
        return 0

    run = Run.for_main(__file__, argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from sparsetorch.data.fashion_mnist import load_fashion_mnist
    from sparsetorch.models import get_model
    from sparsetorch.privacy import dp_fit
    from sparsetorch.training.loop import build_sparsifier, fit

    torch.set_num_threads(a.threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    meta = {"model": "cnn", "dataset": "fashion-mnist", "train_examples": len(train[0]),
            "epochs": a.epochs, "expected_batch": a.batch, "lr": a.lr, "clip": a.clip,
            "delta": a.delta, "accountant": a.accountant, "mask": "static random, ERK allocation",
            "optimizer": "SGD momentum 0.9, cosine", "ceiling": "non-private dense, fit(): SGD 0.05, batch 128"}

    def derive(res: dict) -> dict:
        summary = summarise(res)
        return {"summary": summary, "verdict": verdict(summary)}

    def do(job: tuple[int, float | None, float]) -> dict:
        seed, eps, sp = job
        torch.manual_seed(seed)
        model = get_model("cnn")
        if eps is None:
            r = fit(model, None, train, test, epochs=a.epochs, batch_size=128, lr=0.05, seed=seed, progress=False)
            return {"accuracy": r.accuracy, "accuracy_per_epoch": r.accuracy_per_epoch,
                    "seconds_per_step": r.seconds_per_step, "seed": seed}
        sparsifier = build_sparsifier("static", sp, 1, allocation="erk", seed=seed) if sp > 0 else None
        r = dp_fit(model, sparsifier, train, test, epsilon=eps, delta=a.delta, clip=a.clip,
                   epochs=a.epochs, batch_size=a.batch, lr=a.lr, accountant=a.accountant,
                   seed=seed, progress=False)
        return {"epsilon_target": eps, "sparsity": sp, "seed": seed, "accuracy": r.accuracy,
                "accuracy_per_epoch": r.accuracy_per_epoch, "epsilon": r.epsilon,
                "noise_multiplier": r.noise_multiplier, "sample_rate": r.sample_rate,
                "steps": r.steps, "sparsity_actual": r.sparsity_actual,
                "clipped_fraction": r.clipped_fraction, "mean_batch": r.mean_batch,
                "seconds_per_step": r.seconds_per_step}

    # a run cut short keeps the most useful part: the target's epsilon with every seed, then the
    # first seed of the ceiling and of every other epsilon, then the remaining seeds
    jobs = [(seed, eps, sp) for eps in a.eps for seed in a.seeds for sp in a.sparsities]
    jobs += [(seed, None, 0.0) for seed in a.seeds if not a.no_ceiling]
    first = a.seeds[0]
    jobs.sort(key=lambda j: (j[1] != TARGET_EPS, j[0] != first, j[1] is not None, j[1] or 0.0, j[0]))
    run_jobs(results, [Job(key("ceiling", 0, seed) if eps is None else key(eps, sp, seed), (seed, eps, sp))
                       for seed, eps, sp in jobs], do,
             run=run, save=saver(a.results, results, run, meta, derive), redo=a.redo,
             report=lambda job, e: f"{job.key}: accuracy {e['accuracy']:.2f}  ({e['wall_seconds']:.0f} s)")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
