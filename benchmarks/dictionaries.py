"""SAEs on SmolLM2's residual stream: ours (TopK, BatchTopK, JumpReLU) against EleutherAI's
eai-sparsify trained on the same activation shards with the same token budget.

Phases (each resumable; results merge into one JSON):

1. ``harvest`` -- the residual stream after block ``--layer`` (default 15 of 30) on ``--tokens``
   tokens of training text (the embedded corpus's calibration half + the python3.11-doc fine-tuning
   sections; never the evaluation half), and on the first 64 windows of the *evaluation* half for
   the metrics. Shards in ``benchmarks/.cache/dictionaries/`` (not committed).
2. ``ours`` -- each kind at L0 target ``--k`` and each width in ``--widths``.
3. ``sparsify`` -- eai-sparsify 1.3.3's ``SparseCoder`` and its optimizer in its own venv
   (``.venv-sparsify``: torch 2.13.0 CPU + eai-sparsify), driven over the same shards by
   ``benchmarks/_sparsify_arm.py`` with its defaults (signum + schedule-free, auto LR, b_dec = first
   batch mean, FVU loss, AuxK off). Two batch sizes: its CLI default (32 sequences of 2048 tokens =
   65,536 tokens/step) and ours (4,096 tokens/step).
4. ``eval`` -- every SAE through the same metric code (``sparsetorch.dictionaries.metrics``): FVU over
   the evaluation tokens (dataset mean), L0, dead fraction over those tokens, delta LM loss and CE
   recovered spliced into the model on E16-style windows.

Targets (issue 16): our TopK FVU <= 0.95x sparsify's at equal L0, width and tokens; our training
throughput >= 1x theirs. Throughput counts the whole training loop (shard reading included) on
the same thread count; record the machine's load (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _provenance import ROOT, Run, load_average, write_json

RESULTS = ROOT / "benchmarks" / "results" / "dictionaries.json"
CACHE = ROOT / "benchmarks" / ".cache" / "dictionaries"
SPARSIFY_PY = ROOT / ".venv-sparsify" / "bin" / "python"
DEFAULT_TOKENS = 500_000


def train_dir(tokens: int) -> Path:
    """The training harvest of a token budget (a larger budget extends a copy of a smaller one with
    ``harvest(..., resume=True)``; each budget keeps its own folder so results stay reproducible)."""
    return CACHE / ("train" if tokens == DEFAULT_TOKENS else f"train-{tokens}")


def sae_dir(tokens: int, name: str) -> Path:
    return CACHE / ("saes" if tokens == DEFAULT_TOKENS else f"saes-{tokens}") / name
KINDS = ("topk", "batchtopk", "jumprelu")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def harvest_phase(a: argparse.Namespace, log) -> dict:
    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.data.text import eval_windows
    from sparsetorch.dictionaries import corpus_windows, harvest

    model, tok = load_causal_lm("smollm2", progress=False)
    site = f"resid:{a.layer}"
    out = {}
    t = time.perf_counter()
    train_w = corpus_windows(tok, seq_len=512, seed=0)
    man = harvest(model, train_w, site, train_dir(a.tokens), tokens=a.tokens, resume=True, batch_size=4,
                  windows_per_shard=32, model_names=["smollm2"], progress=True)
    out["train"] = {"rows": man.rows, "windows": man.n_windows, "available_windows": len(train_w),
                    "seconds": time.perf_counter() - t, "scale": man.scale()[0]}
    t = time.perf_counter()
    ev = eval_windows(tok, num_windows=a.eval_windows)
    man = harvest(model, ev, site, CACHE / "eval", resume=True, batch_size=4, windows_per_shard=16,
                  model_names=["smollm2"])
    out["eval"] = {"rows": man.rows, "windows": man.n_windows, "seconds": time.perf_counter() - t}
    return out


def key(lib: str, kind: str, width: int, batch: int | None = None, lr_mult: float = 1.0) -> str:
    return f"{lib}|{kind}|{width}" + (f"|b{batch}" if batch else "") + (f"|lr{lr_mult:g}x" if lr_mult != 1 else "")


def ours_phase(a: argparse.Namespace, kind: str, width: int) -> dict:
    from sparsetorch.dictionaries import ActivationStore, SAEConfig, TrainOptions, train_on_store

    store = ActivationStore(train_dir(a.tokens))
    cfg = SAEConfig(d=store.d, width=width, kind=kind, k=a.k, site=f"resid:{a.layer}", model="smollm2")
    sae, res = train_on_store(store, cfg, TrainOptions(tokens=a.tokens, batch_size=4096),
                              log=lambda m: print(f"  {kind} {width}: {m}", flush=True))
    path = sae_dir(a.tokens, key("ours", kind, width).replace("|", "_"))
    sae.save(path, extra={"train": res.summary()}, overwrite=True)
    return {"train": res.summary(), "path": str(path.relative_to(ROOT))}


def sparsify_phase(a: argparse.Namespace, width: int, batch: int, lr_mult: float = 1.0) -> dict:
    if not SPARSIFY_PY.is_file():
        raise SystemExit(f"{SPARSIFY_PY} is missing: python3 -m venv .venv-sparsify && .venv-sparsify/bin/pip "
                         "install torch==2.13.0 eai-sparsify==1.3.3 transformers==5.25.0")
    path = sae_dir(a.tokens, key("sparsify", "topk", width, batch, lr_mult).replace("|", "_"))
    cmd = [str(SPARSIFY_PY), str(ROOT / "benchmarks" / "_sparsify_arm.py"), str(train_dir(a.tokens)), str(path),
           "--width", str(width), "--k", str(a.k), "--tokens", str(a.tokens), "--batch", str(batch),
           "--threads", str(a.threads), "--lr-mult", str(lr_mult)]
    subprocess.run(cmd, check=True)
    return {"train": json.loads((path / "summary.json").read_text()), "path": str(path.relative_to(ROOT))}


def load_any(entry: dict, train: Path):
    """Our saved SAE, or eai-sparsify's weights as our TopK class (identical parameterisation:
    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec, scale 1)."""
    import torch
    from safetensors.torch import load_file

    from sparsetorch.dictionaries import ActivationStore, SAEConfig, SparseAutoencoder

    path = ROOT / entry["path"]
    if (path / "weights.safetensors").is_file():
        w = load_file(str(path / "weights.safetensors"))
        t = entry["train"]
        sae = SparseAutoencoder(SAEConfig(d=w["W_dec"].shape[1], width=t["width"], kind="topk", k=t["k"]))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(w[name])
        # evaluated under our sink-token rule like ours (10x the RMS norm of the training harvest)
        sae.cfg.max_norm = ActivationStore(train).sink_norm(10.0)[0]
        return sae.eval()
    return SparseAutoencoder.load(path)


def eval_phase(entry: dict, model, eval_store, lm_windows, layer: int, baseline: dict, train: Path) -> dict:
    """Every metric through sparsetorch.dictionaries.metrics; ``baseline`` caches the clean and
    zero-ablated losses (the same for every SAE)."""
    from sparsetorch.dictionaries import parse_site, recon_stats, sae_splice, splice_losses

    sae = load_any(entry, train)
    st = recon_stats(sae, (eval_store.shard(i)["acts"] for i in range(len(eval_store))))
    sp = splice_losses(model, parse_site(f"resid:{layer}", model), lm_windows, sae_splice(sae),
                       baseline=baseline.get("losses"))
    baseline["losses"] = (sp.clean_loss, sp.zero_loss)
    return {"fvu": st.fvu(), "l0": st.l0(), "dead_fraction": st.dead_fraction(), "shrinkage": st.shrinkage(),
            "eval_tokens": st.n, "sink_tokens_skipped": st.skipped, **sp.as_dict()}


def throughput_phase(a: argparse.Namespace, width: int, rounds: int = 3, steps: int = 16) -> dict:
    """Training tokens/s of our TopK and eai-sparsify's at batch 4,096, measured in alternation
    (``rounds`` times ``steps`` steps each, in fresh processes for both), so that a drifting load
    on a shared machine hits both alike; medians and ranges."""
    import statistics

    ours, theirs, loads = [], [], []
    for r in range(rounds):
        loads.append(load_average())
        cmd = [sys.executable, __file__, "--phase", "_time_ours", "--widths", str(width), "--threads", str(a.threads),
               "--time-steps", str(steps), "--tokens", str(a.tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        ours.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        path = CACHE / "saes" / f"throughput_{width}"
        cmd = [str(SPARSIFY_PY), str(ROOT / "benchmarks" / "_sparsify_arm.py"), str(train_dir(a.tokens)), str(path),
               "--width", str(width), "--k", str(a.k), "--tokens", str(steps * 4096), "--batch", "4096",
               "--threads", str(a.threads), "--seed", str(r)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        print(f"  throughput {width} round {r}: ours {ours[-1]:.0f}, eai-sparsify {theirs[-1]:.0f} tok/s", flush=True)
    return {"ours": ours, "sparsify": theirs, "ours_median": statistics.median(ours),
            "sparsify_median": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs), "steps": steps, "batch": 4096,
            "loads_before": loads}


def _time_ours(a: argparse.Namespace) -> None:
    from sparsetorch.dictionaries import ActivationStore, SAEConfig, TrainOptions, train_on_store

    store = ActivationStore(train_dir(a.tokens))
    cfg = SAEConfig(d=store.d, width=a.widths[0], kind="topk", k=a.k)
    _, res = train_on_store(store, cfg, TrainOptions(tokens=a.time_steps * 4096, batch_size=4096, log_every=10**9))
    print(json.dumps({"tokens_per_s": res.tokens_per_s}))


def crosscoder_phase(a: argparse.Namespace) -> dict:
    """Dense SmolLM2 vs its SparseGPT-50% version (the recovery benchmark's cached start): a
    BatchTopK crosscoder, Latent Scaling, and the lost latents patched back into the pruned model."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from finetune_llm import pruned_start

    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.data.text import eval_windows
    from sparsetorch.dictionaries import corpus_windows, parse_site
    from sparsetorch.dictionaries.crosscoder import Crosscoder
    from sparsetorch.dictionaries.diff import diff_models, patch_losses

    dense, tok = load_causal_lm("smollm2", progress=False)
    pruned = pruned_start("sparsegpt@0.5")[0]
    site = parse_site(f"resid:{a.layer}", dense)
    out = CACHE / "diff"
    rep = diff_models(dense, pruned, tok, site, out, train_windows=corpus_windows(tok, seq_len=512, seed=1),
                      eval_windows=eval_windows(tok, num_windows=16), tokens=a.cc_tokens, width=a.cc_width, k=a.k,
                      names=("smollm2", "smollm2-sparsegpt50"), activations=CACHE / "pairs", batch_size=2048,
                      overwrite=True, log=lambda m: print("  diff:", m, flush=True))
    cc = Crosscoder.load(out / "crosscoder")
    lm_w = eval_windows(tok, num_windows=a.lm_windows)
    lost = torch.tensor(rep["lost"], dtype=torch.long)
    patched = {}
    if len(lost):
        patched["lost"] = patch_losses(dense, pruned, cc, site, lm_w, lost)
        # control: as many latents drawn from the shared class
        delta = cc.delta_norm()
        shared = ((delta - 0.5).abs() < 0.1).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(0)
        ctrl = shared[torch.randperm(len(shared), generator=g)[:len(lost)]]
        patched["shared_control"] = patch_losses(dense, pruned, cc, site, lm_w, ctrl)
    only_a = torch.tensor([j for j in range(cc.cfg.width) if float(cc.delta_norm()[j]) > 0.9], dtype=torch.long)
    if len(only_a):
        patched["only_a_all"] = patch_losses(dense, pruned, cc, site, lm_w, only_a)
    rep = {k: v for k, v in rep.items() if k not in ("lost", "gained")} | {"n_lost": len(lost)}
    return {"report": rep, "patch": patched, "folder": str(out.relative_to(ROOT))}


def table(results: dict) -> str:
    rows = ["| library | kind | width | batch | FVU | L0 | dead | delta LM loss | CE recovered | train tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k, e in sorted((k, e) for k, e in results.items() if "|" in k and not k.startswith("throughput")):
        ev, tr = e.get("eval", {}), e["train"]
        lib, kind, width = k.split("|")[:3]
        batch = f"{tr.get('batch', 4096)}" + (f" lr x{tr['lr_mult']:g}" if tr.get("lr_mult", 1) != 1 else "")
        f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        rows.append(f"| {lib} | {kind} | {width} | {batch} | {f(ev.get('fvu'))} | {f(ev.get('l0'), 1)} | "
                    f"{f(ev.get('dead_fraction'))} | {f(ev.get('delta_lm_loss'))} | {f(ev.get('ce_recovered'))} | "
                    f"{tr['tokens_per_s']:.0f} |")
    return "\n".join(rows)


def verdict(results: dict, widths: list[int]) -> dict:
    out = {}
    for w in widths:
        ours = results.get(key("ours", "topk", w), {})
        theirs = [results[k] for k in results if k.startswith(f"sparsify|topk|{w}|") and "eval" in results[k]]
        if "eval" not in ours or not theirs:
            continue
        best = min(theirs, key=lambda e: e["eval"]["fvu"])
        fastest = max(e["train"]["tokens_per_s"] for e in theirs)
        same_batch = [e for e in theirs if e["train"]["batch"] == 4096 and e["train"].get("lr_mult", 1) == 1]
        tp = results.get(f"throughput|{w}")
        out[str(w)] = {
            "fvu_ratio_vs_best_sparsify": ours["eval"]["fvu"] / best["eval"]["fvu"],
            "alternating_throughput_ratio": tp["ratio"] if tp else None,
            "fvu_target_met": ours["eval"]["fvu"] <= 0.95 * best["eval"]["fvu"],
            "throughput_ratio_vs_same_batch": (ours["train"]["tokens_per_s"] / same_batch[0]["train"]["tokens_per_s"]
                                               if same_batch else None),
            "throughput_ratio_vs_fastest": ours["train"]["tokens_per_s"] / fastest,
            # judged on the alternating measurement when there is one (the full runs ran at different loads)
            "throughput_target_met": (tp["ratio"] >= 1.0) if tp else ours["train"]["tokens_per_s"] >= fastest,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="all", choices=["harvest", "ours", "sparsify", "throughput", "eval", "crosscoder", "all", "table", "_time_ours"])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("--eval-windows", type=int, default=64, help="evaluation-half windows for FVU/L0/dead")
    ap.add_argument("--lm-windows", type=int, default=16, help="evaluation-half windows for the spliced losses")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--widths", type=_ints, default=[4608, 18432])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--sparsify-batches", type=_ints, default=[4096, 65536],
                    help="eai-sparsify tokens per step: ours (4096) and its CLI default (32 x 2048)")
    ap.add_argument("--sparsify-lr-mults", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 0.5, 2.0],
                    help="extra eai-sparsify runs at batch 4096 with its learning rate times these")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cc-tokens", type=int, default=150_000, help="paired tokens for the crosscoder")
    ap.add_argument("--cc-width", type=int, default=4608)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--time-steps", type=int, default=16, help="steps per throughput round")
    ap.add_argument("--results", type=Path, default=None,
                    help="results JSON (default: dictionaries.json for the 500k budget, else dictionaries_<N>k.json)")
    a = ap.parse_args(argv)
    if a.results is None:
        a.results = RESULTS if a.tokens == DEFAULT_TOKENS else RESULTS.with_name(f"dictionaries_{a.tokens // 1000}k.json")
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    if a.phase == "table":
        print(table(results))
        return 0
    run = Run.for_main(__file__, argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(a.threads)
    if a.phase == "_time_ours":
        _time_ours(a)
        return 0

    def save() -> None:
        results["_meta"] = run.meta(peers={"eai-sparsify": "1.3.3"}, layer=a.layer, tokens=a.tokens, k=a.k)
        write_json(a.results, results)

    if a.phase in ("harvest", "all") and ("harvest" not in results or a.redo):
        lb = load_average()
        results["harvest"] = {**harvest_phase(a, print), "provenance": run.entry(lb)}
        save()
    kinds = [k for k in a.kinds.split(",") if k]
    # per width: our TopK and eai-sparsify's runs back to back (their throughputs are compared, and
    # the machine's load drifts), then our other kinds
    jobs: list[tuple[str, str, int, int | None, float]] = []
    for w in a.widths:
        if a.phase in ("ours", "all") and "topk" in kinds:
            jobs.append(("ours", "topk", w, None, 1.0))
        if a.phase in ("sparsify", "all"):
            jobs += [("sparsify", "topk", w, b, 1.0) for b in a.sparsify_batches]
            # its learning rate at half and twice its default (ours was chosen on the training stream)
            jobs += [("sparsify", "topk", w, 4096, m) for m in a.sparsify_lr_mults if m != 1]
        if a.phase in ("ours", "all"):
            jobs += [("ours", kd, w, None, 1.0) for kd in kinds if kd != "topk"]
    for lib, kind, w, batch, mult in jobs:
        k = key(lib, kind, w, batch, mult)
        if k in results and not a.redo:
            continue
        lb = load_average()
        entry = ours_phase(a, kind, w) if lib == "ours" else sparsify_phase(a, w, batch, mult)
        results[k] = {**entry, "provenance": run.entry(lb)}
        print(k, f"{entry['train']['tokens_per_s']:.0f} tok/s", flush=True)
        save()
    if a.phase in ("throughput", "all"):
        for w in a.widths:
            k = f"throughput|{w}"
            if k in results and not a.redo:
                continue
            results[k] = {**throughput_phase(a, w), "provenance": run.entry(load_average())}
            save()
    if a.phase in ("eval", "all"):
        from sparsetorch.data.llm import load_causal_lm
        from sparsetorch.data.text import eval_windows
        from sparsetorch.dictionaries import ActivationStore

        model, tok = load_causal_lm("smollm2", progress=False)
        lm_windows = eval_windows(tok, num_windows=a.lm_windows)
        store = ActivationStore(CACHE / "eval")
        baseline: dict = {}
        for k in sorted(k for k in results if "|" in k and not k.startswith("throughput")):
            if "eval" in results[k] and not a.redo:
                continue
            results[k]["eval"] = eval_phase(results[k], model, store, lm_windows, a.layer, baseline,
                                             train_dir(a.tokens))
            print(k, {m: round(v, 4) for m, v in results[k]["eval"].items()}, flush=True)
            save()
    if a.phase in ("crosscoder", "all") and ("crosscoder" not in results or a.redo):
        lb = load_average()
        results["crosscoder"] = {**crosscoder_phase(a), "provenance": run.entry(lb)}
        save()
        print(json.dumps(results["crosscoder"]["patch"], indent=1))
    results["verdict"] = verdict(results, sorted({int(k.split("|")[2]) for k in results
                                                  if "|" in k and not k.startswith("throughput")}))
    save()
    print(table(results))
    print(json.dumps(results["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
