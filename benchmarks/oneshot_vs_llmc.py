"""sparsetorch vs llm-compressor, like for like: one driver, interleaved, repeated, same threads.

Every config runs in its own fresh subprocess (``oneshot_llm.py``'s worker: same model folder,
same 64 calibration windows, same E16 evaluation); llm-compressor runs from its own venv. The
configs are run round-robin, ``--repeats`` times, and the order rotates by one each round, so a
change in machine load hits every config alike and no config always runs first. For each config
the JSON keeps every run (seconds, load average before/after, perplexity) and its median and
range; the relative spread of repeats of one config is the measured noise, so a time ratio
inside that spread is "parity within noise", not a win.

Default matrix (``--specs 0.5 --batches 1,8``): SparseGPT without refit (the algorithm
llm-compressor runs) and Wanda, each tool at calibration batch 1 and at batch 8 (the fastest
setting of both tools: llm-compressor's Wanda took 120 s at batch 8 against 150-190 s at 1 in
a pilot run; ours defaults to 8). ``--refit`` adds our default SparseGPT (refit on).

    .venv/bin/python benchmarks/oneshot_vs_llmc.py                  # 3 repeats, 2 threads
    .venv/bin/python benchmarks/oneshot_vs_llmc.py --repeats 5 --specs 0.5,2:4
    .venv/bin/python benchmarks/oneshot_vs_llmc.py --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402
from oneshot_llm import ROOT, ensure_model_dir, run_one  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "oneshot_vs_llmc.json"


def matrix(specs: list[str], batches: list[int], refit: bool = False) -> list[str]:
    """The configs of one round, in their base order: each algorithm, each tool, each batch."""
    out: list[str] = []
    for s in specs:
        for b in batches:
            out += [f"sparsegpt-ref@{s}/b{b}", f"llmc-sparsegpt@{s}/b{b}",
                    f"wanda@{s}/b{b}", f"llmc-wanda@{s}/b{b}"]
        if refit:
            out.append(f"sparsegpt@{s}/b{max(batches)}")
    return out


def rotated(cfgs: list[str], k: int) -> list[str]:
    k %= len(cfgs)
    return cfgs[k:] + cfgs[:k]


def summarize(runs: list[dict]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of the pruning seconds."""
    ok = [r for r in runs if "error" not in r and r.get("seconds")]
    if not ok:
        return {"n": 0}
    sec = [r["seconds"] for r in ok]
    med = statistics.median(sec)
    ppls = sorted({round(r["ppl"], 6) for r in ok if "ppl" in r})
    rss = [r["rss_after_prune_gib"] for r in ok if "rss_after_prune_gib" in r]
    return {
        "n": len(ok),
        "median_seconds": med,
        "min_seconds": min(sec),
        "max_seconds": max(sec),
        "spread": (max(sec) - min(sec)) / med,
        "ppl": ppls[0] if len(ppls) == 1 else ppls,  # a list means the repeats disagreed
        "median_rss_after_prune_gib": statistics.median(rss) if rss else None,
        "torch_threads": sorted({r.get("torch_threads") for r in ok}),
        "batch_size": ok[0].get("batch_size"),
    }


def table(data: dict) -> str:
    rows = [
        "| config | batch | runs | ppl E16 | prune s median [min–max] | spread | RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg, e in data.items():
        if cfg.startswith("_"):
            continue
        s = e["summary"]
        if not s.get("n"):
            rows.append(f"| {cfg} | | 0 | error | | | |")
            continue
        p = s["ppl"]
        p = f"{p:.2f}" if isinstance(p, float) else "/".join(f"{x:.2f}" for x in p)
        rows.append(
            f"| {cfg} | {s['batch_size']} | {s['n']} | {p} | {s['median_seconds']:.0f} "
            f"[{s['min_seconds']:.0f}–{s['max_seconds']:.0f}] | {s['spread'] * 100:.0f}% | "
            f"{s['median_rss_after_prune_gib']:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    run = Run()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", default="0.5", help="comma-separated: 0.5, 0.6, 0.7, 2:4, 4:8")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both tools")
    ap.add_argument("--batches", default="1,8", help="comma-separated calibration batch sizes")
    ap.add_argument("--refit", action="store_true", help="add our default SparseGPT (refit on)")
    ap.add_argument("--configs", help="comma-separated configs instead of the default matrix")
    ap.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the table of the saved results")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(a.results.read_text())))
        return
    if a.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    cfgs = (a.configs.split(",") if a.configs else
            matrix(a.specs.split(","), [int(b) for b in a.batches.split(",")], a.refit))
    model_dir = ensure_model_dir()
    data: dict = {c: {"runs": []} for c in cfgs}
    peers: dict = {}
    for k in range(a.repeats):
        for cfg in rotated(cfgs, k):
            print(f"round {k + 1}/{a.repeats}: {cfg} ...", flush=True)
            before = load_average()
            t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            r = run_one(cfg, model_dir, a.llmc_python, a.timeout, a.threads)
            versions = r.pop("versions", None)
            if "llmcompressor" in r:
                peers["llmcompressor"] = r["llmcompressor"]
            r.pop("timings", None)
            r.update({"round": k + 1, "started_utc": t0, "load_before": before,
                      "load_after": load_average(), "versions": versions})
            data[cfg]["runs"].append(r)
            data[cfg]["summary"] = summarize(data[cfg]["runs"])
            data["_meta"] = run.meta(
                peers,
                model="SmolLM2-135M-Instruct fp32 (de-quantized GGUF, plain Llama folder)",
                calibration="first 64 windows x 512 of the calibration half",
                eval="first 16 windows x 512 of the evaluation half (E16)",
                protocol=f"{a.repeats} rounds, configs round-robin, order rotated by one per "
                         f"round, one fresh process per run, {a.threads} torch threads each, "
                         "nothing else running by design (load average recorded per run)",
                rounds_done=k + (1 if cfg == rotated(cfgs, k)[-1] else 0),
                threads=a.threads,
            )
            write_json(a.results, data)
            print(f"  -> {r.get('seconds', r.get('error', '?'))!s:.60} s, ppl {r.get('ppl')}, "
                  f"load {before} -> {r['load_after']}", flush=True)
    print(table(data))


if __name__ == "__main__":
    main()
