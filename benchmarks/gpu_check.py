"""The library's CUDA paths, checked and timed on a lent GPU in one short run.

CI has no GPU, so the guarded CUDA code (the 2:4 ``semi_structured`` kernel, one-shot pruning,
fine-tuning under bf16 autocast, the fused losses, checkpoints and ``sparsify_for_inference`` on
a CUDA model) is only exercised when a session is lent a GPU machine. This script does all of
it in one call (a few minutes), each check against a definition, not against our own output:

(a) checks: Wanda 50% (exactly half of each row zero), SparseGPT 2:4 (exactly 2 of every 4
    kept), KD fine-tuning under bf16 autocast with the masks still exact afterwards, the fused
    losses' gradients vs the written-out formulas, a compressed checkpoint round trip, and
    ``sparsify_for_inference`` on a 2:4 fp16 model (outputs vs the dense model);
(b) timing: ``F.linear`` dense vs 2:4 ``semi_structured`` for LLM layer shapes (SmolLM2-135M,
    Llama-7B, Llama-70B MLP) at 1..8192 tokens, fp16 and bf16, CUDA-event medians, inputs
    rotated so the cache does not flatter either side;
(c) end to end: a random-init Llama with 7B-sized layers (4 blocks), 2:4 magnitude-pruned,
    dense vs ``sparsify_for_inference``: prefill of 2048 tokens and decode steps.

    python benchmarks/gpu_check.py                 # on the GPU machine (writes --out)
    python benchmarks/gpu_check.py --device cpu --quick   # dry run of the checks here

Writes ``benchmarks/results/gpu_check.json`` (or ``--out``) with provenance; the GPU machine has
no git checkout, so ``--commit`` records the commit the working tree was sent from.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from _provenance import Run, write_json  # noqa: E402

import sparsetorch  # noqa: E402
from sparsetorch.inference import sparsify_for_inference  # noqa: E402

OUT = HERE / "results" / "gpu_check.json"
#: (in, out) of nn.Linear, i.e. in -> out
SHAPES = {
    "smollm2 mlp up 576->1536": (576, 1536),
    "smollm2 mlp down 1536->576": (1536, 576),
    "llama7b attn 4096->4096": (4096, 4096),
    "llama7b mlp up 4096->11008": (4096, 11008),
    "llama7b mlp down 11008->4096": (11008, 4096),
    "llama70b mlp up 8192->28672": (8192, 28672),
}
TOKENS = [1, 16, 128, 2048, 8192]


def _tiny_llama(device: str, hidden: int = 256, layers: int = 2, inter: int = 512, vocab: int = 1024,
                heads: int = 4, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def _nm_ok(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most n non-zeros in every group of m consecutive inputs (the 2:4 definition)."""
    return bool(((w.reshape(-1, m) != 0).sum(-1) <= n).all())


# ---------------------------------------------------------------- (a) checks

def check_wanda(device: str) -> dict[str, Any]:
    model = _tiny_llama(device)
    calib = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(1))
    rep = sparsetorch.prune(model, "wanda", 0.5, calibration=calib)
    rep.masks.verify(model)
    worst = 0.0
    for w in _linear_weights(model).values():
        zeros = (w == 0).float().mean(1)  # Wanda compares within each output row
        worst = max(worst, float((zeros - 0.5).abs().max()))
    assert worst <= 1.0 / 256, f"a row is {worst:.4f} away from 50% zeros"
    assert all(m.device.type == torch.device(device).type or m.device.type == "cpu"
               for m in rep.masks.masks.values())
    return {"layers": len(rep.masks.masks), "worst_row_deviation": worst}


