"""Sparse backpropagation (PockEngine-style sparse updates) against full fine-tuning and LoRA.

LLM: SmolLM2-135M (fp32, de-quantized GGUF) pruned once by SparseGPT to 2:4 (the recovery
issue's cached ``sparsegpt@2:4`` start, built by ``finetune_llm.pruned_start``; ``--start``), fine-tuned
with the recovery benchmark's protocol by default -- KD from the dense model (``--loss kd``, the
teacher's forward counted in every step), 4 windows x 512 tokens per step of the python3.11-doc
sections (never the evaluation half) -- for a fixed number of steps per arm (40; ``--loss ce``,
``--batch``, ``--seq-len`` change it); E16 perplexity (first
16 windows x 512 tokens of the evaluation half) before and after. Arms: full fine-tuning, sparse
LoRA r=16 (``finetune(lora=16)``, lr 1e-3 as the library default), and sparse-update schemes
(``finetune(update=SPEC)``) at the full fine-tuning lr (``--update-lr`` to change). The
tokenized training windows and the E16 before are cached under ``~/.cache/sparsetorch``.

CNN: the Fashion-MNIST ``SmallCNN`` trained for one epoch on 20k images, pruned by magnitude to
80%, then fine-tuned
the same way; the metric is test accuracy gain (points).

Each arm runs in its own process (so peak RSS is that arm's), and records: seconds per step
(median of the run's steps after the first), one measured step (:func:`measure_step`: forward /
backward seconds, bytes saved for backward, gradient + AdamW-state bytes), peak RSS (VmHWM, taken before the evaluation), the gain,
and the machine load before and after. Arms run in the listed order, LLM and CNN arms alternating.
Because another job's load can change from one arm to the next (a 2-core machine shared with
other work), the step times are also taken round-robin in one process (``--paired-rounds``:
one forward + backward + AdamW step of each arm per round, the first arm rotating, medians),
so that every arm sees the same load; the target uses these ratios when present
(``--paired-only`` adds them to an existing results file).

    .venv/bin/python benchmarks/sparse_backprop.py --update-lr 3e-4   # default: about 70 min on 2 idle cores
    .venv/bin/python benchmarks/sparse_backprop.py --loss ce --batch 2 --seq-len 256 --steps 5   # the first runs' setting
    .venv/bin/python benchmarks/sparse_backprop.py --table

Target (issue 14): one sparse-update scheme reaches >= 80% of full fine-tuning's perplexity gain
at <= 0.4x its step time and <= 0.25x its gradient + optimizer memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sparsetorch import MaskSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sparse_backprop.json"
LLM_ARMS = {
    "full": None,
    "lora r=16": "lora",
    "last:2": "last:2",
    "last:4": "last:4",
    "last:8": "last:8",
    "bias,norm": "bias,norm",
    "last:8 channels 1/8 attn+up": "last:8,channels:0.125@q_proj|k_proj|v_proj|o_proj|up_proj",
    "last:4 attn+up+norm (PockEngine)": "last:4+q_proj,k_proj,v_proj,o_proj,up_proj,norm",
}
#: the default LLM arms (the PockEngine-style scheme only with --llm-arms)
DEFAULT_LLM = [k for k in LLM_ARMS if "PockEngine" not in k]
CNN_ARMS = {
    "full": None,
    "last:1 (fc2)": "last:1",
    "last:2 (fc1,fc2)": "last:2",
    "bias": "bias",
    "fc2 + channels 1/8 fc1": "fc2,channels:0.125@fc1",
    "bias + fc2 + channels 1/8 fc1": "bias,fc2,channels:0.125@fc1",
}
TARGET = {"gain": 0.8, "time": 0.4, "memory": 0.25}
CACHE = Path(os.environ.get("SPARSETORCH_CACHE_DIR", Path.home() / ".cache" / "sparsetorch")) / "sparse-backprop"


def llm_arm(arm: str) -> tuple[str | None, float | None]:
    """An LLM arm's (spec, lr): a name of :data:`LLM_ARMS` or any sparse-update spec string
    (``last:8+norm``), optionally followed by `` lr=X`` (that arm's own lr; a per-arm lr sweep puts
    the same scheme in twice: ``"full lr=3e-4;full;last:4 lr=1e-3"``). A spec the model cannot
    resolve fails that arm's worker with the library's own error."""
    name, _, lr = arm.strip().partition(" lr=")
    spec = LLM_ARMS.get(name, name)
    return spec, (float(lr) if lr else None)


# ------------------------------------------------------------------------------------- workers
def _median_step(stamps: list[float]) -> float:
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(d[1:] if len(d) > 2 else d)


def worker_llm(arm: str, a: argparse.Namespace) -> dict:
    import torch
    from finetune_llm import pruned_start
    from safetensors.torch import load_file

    from sparsetorch.evaluate import perplexity
    from sparsetorch.finetune import apply_update, finetune, measure_step
    from sparsetorch.finetune.sparse_update import peak_rss_mb

    torch.set_num_threads(a.threads)
    model, masks, _tok, _ = pruned_start(a.start)
    teacher = _teacher(a)
    data = load_file(a.data_file)
    train, e16 = data["train"], data["e16"]
    spec, arm_lr = llm_arm(arm)
    lora = 16 if spec == "lora" else None
    update = None if spec in (None, "lora") else spec
    lr = arm_lr or (a.lora_lr if lora else a.lr if update is None else (a.update_lr or a.lr))
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = finetune(model, masks, train, loss=a.loss, teacher=teacher, steps=a.steps, lr=lr, batch_size=a.batch,
                   bf16=False,
                   progress=False, seed=a.seed, lora=lora, update=update, warmup_steps=0,
                   on_step=lambda done, r, m: stamps.append(time.perf_counter()))
    stamps.insert(0, t0)
    rss_train = peak_rss_mb()  # before the evaluation (its logits are larger than a training batch's)
    masks.verify(model)
    ppl = perplexity(model, windows=e16, max_windows=None, progress=False)
    # one measured step (after the run: weights change, the evaluation is done)
    ids = train[: a.batch]

    def loss(m):
        return _loss(m, teacher, ids)

    if lora:
        from sparsetorch.finetune import add_sparse_lora

        prepared = add_sparse_lora(model, masks, r=16)
    elif update:
        prepared = model
        apply_update(model, update, masks)
    else:
        prepared = model
    cost = measure_step(prepared, loss, repeats=1)
    return {"arm": arm, "spec": spec, "lr": lr, "steps": res.steps, "s_per_step": _median_step(stamps),
            "train_seconds": res.seconds, "losses": res.losses, "trainable_params": res.trainable_params,
            "ppl_e16_after": ppl, "step": cost.to_dict(), "peak_rss_mb": rss_train,
            "peak_rss_mb_with_eval": peak_rss_mb()}


def _teacher(a: argparse.Namespace) -> torch.nn.Module | None:
    """The dense model as KD teacher (``--loss kd``, the recovery benchmark's protocol), else None."""
    if a.loss == "ce":
        return None
    from sparsetorch.data.llm import load_causal_lm

    teacher, _ = load_causal_lm("smollm2", progress=False)
    return teacher.eval().requires_grad_(False)


def _loss(m: torch.nn.Module, teacher: torch.nn.Module | None, ids: torch.Tensor) -> torch.Tensor:
    """One batch's training loss as the arm's run computes it: CE, or (``teacher``) the KL to the
    dense model's next-token distribution, the teacher's forward included (it is part of a step)."""
    import torch

    from sparsetorch.finetune import causal_ce
    from sparsetorch.finetune.losses import kd_kl

    logits = m(input_ids=ids, use_cache=False).logits
    if teacher is None:
        return causal_ce(logits, ids)
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False).logits
    return kd_kl(logits, t)


