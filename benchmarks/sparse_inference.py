"""Sparse inference on CPU: single Linear layers and SmolLM2 token-by-token decode.

(a) Linear layers of SmolLM2 shapes (576->1536, 1536->576) and 4096x4096 at batch 1/8/128 and
    sparsity 50/70/90/95%: seconds per call of dense ``F.linear`` and of every kernel, measured
    interleaved in the same run; speedup = dense / kernel. ``auto`` is the faster of our compiled
    kernels (what ``sparsify_for_inference`` would pick; it would pick dense below 1x).
(b) SmolLM2-135M greedy decode, one token per step with the KV cache: tokens/s dense vs the
    model magnitude-pruned to 50/70/90% after ``sparsify_for_inference`` (quality aside).

    python benchmarks/sparse_inference.py            # full run
    python benchmarks/sparse_inference.py --quick    # smaller run (CI smoke)

Writes ``benchmarks/results/sparse_inference.json`` with the torch thread count and the load
average: on a machine shared with other work the timings are noisy, and ratios measured in
the same run are the numbers to trust.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

from sparsetorch.inference import KERNELS, _ext, sparsify_for_inference
from sparsetorch.inference.bench import machine_info

OUT = Path(__file__).resolve().parent / "results" / "sparse_inference.json"
SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]  # (in, out), i.e. in -> out
BASELINES = ["torch_csr", "scipy"]
OURS = ["bitmask", "csr", "bitmask_serial", "csr_serial"]


def _weight(out: int, inn: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    # exact unstructured sparsity: zero the smallest |w| (as magnitude pruning does)
    k = int(round(sparsity * w.numel()))
    if k:
        idx = w.abs().flatten().argsort()[:k]
        w.view(-1)[idx] = 0
    return w


def _time_all(fns: dict[str, object], budget_s: float, rounds: int) -> dict[str, float]:
    """Seconds per call: mean over ~budget_s of back-to-back calls per round, median of rounds.

    Means, not medians, per round: a multi-threaded kernel that now and then stalls for a busy
    core pays for it here as it would in a model. Rounds interleave the kernels.
    """
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        reps[name] = int(min(max(budget_s / one, 2), 200))
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            per[name].append((time.perf_counter() - t0) / reps[name])
    return {k: statistics.median(v) for k, v in per.items()}


def bench_layers(quick: bool) -> list[dict]:
    shapes = SHAPES
    batches = [1, 8, 128] if not quick else [1, 8]
    sparsities = [0.5, 0.7, 0.9, 0.95] if not quick else [0.7, 0.9]
    budget, rounds = (0.03, 5) if not quick else (0.01, 3)
    ours = OURS if torch.get_num_threads() > 1 else OURS[:2]
    kernels = [k for k in ours + BASELINES if KERNELS[k].available()]
    rows = []
    hdr = f"{'in->out':>11} {'batch':>5} {'sparsity':>8} {'dense us':>10} " + " ".join(f"{k:>9}" for k in kernels) + f" {'auto':>7}"
    print(hdr)
    print("-" * len(hdr))
    for inn, out in shapes:
        for s in sparsities:
            w = _weight(out, inn, s)
            b = torch.randn(out, generator=torch.Generator().manual_seed(1))
            packs = {k: KERNELS[k].pack(w) for k in kernels}
            for batch in batches:
                x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(2))
                ref = F.linear(x, w, b)
                fns = {"dense": (lambda x=x, w=w, b=b: F.linear(x, w, b))}
                for k in kernels:
                    y = KERNELS[k].matmul(x, packs[k], b, out)
                    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-4)
                    fns[k] = (lambda kk=KERNELS[k], p=packs[k], x=x, b=b, out=out: kk.matmul(x, p, b, out))
                t = _time_all(fns, budget, rounds)
                speed = {k: t["dense"] / t[k] for k in kernels}
                ours = [k for k in OURS if k in speed]
                best = max(ours, key=lambda k: speed[k]) if ours else None
                row = {
                    "in": inn, "out": out, "batch": batch, "sparsity": s,
                    "dense_us": t["dense"] * 1e6,
                    "us": {k: t[k] * 1e6 for k in kernels},
                    "speedup": speed,
                    "auto_kernel": best if best and speed[best] > 1.0 else "dense",
                    "auto_speedup": max(speed[best], 1.0) if best else 1.0,
                }
                rows.append(row)
                print(
                    f"{inn:>5}->{out:<5} {batch:>5} {s:>8.0%} {t['dense'] * 1e6:>10.1f} "
                    + " ".join(f"{speed[k]:>8.2f}x" for k in kernels)
                    + f" {row['auto_speedup']:>6.2f}x",
                    flush=True,
                )
    return rows


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def bench_decode(quick: bool, repeats: int | None = None) -> dict:
    """SmolLM2 decode tokens/s, dense vs sparse kernels, each repeat interleaving the two models.

    The dense model is the *same pruned weights* in plain ``nn.Linear`` (so only the kernels
    differ); each repeat decodes once with each model, alternating which goes first, and the
    result is the median with its min/max over repeats -- never the best run.
    """
    try:
        from sparsetorch.data.llm import load_causal_lm
    except ImportError as exc:  # pragma: no cover
        return {"skipped": f"sparsetorch.data.llm unavailable: {exc}"}
    from sparsetorch import prune
    from sparsetorch.inference.bench import decode_runs

    tokens = 16 if quick else 32
    repeats = repeats or (3 if quick else 7)
    sparsities = [0.9] if quick else [0.5, 0.7, 0.9]
    try:
        base, tok = load_causal_lm("smollm2", progress=False)
    except Exception as exc:  # no model files / no transformers
        return {"skipped": f"could not load SmolLM2: {type(exc).__name__}: {exc}"}
    prompt = "Sparse neural networks are small and fast because"
    ids = tok(prompt, return_tensors="pt").input_ids
    res: dict = {"model": "smollm2", "prompt": prompt, "new_tokens": tokens, "prompt_tokens": int(ids.shape[1]),
                 "repeats": repeats, "statistic": "median over interleaved repeats, with min/max", "runs": []}
    print(f"\nSmolLM2 decode ({ids.shape[1]} prompt tokens, {tokens} new tokens, batch 1, KV cache; "
          f"median [min-max] of {repeats} interleaved repeats)")
    print(f"{'sparsity':>8} {'dense tok/s':>22} {'sparse tok/s':>22} {'speedup':>8}  layers on sparse kernels")
    for s in sparsities:
        dense_m = copy.deepcopy(base)
        prune(dense_m, "magnitude", s)
        sparse_m = copy.deepcopy(dense_m)
        load_before = load_average()
        rep = sparsify_for_inference(sparse_m, batch_size=1)
        dense, sparse = [], []
        for r in range(repeats):
            order = [("d", dense_m), ("s", sparse_m)] if r % 2 == 0 else [("s", sparse_m), ("d", dense_m)]
            for kind, m in order:
                (dense if kind == "d" else sparse).append(decode_runs(m, ids, tokens, 1)[0])
        ratios = [b / a for a, b in zip(dense, sparse)]
        counts = rep.kernel_counts()
        run = {"sparsity": s, "dense_tokens_per_s": _spread(dense), "sparse_tokens_per_s": _spread(sparse),
               "speedup": statistics.median(sparse) / statistics.median(dense),
               "speedup_per_repeat": _spread(ratios), "kernel_counts": counts,
               "replaced": len(rep.replaced), "layers": len(rep.layers),
               "reverted_by_model_check": len(rep.reverted),
               "model_check": None if rep.model_check is None else rep.model_check.to_dict(),
               "linear_speedup_measured": rep.linear_speedup,
               "load_before": load_before, "load_after": load_average()}
        res["runs"].append(run)
        d, sp = run["dense_tokens_per_s"], run["sparse_tokens_per_s"]
        print(f"{s:>8.0%} {d['median']:>8.2f} [{d['min']:.2f}-{d['max']:.2f}] {sp['median']:>8.2f} "
              f"[{sp['min']:.2f}-{sp['max']:.2f}] {run['speedup']:>7.2f}x  {len(rep.replaced)}/{len(rep.layers)} "
              f"{counts} (model check kept {run['model_check']['chosen'] if run['model_check'] else '-'})")
        del dense_m, sparse_m
    return res


def _note(shared: bool) -> str:
    if shared:
        return (
            "Other processes were loading this machine during the run (load average above the "
            "thread count): absolute times are noisy and multi-threaded timings suffer most; "
            "speedups are dense/kernel ratios measured interleaved in the same run."
        )
    return "Machine looked idle during the run."


def _write(out: Path, quick: bool, shared: bool, t0: float, runs: list[dict], run: Run) -> None:
    result = {
        "_meta": run.meta(),
        "benchmark": "sparse_inference",
        "quick": quick,
        "machine_shared": shared,
        "note": _note(shared),
        "timing": "per kernel: mean seconds per call over back-to-back calls, median of interleaved rounds",
        "seconds": time.time() - t0,
        "runs": runs,
    }
    write_json(out, result)


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes/sparsities/repeats")
    ap.add_argument(
        "--threads", default=None,
        help="torch thread counts to run, comma-separated (e.g. 1,2); default: torch's own",
    )
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--decode-repeats", type=int, default=None, help="interleaved decode repeats (default 7; 3 with --quick)")
    ap.add_argument("--append", action="store_true", help="add these runs to the runs already in --out")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    if _ext.get_extension() is None:
        print(f"compiled kernels unavailable: {_ext.extension_error()}", file=sys.stderr)
    thread_counts = [int(t) for t in a.threads.split(",")] if a.threads else [torch.get_num_threads()]
    t0 = time.time()
    runs: list[dict] = []
    shared = False
    if a.append and a.out.is_file():
        prev = json.loads(a.out.read_text())
        runs, shared = prev.get("runs", []), bool(prev.get("machine_shared"))
    for nt in thread_counts:
        torch.set_num_threads(nt)
        load_before = load_average()
        info_before = machine_info()
        print(f"\n=== torch {torch.__version__}, {nt} threads, load average {info_before['loadavg_1_5_15']}")
        layers = [] if a.skip_layers else bench_layers(a.quick)
        decode = {"skipped": "--skip-decode"} if a.skip_decode else bench_decode(a.quick, a.decode_repeats)
        info_after = machine_info()
        shared = shared or info_before["machine_shared"] or info_after["machine_shared"]
        runs.append({"torch_threads": nt, "machine_before": info_before, "machine_after": info_after,
                     "layers": layers, "decode": decode,
                     # runs of one file may come from several invocations (--append)
                     "provenance": run.entry(load_before)})
        _write(a.out, a.quick, shared, t0, runs, run)  # after every thread count, so a cut run keeps data
    print(f"\n{_note(shared)}\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