def check_sparsegpt_24_and_finetune(device: str) -> dict[str, Any]:
    from sparsetorch.finetune import finetune

    model = _tiny_llama(device)
    teacher = copy.deepcopy(model)
    calib = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(2))
    rep = sparsetorch.prune(model, "sparsegpt", None, "2:4", calibration=calib)
    ws = _linear_weights(model)
    assert all(_nm_ok(w) for w in ws.values()), "a weight breaks 2:4 after SparseGPT"
    kept = {n: bool((m.reshape(-1, 4).sum(-1) == 2).all()) for n, m in rep.masks.masks.items()}
    assert all(kept.values()), f"a 2:4 mask keeps other than 2 of 4: {kept}"
    data = torch.randint(0, 1024, (16, 64), generator=torch.Generator().manual_seed(3))
    res = finetune(model, rep.masks, data, teacher=teacher, loss="kd", steps=6, lr=1e-3,
                   batch_size=4, bf16="auto", progress=False)
    rep.masks.verify(model)
    assert all(_nm_ok(w) for w in _linear_weights(model).values()), "2:4 lost in fine-tuning"
    moved = any(not torch.equal(a, b) for a, b in zip(model.parameters(), teacher.parameters()))
    assert moved, "fine-tuning changed nothing"
    d = res.to_dict() if hasattr(res, "to_dict") else {}
    losses = d.get("losses") or getattr(res, "losses", None)
    return {"bf16": d.get("bf16", getattr(res, "bf16", None)),
            "first_last_loss": [float(losses[0]), float(losses[-1])] if losses else None}


def check_losses(device: str) -> dict[str, Any]:
    from sparsetorch.finetune.losses import causal_ce, kd_kl

    g = torch.Generator(device="cpu").manual_seed(4)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(3, 17, 4099, generator=g).to(device, dtype).requires_grad_()
        t = torch.randint(0, 4099, (3, 17), generator=g).to(device)
        loss = causal_ce(z, t)
        loss.backward()
        zz, tt = z.detach().float()[:, :-1].reshape(-1, 4099), t[:, 1:].reshape(-1)
        ref = F.cross_entropy(zz, tt)
        gref = torch.zeros_like(z, dtype=torch.float32)
        gref[:, :-1] = ((zz.softmax(-1) - F.one_hot(tt, 4099)) / tt.numel()).reshape(3, 16, 4099)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err_l = abs(loss.item() - ref.item()) / ref.item()
        err_g = float((z.grad.float() - gref).norm() / gref.norm())
        assert err_l < tol and err_g < tol * 5, (dtype, err_l, err_g)
        s = torch.randn(2, 9, 4099, generator=g).to(device, dtype).requires_grad_()
        tch = torch.randn(2, 9, 4099, generator=g).to(device, dtype)
        T = 2.0
        kl = kd_kl(s, tch, temperature=T)
        kl.backward()
        ps, pt = (s.detach().float() / T).softmax(-1), (tch.float() / T).softmax(-1)
        n = 2 * 9
        ref_kl = (pt * (pt.log() - ps.log())).sum() / n * T * T
        gk = T / n * (ps - pt)
        err_kl = abs(kl.item() - ref_kl.item()) / max(ref_kl.item(), 1e-6)
        err_gk = float((s.grad.float() - gk).norm() / gk.norm())
        assert err_kl < tol * 5 and err_gk < tol * 5, (dtype, err_kl, err_gk)
        out[str(dtype)] = {"ce_rel": err_l, "ce_grad_rel": err_g, "kd_rel": err_kl, "kd_grad_rel": err_gk}
    return out


def check_checkpoint(device: str) -> dict[str, Any]:
    model = _tiny_llama(device)
    rep = sparsetorch.prune(model, "magnitude", None, "2:4")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        sparsetorch.save(model, path, masks=rep.masks)
        size = os.path.getsize(path)
        back, masks = sparsetorch.load(path)
    sd, sd2 = model.state_dict(), back.state_dict()
    bad = [k for k in sd if not torch.equal(sd[k].cpu(), sd2[k].cpu())]
    assert not bad, f"tensors differ after load: {bad[:3]}"
    assert set(masks.masks) == set(rep.masks.masks)
    return {"bytes": size, "dense_bytes": sum(v.numel() * v.element_size() for v in sd.values())}