def round_robin(steps: dict[str, Callable[[int], object]], rounds: int) -> dict:
    """Time one call of each arm's ``step(round)`` per round, the first arm rotating each round.

    Round 0 warms up (first-step allocations) and is not counted; ``s_per_step`` is the median of
    the counted rounds. Every arm sees the same machine load, which a separate process per arm
    cannot promise on a shared machine. Serves both :func:`worker_paired` (LLM) and
    :func:`worker_paired_cnn` (CNN): only the steps differ."""
    arms = list(steps)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds + 1):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            t = time.perf_counter()
            steps[arm](r)
            if r:
                times[arm].append(time.perf_counter() - t)
    return {"rounds": rounds, "s_per_step": {k: statistics.median(v) for k, v in times.items()},
            "samples": times}


def _arm_steps(base: torch.nn.Module, specs: dict[str, str | None], masks: MaskSet,
               loss: Callable[[torch.nn.Module, int], torch.Tensor]) -> dict[str, Callable[[int], None]]:
    """One AdamW step callable per arm, each on its own copy of ``base`` prepared by its spec
    (``"lora"``: sparse LoRA r=16; another string: a sparse-update scheme; ``None``: full).

    ``loss(model, round)`` gives the round's loss; the lr is tiny so that timing rounds barely
    move the weights."""
    import copy

    import torch

    from sparsetorch.finetune import add_sparse_lora, apply_update

    def step_of(m: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[int], None]:
        def step(r: int) -> None:
            loss(m, r).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {}
    for arm, spec in specs.items():
        m = copy.deepcopy(base)
        if spec == "lora":
            m = add_sparse_lora(m, masks, r=16)
        elif spec is not None:
            apply_update(m, spec, masks)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-12)
        steps[arm] = step_of(m.train(), opt)
    return steps