def check_sparsify(device: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    # on the GPU, layers large enough for the kernel choice to matter; on the CPU (the dry run
    # that the unit test does) small ones: only the plumbing is checked there
    model = (_tiny_llama(device, hidden=1024, inter=4096, layers=2, heads=8, dtype=dtype) if cuda
             else _tiny_llama(device, hidden=128, inter=256, layers=1, heads=4, dtype=dtype))
    sparsetorch.prune(model, "magnitude", None, "2:4")
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 1024, (1, 256 if cuda else 16), generator=torch.Generator().manual_seed(5)).to(device)
    rep = sparsify_for_inference(model, batch_size=ids.shape[1], example_input=lambda: model(input_ids=ids))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float()
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-2, f"sparsified logits differ from dense by {rel:.2e}"
    return {"kernels": rep.kernel_counts(), "linear_speedup": rep.linear_speedup, "logits_rel_err": rel,
            "reverted": len(rep.reverted)}


def run_checks(device: str) -> list[dict[str, Any]]:
    checks: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
        ("wanda 50% on the device", check_wanda),
        ("sparsegpt 2:4 + KD fine-tune (bf16 auto)", check_sparsegpt_24_and_finetune),
        ("fused CE / KD losses vs formulas", check_losses),
        ("compressed checkpoint round trip", check_checkpoint),
        ("sparsify_for_inference on a 2:4 model", check_sparsify),
    ]
    rows = []
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(device), True
        except Exception as exc:  # noqa: BLE001 - a failed check is recorded, the run goes on
            detail, ok = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}, False
        rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), **detail})
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({rows[-1]['seconds']} s) {detail.get('error', '')}", flush=True)
    return rows


# ---------------------------------------------------------------- (b) timing