def worker_paired(arms: list[str], a: argparse.Namespace) -> dict:
    """Step time of every LLM arm in one process, round-robin (:func:`round_robin`)."""
    import torch
    from finetune_llm import pruned_start
    from safetensors.torch import load_file


    torch.set_num_threads(a.threads)
    base, masks, _tok, _ = pruned_start(a.start)
    teacher = _teacher(a)
    train = load_file(a.data_file)["train"]

    def loss(m: torch.nn.Module, r: int) -> torch.Tensor:
        return _loss(m, teacher, train[(r * a.batch) % train.shape[0]:][: a.batch])

    specs = {arm: llm_arm(arm)[0] for arm in arms}
    unique = list(dict.fromkeys(specs.values()))  # an lr sweep's arms share one spec: time it once
    steps = _arm_steps(base, {str(sp): sp for sp in unique}, masks, loss)
    del base
    res = round_robin(steps, a.paired_rounds)
    res["s_per_step"] = {arm: res["s_per_step"][str(sp)] for arm, sp in specs.items()}
    return res


def worker_paired_cnn(arms: list[str], a: argparse.Namespace) -> dict:
    """The CNN arms' step times round-robin in one process (:func:`round_robin`)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from sparsetorch import MaskSet
    from sparsetorch.data.fashion_mnist import load_fashion_mnist
    from sparsetorch.models import get_model

    torch.set_num_threads(a.threads)
    state = load_file(a.data_file)
    base = get_model("cnn")
    base.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    masks = MaskSet({k[5:]: v for k, v in state.items() if k.startswith("mask.")})
    x, y = load_fashion_mnist("train", subset=a.cnn_train)

    def loss(m: torch.nn.Module, r: int) -> torch.Tensor:
        i = (r * a.cnn_batch) % (x.shape[0] - a.cnn_batch)
        return F.cross_entropy(m(x[i:i + a.cnn_batch]), y[i:i + a.cnn_batch])

    return round_robin(_arm_steps(base, {arm: CNN_ARMS[arm] for arm in arms}, masks, loss), a.paired_rounds)


def worker_cnn(arm: str, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from sparsetorch import MaskSet
    from sparsetorch.data.fashion_mnist import load_fashion_mnist
    from sparsetorch.finetune import FinetuneConfig, apply_update, measure_step, train_masked
    from sparsetorch.finetune.sparse_update import peak_rss_mb
    from sparsetorch.models import get_model

    torch.set_num_threads(a.threads)
    state = load_file(a.data_file)
    model = get_model("cnn")
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    masks = MaskSet({k[5:]: v for k, v in state.items() if k.startswith("mask.")})
    x, y = load_fashion_mnist("train", subset=a.cnn_train)
    xt, yt = load_fashion_mnist("test")
    spec = CNN_ARMS[arm]
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(x.shape[0], generator=g)

    def batch_fn(i):
        idx = order[(torch.arange(a.cnn_batch) + i * a.cnn_batch) % x.shape[0]]
        return x[idx], y[idx]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1]), b[0].shape[0]

    handle = apply_update(model, spec, masks) if spec else None
    tm = handle.masks(masks) if handle else masks
    stamps: list[float] = []
    cfg = FinetuneConfig(steps=a.cnn_steps, lr=a.cnn_lr, batch_size=a.cnn_batch, warmup_steps=0, bf16=False)
    t0 = time.perf_counter()
    res = train_masked(model, tm, batch_fn, loss_fn, cfg, progress=False, eval_before=False,
                       on_step=lambda done, r, m: stamps.append(time.perf_counter()))
    stamps.insert(0, t0)
    rss_train = peak_rss_mb()
    if handle:
        handle.merge()
    masks.verify(model)
    acc = _accuracy(model, xt, yt)
    b = batch_fn(0)
    if spec:
        apply_update(model, spec, masks)
    cost = measure_step(model, lambda m: loss_fn(m, b)[0], repeats=3)
    return {"arm": arm, "spec": spec, "lr": a.cnn_lr, "steps": res.steps, "s_per_step": _median_step(stamps),
            "trainable_params": res.trainable_params, "acc_after": acc, "step": cost.to_dict(),
            "peak_rss_mb": rss_train, "peak_rss_mb_with_eval": peak_rss_mb()}


def _accuracy(model, x, y, batch: int = 1000) -> float:  # noqa: ANN001
    import torch

    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, x.shape[0], batch))
    return hits / x.shape[0]


# -------------------------------------------------------------------------------------- parent
def prepare_llm(a: argparse.Namespace, folder: Path) -> dict:
    import torch
    from finetune_llm import pruned_start
    from safetensors.torch import load_file, save_file

    from sparsetorch.data.text import eval_windows, token_windows
    from sparsetorch.evaluate import perplexity
    from sparsetorch.finetune import python_docs_text

    torch.set_num_threads(a.threads)
    model, masks, tok, _ = pruned_start(a.start)
    cached = CACHE / f"docs-{a.seq_len}.safetensors"
    if cached.is_file():
        train = load_file(str(cached))["train"]
    else:
        train = token_windows(tok, python_docs_text(), seq_len=a.seq_len)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({"train": train.contiguous()}, str(cached))
    e16 = eval_windows(tok, 16, 512)
    before_file = CACHE / "e16-before.json"
    known = json.loads(before_file.read_text()) if before_file.is_file() else {}
    if a.start not in known:
        known[a.start] = perplexity(model, windows=e16, max_windows=None, progress=False)
        CACHE.mkdir(parents=True, exist_ok=True)
        write_json(before_file, known)
    save_file({"train": train.contiguous(), "e16": e16.contiguous()}, str(folder / "llm.safetensors"))
    return {"ppl_e16_before": known[a.start], "train_windows": int(train.shape[0]),
            "sparsity": masks.sparsity().overall}


def prepare_cnn(a: argparse.Namespace, folder: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    import sparsetorch
    from sparsetorch.data.fashion_mnist import load_fashion_mnist
    from sparsetorch.models import get_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train", subset=a.cnn_train)
    xt, yt = load_fashion_mnist("test")
    model = get_model("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(0, x.shape[0], 128):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
        opt.step()
    dense = _accuracy(model, xt, yt)
    masks = sparsetorch.prune(model, "magnitude", a.cnn_sparsity).masks
    acc = _accuracy(model, xt, yt)
    save_file({**{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
               **{f"mask.{k}": v.contiguous() for k, v in masks.masks.items()}}, str(folder / "cnn.safetensors"))
    return {"acc_dense": dense, "acc_before": acc, "sparsity": masks.sparsity().overall}


def run_worker(kind: str, arm: str, a: argparse.Namespace, folder: Path) -> dict:
    out = folder / "arm.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--arm", arm, "--data-file",
           str(folder / f"{kind}.safetensors"), "--worker-out", str(out), "--steps", str(a.steps),
           "--cnn-steps", str(a.cnn_steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--lr", str(a.lr), "--lora-lr", str(a.lora_lr), "--cnn-lr", str(a.cnn_lr),
           "--cnn-batch", str(a.cnn_batch), "--cnn-train", str(a.cnn_train), "--threads", str(a.threads),
           "--start", a.start, "--seed", str(a.seed), "--loss", a.loss] + (["--update-lr", str(a.update_lr)]
                                                                             if a.update_lr else [])
    before = load_average()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode != 0:
        print(f"arm {kind}/{arm} failed:\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"arm": arm, "failed": p.stderr[-2000:]}
    r = json.loads(out.read_text())
    r["wall_seconds"] = time.perf_counter() - t
    r["load_before"], r["load_after"] = before, load_average()
    return r


def paired(a: argparse.Namespace, folder: Path, arms: list[str], data: dict, kind: str = "llm") -> None:
    rounds = a.paired_rounds if kind == "llm" else a.cnn_paired_rounds
    print(f"round-robin step timing of {len(arms)} {kind} arms, {rounds} rounds ...", flush=True)
    out = folder / "paired.json"
    cmd = [sys.executable, __file__, "--worker", "paired" if kind == "llm" else "paired-cnn", "--arm", ";".join(arms),
           "--data-file", str(folder / f"{kind}.safetensors"), "--worker-out", str(out), "--batch", str(a.batch),
           "--cnn-batch", str(a.cnn_batch), "--cnn-train", str(a.cnn_train),
           "--threads", str(a.threads), "--start", a.start, "--paired-rounds", str(rounds), "--loss", a.loss]
    before = load_average()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"round-robin timing failed:\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
        return
    r = json.loads(out.read_text())
    data[kind]["paired_timing"] = {**r, "load_before": before, "load_after": load_average()}


def summarise(data: dict) -> None:
    """Ratios to full fine-tuning and the target verdict, in place."""
    for kind, gain_key in (("llm", "ppl"), ("cnn", "acc")):
        sec = data.get(kind)
        if not sec:
            continue
        arms = sec["arms"]
        if not any(r["spec"] is None for r in arms):
            raise SystemExit(f"the {kind} arms need a full fine-tuning arm ('full'), the reference of every ratio "
                             f"(ran: {', '.join(r['arm'] for r in arms) or 'none'}).")
        # the denominator: full fine-tuning at its best lr when several ran (a per-arm lr sweep)
        full = max((r for r in arms if r["spec"] is None), key=lambda r: r["acc_after"] if gain_key == "acc"
                   else -r["ppl_e16_after"])
        sec["full_arm"] = full["arm"]
        for r in arms:
            if gain_key == "ppl":
                r["gain"] = sec["ppl_e16_before"] - r["ppl_e16_after"]
            else:
                r["gain"] = 100 * (r["acc_after"] - sec["acc_before"])
        for r in arms:
            r["gain_ratio"] = r["gain"] / full["gain"] if full["gain"] > 0 else None
            r["time_ratio_run"] = r["s_per_step"] / full["s_per_step"]
            pt = (sec.get("paired_timing") or {}).get("s_per_step", {})
            if r["arm"] in pt and full["arm"] in pt:  # same load for every arm: the ratio the target uses
                r["s_per_step_paired"] = pt[r["arm"]]
                r["time_ratio"] = pt[r["arm"]] / pt[full["arm"]]
            else:
                r["time_ratio"] = r["time_ratio_run"]
            r["memory_ratio"] = r["step"]["grad_optimizer_bytes"] / full["step"]["grad_optimizer_bytes"]
            sparse = r["spec"] not in (None, "lora")
            r["meets_target"] = bool(sparse and r["gain_ratio"] is not None and r["gain_ratio"] >= TARGET["gain"]
                                     and r["time_ratio"] <= TARGET["time"] and r["memory_ratio"] <= TARGET["memory"])
        sec["target_met"] = any(r["meets_target"] for r in arms)
        sec["target"] = TARGET


def _protocol(sec: dict) -> str:
    """The LLM section's loss and batch shape, e.g. ``KD, 4 x 512 tokens`` (CE when not recorded)."""
    return f"{sec.get('loss', 'ce').upper()}, {sec['batch']} x {sec['seq_len']} tokens"


def table(data: dict) -> str:
    out = []
    for kind, metric in (("llm", "E16 ppl gain"), ("cnn", "acc gain (pts)")):
        sec = data.get(kind)
        if not sec:
            continue
        title = (f"SmolLM2-135M, {sec['start']}, {sec['steps']} steps, {_protocol(sec)}" if kind == "llm"
                 else f"Fashion-MNIST CNN, {sec.get('pruning', 'magnitude')}, {sec['steps']} steps")
        before = (f"E16 before {sec['ppl_e16_before']:.2f}" if kind == "llm"
                  else f"accuracy before {100 * sec['acc_before']:.2f}% (dense {100 * sec['acc_dense']:.2f}%)")
        out.append(f"**{title}** ({before}; target {'met' if sec['target_met'] else 'MISSED'})\n")
        out.append(f"| arm | trainable | s/step (run) | s/step (round-robin) | x full | backward s | saved act. MB | grad+opt MB | x full | "
                   f"peak RSS MB | {metric} | x full | target |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sec["arms"]:
            st = r["step"]
            gr = "" if r["gain_ratio"] is None else f"{r['gain_ratio']:.2f}"
            tgt = "" if r["spec"] in (None, "lora") else ("met" if r["meets_target"] else "missed")
            rr = f"{r['s_per_step_paired']:.3f}" if "s_per_step_paired" in r else ""
            out.append(f"| {r['arm']} | {r['trainable_params']:,} | {r['s_per_step']:.3f} | {rr} | {r['time_ratio']:.2f} | "
                       f"{st['backward_s']:.3f} | {st['saved_activation_bytes'] / 2**20:.1f} | "
                       f"{st['grad_optimizer_bytes'] / 2**20:.1f} | {r['memory_ratio']:.3f} | {r['peak_rss_mb']:.0f} | "
                       f"{r['gain']:.2f} | {gr} | {tgt} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per LLM arm")
    ap.add_argument("--start", default="sparsegpt@2:4", help="pruned start (finetune_llm.pruned_start), e.g. "
                    "sparsegpt@0.5, magnitude@0.5")
    ap.add_argument("--loss", choices=["ce", "kd"], default="kd", help="LLM training loss: ce, or kd (KL to the "
                    "dense SmolLM2's next-token distribution, the recovery benchmark's default; the teacher's "
                    "forward counts in every step time). The recovery protocol: --loss kd --seq-len 512 --batch 4")
    ap.add_argument("--batch", type=int, default=4, help="LLM windows per step")
    ap.add_argument("--seq-len", type=int, default=512, help="LLM training window length")
    ap.add_argument("--lr", type=float, default=1e-4, help="lr of full fine-tuning and of every sparse update")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--update-lr", type=float, help="lr of the sparse-update arms (default: --lr)")
    ap.add_argument("--cnn-steps", type=int, default=150)
    ap.add_argument("--cnn-batch", type=int, default=128)
    ap.add_argument("--cnn-lr", type=float, default=1e-3)
    ap.add_argument("--cnn-train", type=int, default=20000, help="Fashion-MNIST training examples")
    ap.add_argument("--cnn-sparsity", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the LLM arms' order of training windows (a rerun at "
                    "another seed checks settings chosen at seed 0)")
    ap.add_argument("--llm-arms", default=";".join(DEFAULT_LLM), help="';'-separated arm names")
    ap.add_argument("--cnn-arms", default=";".join(CNN_ARMS), help="';'-separated arm names")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--paired-rounds", type=int, default=3, help="rounds of the round-robin LLM step timing "
                    "(0: none)")
    ap.add_argument("--paired-only", action="store_true", help="only add the round-robin step timing to the "
                    "LLM section of an existing --results file")
    ap.add_argument("--cnn-paired-rounds", type=int, default=40, help="rounds of the round-robin CNN step timing")
    ap.add_argument("--worker", choices=["llm", "cnn", "paired", "paired-cnn"], help=argparse.SUPPRESS)
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker in ("paired", "paired-cnn"):
        fn = worker_paired if a.worker == "paired" else worker_paired_cnn
        Path(a.worker_out).write_text(json.dumps(fn(a.arm.split(";"), a)))
        return
    if a.worker:
        r = (worker_llm if a.worker == "llm" else worker_cnn)(a.arm, a)
        Path(a.worker_out).write_text(json.dumps(r))
        return
    if a.table:
        print(table(json.loads(a.results.read_text())))
        return
    run = Run()
    if a.paired_only:
        data = json.loads(a.results.read_text())
        with tempfile.TemporaryDirectory(prefix="sparse-backprop-") as tmp:
            if not a.skip_llm and "llm" in data:
                a.start, a.batch, a.seq_len = data["llm"]["start"], data["llm"]["batch"], data["llm"]["seq_len"]
                a.loss = data["llm"].get("loss", "ce")
                prepare_llm(a, Path(tmp))
                paired(a, Path(tmp), [x["arm"] for x in data["llm"]["arms"]], data)
            if not a.skip_cnn and "cnn" in data:
                prepare_cnn(a, Path(tmp))  # the same seed and settings: the same pruned CNN
                paired(a, Path(tmp), [x["arm"] for x in data["cnn"]["arms"]], data, "cnn")
        summarise(data)
        data["_meta"]["paired_timing"] = run.entry()
        write_json(a.results, data)
        print(table(data))
        return
    llm_arms = [] if a.skip_llm else [x.strip() for x in a.llm_arms.split(";") if x.strip()]
    cnn_arms = [] if a.skip_cnn else [x for x in CNN_ARMS if x in a.cnn_arms.split(";")]
    for kind, arms, has_full in (("LLM", llm_arms, any(llm_arm(x)[0] is None for x in llm_arms)),
                                 ("CNN", cnn_arms, "full" in cnn_arms)):
        if arms and not has_full:  # before any arm runs: the ratios need the reference
            ap.error(f"the {kind} arms need a full fine-tuning arm ('full'), the reference of every ratio.")
    data: dict = {}
    with tempfile.TemporaryDirectory(prefix="sparse-backprop-") as tmp:
        folder = Path(tmp)
        if llm_arms:
            print("preparing SmolLM2 (pruned start, training windows, E16 before) ...", flush=True)
            data["llm"] = {**prepare_llm(a, folder), "start": a.start, "loss": a.loss, "data": "docs",
                           "seq_len": a.seq_len, "batch": a.batch, "steps": a.steps, "lr": a.lr,
                           "update_lr": a.update_lr or a.lr, "lora_lr": a.lora_lr, "seed": a.seed, "arms": []}
        if cnn_arms:
            print("preparing the CNN (dense training, magnitude pruning) ...", flush=True)
            data["cnn"] = {**prepare_cnn(a, folder), "steps": a.cnn_steps, "batch": a.cnn_batch, "lr": a.cnn_lr,
                           "pruning": f"magnitude {a.cnn_sparsity:g}",
                           "train_examples": a.cnn_train, "arms": []}
        todo = []
        for i in range(max(len(llm_arms), len(cnn_arms))):  # alternate LLM and CNN arms
            todo += [("llm", llm_arms[i])] if i < len(llm_arms) else []
            todo += [("cnn", cnn_arms[i])] if i < len(cnn_arms) else []
        for kind, arm in todo:
            print(f"{kind}: {arm} ...", flush=True)
            r = run_worker(kind, arm, a, folder)
            if "failed" in r:
                data[kind].setdefault("failed", []).append(r)
                continue
            data[kind]["arms"].append(r)
            print(f"  {r['s_per_step']:.3f} s/step, grad+opt {r['step']['grad_optimizer_bytes'] / 2**20:.1f} MB, "
                  + (f"E16 {r['ppl_e16_after']:.2f}" if kind == "llm" else f"acc {100 * r['acc_after']:.2f}%"),
                  flush=True)
        if llm_arms and a.paired_rounds:
            paired(a, folder, llm_arms, data)
        if cnn_arms and a.cnn_paired_rounds:
            paired(a, folder, cnn_arms, data, "cnn")
    summarise(data)
    data["_meta"] = run.meta(
        model=f"SmolLM2-135M-Instruct fp32 (de-quantized GGUF), {a.start} start; Fashion-MNIST SmallCNN",
        eval="E16 = first 16 windows x 512 of the evaluation half; CNN: the 10k test images",
        note="s/step: median over the run's steps after the first; step: one measured AdamW step after the run "
             "(measure_step); every arm in its own process; arms alternate LLM/CNN")
    write_json(a.results, data)
    print(table(data))


if __name__ == "__main__":
    main()