def _cuda_median_ms(fn: Callable[[int], object], n_inputs: int, reps: int = 30, warmup: int = 5) -> float:
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % n_inputs)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured as a CUDA graph (after 3 warm-up calls on a side stream, as torch asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _graph_ms(fn: Callable[[], object], reps: int = 30) -> float | str:
    """Median ms of replaying ``fn`` as a CUDA graph: the GPU time without per-call host work."""
    try:
        g = _graph(fn)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        return f"capture failed: {type(exc).__name__}: {exc}"[:200]
    return _cuda_median_ms(lambda i: g.replay(), 1, reps=reps)


def bench_linear(quick: bool) -> list[dict[str, Any]]:
    from sparsetorch.inference.kernels import KERNELS

    k = KERNELS["semi_structured"]
    rows = []
    dtypes = [torch.float16, torch.bfloat16] if not quick else [torch.float16]
    for label, (inn, out) in SHAPES.items():
        for dtype in dtypes:
            g = torch.Generator(device="cuda").manual_seed(0)
            w = torch.randn(out, inn, device="cuda", dtype=dtype, generator=g)
            keep = w.reshape(-1, 4).abs().argsort(-1, descending=True).argsort(-1) < 2  # top-2 of 4
            w = (w.reshape(-1, 4) * keep).reshape(out, inn)
            assert _nm_ok(w)
            packed = k.pack(w)
            for tokens in TOKENS:
                n_in = 4
                xs = [torch.randn(tokens, inn, device="cuda", dtype=dtype, generator=g) for _ in range(n_in)]
                y = k.matmul(xs[0], packed, None, out).float()
                ref = F.linear(xs[0].double(), w.double()).float()
                rel = float((y - ref).norm() / ref.norm())
                dense = _cuda_median_ms(lambda i, xs=xs, w=w: F.linear(xs[i], w), n_in)
                sparse = _cuda_median_ms(lambda i, xs=xs, p=packed, o=out: k.matmul(xs[i], p, None, o), n_in)
                flop = 2.0 * tokens * inn * out
                dg = _graph_ms(lambda xs=xs, w=w: F.linear(xs[0], w))
                sg = _graph_ms(lambda xs=xs, p=packed, o=out: k.matmul(xs[0], p, None, o))
                graphed = isinstance(dg, float) and isinstance(sg, float)
                rows.append({"layer": label, "in": inn, "out": out, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                             "dense_ms": dense, "semi_structured_ms": sparse, "speedup": dense / sparse,
                             "dense_graph_ms": dg, "semi_structured_graph_ms": sg,
                             "graph_speedup": dg / sg if graphed else None,
                             "dense_tflops": flop / dense / 1e9, "rel_err_vs_fp64": rel})
                del xs
            del w, packed
            torch.cuda.empty_cache()
    return rows


def bench_model(quick: bool) -> dict[str, Any]:
    layers = 2 if quick else 4
    model = _tiny_llama("cuda", hidden=4096, inter=11008, layers=layers, heads=32, vocab=32000, dtype=torch.float16)
    sparsetorch.prune(model, "magnitude", None, "2:4")
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    prefill = torch.randint(0, 32000, (1, 2048), generator=g).cuda()
    out: dict[str, Any] = {"blocks": layers, "hidden": 4096, "intermediate": 11008, "dtype": "float16"}

    def fwd(m: torch.nn.Module, ids: torch.Tensor) -> Callable[[int], object]:
        return lambda i: m(input_ids=ids)

    with torch.no_grad():
        rep = sparsify_for_inference(model, batch_size=2048, example_input=lambda: model(input_ids=prefill))
        out["prefill_kernels"] = rep.kernel_counts()
        out["prefill_reverted"] = len(rep.reverted)
        d = _cuda_median_ms(fwd(dense, prefill), 1, reps=10)
        s = _cuda_median_ms(fwd(model, prefill), 1, reps=10)
        out["prefill_2048"] = {"dense_ms": d, "sparsified_ms": s, "speedup": d / s}
        # decode: one token per sequence, 16 sequences, no cache (Linear work of a decode step)
        step = torch.randint(0, 32000, (16, 1), generator=g).cuda()
        d = _cuda_median_ms(fwd(dense, step), 1)
        s = _cuda_median_ms(fwd(model, step), 1)
        out["step_16x1"] = {"dense_ms": d, "sparsified_ms": s, "speedup": d / s}
        a, b = model(input_ids=prefill).logits.float(), dense(input_ids=prefill).logits.float()
        out["logits_rel_err"] = float((a - b).norm() / b.norm())
        # every targeted layer forced to 2:4 (a timer that always prefers it), whole forward
        # replayed as a CUDA graph: what the GPU kernels give once per-call host work is gone
        forced = copy.deepcopy(dense)
        rep = sparsify_for_inference(forced, batch_size=2048, kernels=["semi_structured"], check_model=False,
                                     timer=lambda name, fn: 0.0 if name == "semi_structured" else 1.0)
        out["forced_kernels"] = rep.kernel_counts()
        a = forced(input_ids=prefill).logits.float()
        out["forced_logits_rel_err"] = float((a - b).norm() / b.norm())
        for key, ids in (("prefill_2048_graph", prefill), ("step_16x1_graph", step)):
            d = _graph_ms(lambda ids=ids: dense(input_ids=ids, use_cache=False), reps=10)
            s = _graph_ms(lambda ids=ids: forced(input_ids=ids, use_cache=False), reps=10)
            out[key] = {"dense_ms": d, "all_2to4_ms": s,
                        "speedup": d / s if isinstance(d, float) and isinstance(s, float) else None}
    return out


def profile_model() -> dict[str, Any]:
    """Kernel-time tables (torch.profiler) of a 2-block 7B-sized Llama prefill of 2048 tokens:
    dense vs every targeted layer forced to 2:4, to see where the whole forward's time goes."""
    from torch.profiler import ProfilerActivity, profile

    dense = _tiny_llama("cuda", hidden=4096, inter=11008, layers=2, heads=32, vocab=32000, dtype=torch.float16)
    sparsetorch.prune(dense, "magnitude", None, "2:4")
    forced = copy.deepcopy(dense)
    sparsify_for_inference(forced, batch_size=2048, kernels=["semi_structured"], check_model=False,
                           timer=lambda name, fn: 0.0 if name == "semi_structured" else 1.0)
    ids = torch.randint(0, 32000, (1, 2048), generator=torch.Generator().manual_seed(7)).cuda()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, m in (("dense", dense), ("all_2to4", forced)):
            for _ in range(3):
                m(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    m(input_ids=ids, use_cache=False)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
            out[name] = table
            print(name, "\n", table, flush=True)
    return out


def probe_semi_structured() -> list[dict[str, Any]]:
    """Where the time of a 2:4 matmul goes: the torch subclass vs cuSPARSELt called directly.

    Variants per shape: ``F.linear`` on the ``to_sparse_semi_structured`` subclass (what the
    ``semi_structured`` kernel does), its host time per call, ``torch._cslt_sparse_mm`` on a
    compressed weight (default algorithm, and the one ``_cslt_sparse_mm_search`` picks), the
    CUTLASS subclass, and a CUDA-graph replay of the subclass call (no host overhead).
    """
    rows = []
    for inn, out, tokens in ((4096, 11008, 16), (4096, 11008, 2048), (4096, 11008, 8192), (8192, 28672, 8192)):
        rows.append(_probe_one(inn, out, tokens))
        torch.cuda.empty_cache()
    return rows


def _probe_one(inn: int, out: int, tokens: int) -> dict[str, Any]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(out, inn, device="cuda", dtype=torch.float16, generator=g)
    keep = w.reshape(-1, 4).abs().argsort(-1, descending=True).argsort(-1) < 2
    w = (w.reshape(-1, 4) * keep).reshape(out, inn)
    x = torch.randn(tokens, inn, device="cuda", dtype=torch.float16, generator=g)
    ref = F.linear(x, w).float()
    r: dict[str, Any] = {"in": inn, "out": out, "tokens": tokens}

    def rel(y: torch.Tensor) -> float:
        return float((y.float() - ref).norm() / ref.norm())

    r["dense_ms"] = _cuda_median_ms(lambda i: F.linear(x, w), 1)
    sub = to_sparse_semi_structured(w)
    r["subclass_type"] = type(sub).__name__
    r["subclass_ms"] = _cuda_median_ms(lambda i: F.linear(x, sub), 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        F.linear(x, sub)
    host = (time.perf_counter() - t0) / 20
    torch.cuda.synchronize()
    r["subclass_host_ms_per_call"] = host * 1e3
    try:
        comp = torch._cslt_compress(w)
        y = torch._cslt_sparse_mm(comp, x.t(), transpose_result=True)
        r["cslt_rel"] = rel(y)
        r["cslt_ms"] = _cuda_median_ms(lambda i: torch._cslt_sparse_mm(comp, x.t(), transpose_result=True), 1)
        found = torch._cslt_sparse_mm_search(comp, x.t())
        alg = found[0] if isinstance(found, tuple) else int(found)
        r["cslt_search"] = found if not isinstance(found, tuple) else list(found)
        r["cslt_best_ms"] = _cuda_median_ms(
            lambda i: torch._cslt_sparse_mm(comp, x.t(), transpose_result=True, alg_id=alg), 1)
    except Exception as exc:  # noqa: BLE001
        r["cslt_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        cut = to_sparse_semi_structured(w)
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        r["cutlass_rel"] = rel(F.linear(x, cut))
        r["cutlass_ms"] = _cuda_median_ms(lambda i: F.linear(x, cut), 1)
    except Exception as exc:  # noqa: BLE001
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        r["cutlass_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                F.linear(x, sub)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            F.linear(x, sub)
        r["subclass_graph_ms"] = _cuda_median_ms(lambda i: graph.replay(), 1)
    except Exception as exc:  # noqa: BLE001
        r["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if tokens == 2048:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                F.linear(x, sub)
            torch.cuda.synchronize()
        r["profile"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=14)
        print(r["profile"], flush=True)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "profile"}, flush=True)
    return r


def run_pytest_gpu() -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/inference/test_sparsify.py", "-k", "gpu"],
                       capture_output=True, text=True, cwd=HERE.parent, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    return {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main("benchmarks/gpu_check.py", argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--probe", action="store_true", help="only the 2:4 timing probe (where the time goes)")
    ap.add_argument("--profile-model", action="store_true", help="only the profiler tables of a 2:4 model")
    ap.add_argument("--commit", default=None, help="commit the tree was sent from (the GPU machine's .git may be stale)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a dry run of the checks", file=sys.stderr)
        return 2
    info: dict[str, Any] = {"device": args.device}
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    cusparselt=bool(getattr(torch.backends, "cusparselt", None)
                                    and torch.backends.cusparselt.is_available()),
                    cuda=torch.version.cuda)
    print(info, flush=True)
    if args.probe or args.profile_model:
        result = {"info": info, **({"probe": probe_semi_structured()} if args.probe else {}),
                  **({"profile_model": profile_model()} if args.profile_model else {})}
        result["_meta"] = run.meta(**info)
        if args.commit:
            result["_meta"]["commit_seen_there"], result["_meta"]["commit"] = result["_meta"].get("commit"), args.commit
            result["_meta"]["dirty"], result["_meta"]["dirty_paths"] = None, []
        write_json(args.out, result)
        return 0
    result = {"info": info, "checks": run_checks(args.device)}
    if cuda:
        result["pytest_gpu"] = run_pytest_gpu()
        print("pytest -k gpu rc", result["pytest_gpu"]["rc"], result["pytest_gpu"]["tail"][-300:], flush=True)
        for key, fn in (("linear", bench_linear), ("model", bench_model)):
            try:
                result[key] = fn(args.quick)
            except Exception as exc:  # noqa: BLE001 - recorded; the other part still runs
                result[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                print(result[key]["traceback"], flush=True)
    meta = run.meta(**info)
    if args.commit:  # the GPU machine's copy of .git may be stale or absent: trust the sender
        meta["commit_seen_there"], meta["commit"] = meta.get("commit"), args.commit
        meta["dirty"], meta["dirty_paths"] = None, []  # not knowable there; commit before sending
    result["_meta"] = meta
    write_json(args.out, result)
    lin = result.get("linear")
    if isinstance(lin, list):
        print(f"\n{'layer':30s} {'dtype':8s} {'tokens':>6s} {'dense ms':>9s} {'2:4 ms':>9s} {'eager':>6s} "
              f"{'graph d':>8s} {'graph 2:4':>9s} {'graph':>6s}")
        for r in lin:
            gs = f"{r['graph_speedup']:5.2f}x" if r["graph_speedup"] else "  n/a"
            gd = f"{r['dense_graph_ms']:8.4f}" if isinstance(r["dense_graph_ms"], float) else "     n/a"
            g4 = f"{r['semi_structured_graph_ms']:9.4f}" if isinstance(r["semi_structured_graph_ms"], float) else "      n/a"
            print(f"{r['layer']:30s} {r['dtype']:8s} {r['tokens']:6d} {r['dense_ms']:9.4f} "
                  f"{r['semi_structured_ms']:9.4f} {r['speedup']:5.2f}x {gd} {g4} {gs}")
    if isinstance(result.get("model"), dict):
        print("model:", {k: v for k, v in result["model"].items() if k != "traceback"})
    failed = [c["check"] for c in result["checks"] if not c["ok"]]
    print("checks failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
