"""Sparse LoRA on pruned SmolLM2-135M: what training with the masked delta buys (fp32, CPU).

One pruned start (a library one-shot method, default SparseGPT 2:4, cached as in
``finetune_llm.py``), then with the same data, steps, seed and adapter initialisation:

(a) **masked** sparse LoRA -- ``finetune(lora=...)``: the delta ``M ⊙ s·BA`` in the forward,
    merged at the end into a plain model with the parent's masks;
(b) **unmasked** LoRA -- ordinary peft LoRA, the same engine and loss, evaluated *unmerged*;
(c) the **naive** route -- (b) merged densely (``W + s·BA``, no longer sparse), then re-pruned
    by magnitude to each tensor's pattern and sparsity (``merge_naive``);
(d) full masked fine-tuning of the weights (reference; ``--no-full`` skips it).

Reported: E16 perplexity of each (a: unmerged during the run and merged after), the sparsity of
each result, the density of (b)'s dense merge, max |Δ logits| merged vs unmerged for (a) on a
held-out window, and the targets of issue 12: max |Δ| <= 1e-4 and ppl(a) within 2% of ppl(b).
(a) and (b) start from identical adapters (B = 0), so their first losses are equal: a check that
the two runs differ only by the mask.

    .venv/bin/python benchmarks/sparse_lora.py                 # the full run (~14 min on 2 quiet cores)
    .venv/bin/python benchmarks/sparse_lora.py --smoke         # a wiring check (minutes; not a result)
    .venv/bin/python benchmarks/sparse_lora.py --table

Training text: the calibration half of the embedded corpus (``--data embedded``) or the Python
documentation sections (``--data docs``); never the evaluation half. Results are merged into
``benchmarks/results/sparse_lora.json`` keyed ``START|LOSS|rR|STEPS`` (``--smoke`` writes to a
temporary file unless ``--results`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sparse_lora.json"
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "sparse_lora_smoke.json"
#: issue 12 (part 3)
MAX_LOGIT_GAP = 1e-4
MAX_PPL_RATIO = 1.02


def start_model(start: str):
    """(student, masks, tokenizer, prune seconds). Magnitude is pruned here (instant, not cached);
    other methods go through ``finetune_llm.pruned_start`` (pruned once, cached as an HF folder)."""
    import sparsetorch
    from sparsetorch.data.llm import load_causal_lm

    method, spec = start.split("@")
    if method != "magnitude":
        from finetune_llm import pruned_start

        return pruned_start(start)
    model, tok = load_causal_lm("smollm2", progress=False)
    nm = ":" in spec
    t = time.perf_counter()
    rep = sparsetorch.prune(model, "magnitude", None if nm else float(spec), spec if nm else "unstructured")
    return model, rep.masks, tok, time.perf_counter() - t


def zero_fraction(model, masks) -> float:
    """Zeros over the masked tensors, counted on the weights (not on the masks)."""
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in masks.masks)
    return zeros / sum(m.numel() for m in masks.masks.values())


def train_plain_lora(model, masks, train, teacher, a, settings, targets):  # noqa: ANN001, ANN201
    """(b): ordinary peft LoRA (unmasked delta) through the same engine, sampler and loss as
    ``finetune()``; returns (peft model, result). The adapters are initialised from the same seed
    as ``add_sparse_lora`` does, so (a) and (b) start identical."""
    import peft
    import torch

    from sparsetorch.finetune import FinetuneConfig, WindowSampler, train_masked
    from sparsetorch.finetune.lora import peft_masks
    from sparsetorch.finetune.losses import causal_ce, kd_kl, parse_loss

    cfg = peft.LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=float(settings.dropout),
                          target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(a.seed)
        pm = peft.get_peft_model(model, cfg)
    spec = parse_loss(a.loss)
    w_ce, w_kd = spec.weight("ce"), spec.weight("kd")
    if spec.weight("squarehead"):
        raise SystemExit("the benchmark's plain-LoRA replica supports ce and kd losses")
    sampler = WindowSampler(train.shape[0], a.batch, a.seed)

    def batch_fn(i):  # noqa: ANN001, ANN202
        return train[sampler(i)]

    def loss_fn(m, ids):  # noqa: ANN001, ANN202
        out = m(input_ids=ids, use_cache=False)
        total = torch.zeros(())
        if w_ce:
            total = total + w_ce * causal_ce(out.logits, ids)
        if w_kd:
            with torch.no_grad():
                t = teacher(input_ids=ids, use_cache=False)
            total = total + w_kd * kd_kl(out.logits, t.logits, 1.0)
        return total, ids.numel()

    from sparsetorch.evaluate import perplexity

    config = FinetuneConfig(steps=a.steps, lr=a.lr, batch_size=a.batch, seed=a.seed, bf16=a.bf16,
                            adapter={"kind": "plain-lora", **settings.to_dict()})
    res = train_masked(pm, peft_masks(pm, masks), batch_fn, loss_fn, config, progress=a.progress,
                       eval_fn=lambda m: perplexity(m, windows=a.ew, progress=False), eval_before=False,
                       desc="plain lora")
    return pm, res


def run_one(a) -> dict:  # noqa: ANN001
    import torch

    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.data.text import eval_windows, token_windows
    from sparsetorch.evaluate import perplexity
    from sparsetorch.finetune import embedded_windows, finetune, python_docs_text
    from sparsetorch.finetune.lora import LoraSettings, merge_naive, resolve_targets

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    student, masks, tok, prune_sec = start_model(a.start)
    teacher = load_causal_lm("smollm2", progress=False)[0] if a.loss != "ce" else None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    train = (token_windows(tok, python_docs_text(), seq_len=a.seq_len) if a.data == "docs"
             else embedded_windows(tok, a.seq_len))
    a.ew = eval_windows(tok, a.eval_windows, a.eval_seq_len)
    probe = eval_windows(tok, a.eval_windows + 1, a.eval_seq_len)[-1:]  # held out from E16 too
    settings = LoraSettings(r=a.rank, alpha=a.alpha, dropout=a.dropout)
    targets = resolve_targets(student, masks, None)
    parent_zero = zero_fraction(student, masks)
    out = {"start": a.start, "prune_seconds": prune_sec, "loss": a.loss, "steps": a.steps, "lr_lora": a.lr,
           "lr_full": a.full_lr, "batch": a.batch, "seq_len": a.seq_len, "data": a.data,
           "train_windows": int(train.shape[0]), "eval": f"{a.eval_windows} x {a.eval_seq_len} (evaluation half)",
           "seed": a.seed, "bf16": a.bf16, "threads": a.threads, "lora": settings.to_dict(),
           "adapted_layers": len(targets), "sparsity_parent": parent_zero}

    def logits(m):  # noqa: ANN001, ANN202
        m.eval()
        with torch.no_grad():
            return m(input_ids=probe).logits

    # (a) masked sparse LoRA through finetune(lora=...)
    print("(a) masked sparse LoRA ...", flush=True)
    ma = copy.deepcopy(student)
    seen = {}

    def on_step(done, res, m):  # noqa: ANN001, ANN202
        if done == a.steps:  # the adapted, unmerged model at the end of the run
            seen["logits"] = logits(m)
            m.train()

    res_a = finetune(ma, masks, train, teacher=teacher, loss=a.loss, steps=a.steps, lr=a.lr, batch_size=a.batch,
                     eval_windows=a.ew, bf16=a.bf16, seed=a.seed, progress=a.progress, on_step=on_step,
                     lora=settings)
    merged_logits = logits(ma)
    masks.verify(ma)
    gap = float((merged_logits - seen["logits"]).abs().max())
    out["ppl_parent"] = res_a.evals[0][1]
    out["a_masked"] = {"ppl_unmerged": res_a.evals[-1][1], "ppl_merged": perplexity(ma, windows=a.ew, progress=False),
                       "max_abs_logit_diff_merged_vs_unmerged": gap, "sparsity": zero_fraction(ma, masks),
                       "masks_verified": True, "trainable_params": res_a.trainable_params,
                       "loss_first": res_a.losses[0], "loss_last": res_a.final_loss,
                       "train_seconds": res_a.seconds, "sec_per_step": res_a.seconds / max(res_a.steps, 1)}
    del ma
    print(f"    E16 {out['ppl_parent']:.3f} -> {out['a_masked']['ppl_merged']:.3f} (merged); "
          f"max |d logits| {gap:.2e}", flush=True)

    # (b) ordinary (unmasked) LoRA, unmerged; (c) its dense merge re-pruned
    print("(b) unmasked LoRA ...", flush=True)
    pm, res_b = train_plain_lora(copy.deepcopy(student), masks, train, teacher, a, settings, targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        dense = copy.deepcopy(pm).merge_and_unload()
    dense_zero = zero_fraction(dense, masks)
    del dense
    out["b_unmasked"] = {"ppl_unmerged": res_b.evals[-1][1], "sparsity_of_dense_merge": dense_zero,
                         "trainable_params": res_b.trainable_params, "loss_first": res_b.losses[0],
                         "loss_last": res_b.final_loss, "train_seconds": res_b.seconds,
                         "sec_per_step": res_b.seconds / max(res_b.steps, 1)}
    print("(c) naive: dense merge of (b), re-pruned ...", flush=True)
    naive, new_masks = merge_naive(pm, masks)
    kept_same = sum(int((new_masks.masks[n] & masks.masks[n]).sum()) for n in masks.masks)
    kept = sum(int(masks.masks[n].sum()) for n in masks.masks)
    out["c_naive"] = {"ppl": perplexity(naive, windows=a.ew, progress=False), "sparsity": zero_fraction(naive, new_masks),
                      "kept_positions_shared_with_parent": kept_same / max(kept, 1),
                      "patterns": sorted({str(p) for p in new_masks.patterns.values()})}
    del naive, pm

    if a.full:
        print("(d) full masked fine-tuning (reference) ...", flush=True)
        md = copy.deepcopy(student)
        res_d = finetune(md, masks, train, teacher=teacher, loss=a.loss, steps=a.steps, lr=a.full_lr,
                         batch_size=a.batch, bf16=a.bf16, seed=a.seed, progress=a.progress)
        masks.verify(md)
        out["d_full"] = {"ppl": perplexity(md, windows=a.ew, progress=False), "sparsity": zero_fraction(md, masks),
                         "trainable_params": res_d.trainable_params, "loss_last": res_d.final_loss,
                         "train_seconds": res_d.seconds, "sec_per_step": res_d.seconds / max(res_d.steps, 1)}
        del md
    ratio = out["a_masked"]["ppl_merged"] / out["b_unmasked"]["ppl_unmerged"]
    out["targets"] = {
        "max_abs_logit_diff": {"value": gap, "limit": MAX_LOGIT_GAP, "met": gap <= MAX_LOGIT_GAP},
        "ppl_masked_over_unmasked": {"value": ratio, "limit": MAX_PPL_RATIO, "met": ratio <= MAX_PPL_RATIO},
        "same_first_loss_a_b": out["a_masked"]["loss_first"] == out["b_unmasked"]["loss_first"],
    }
    out["seconds_total"] = time.perf_counter() - t0
    out["peak_rss_mb"] = max(res_a.peak_rss_mb, res_b.peak_rss_mb)
    return out


def table(data: dict) -> str:
    rows = ["| start | loss, steps, rank | route | E16 ppl | sparsity | notes |", "|---|---|---|---|---|---|"]
    for k, r in data.items():
        if k.startswith("_"):
            continue
        run = f"{r['loss']}, {r['steps']} steps, r={r['lora']['r']}" + (" (SMOKE, not a result)" if r.get("smoke") else "")
        a, b, c, t = r["a_masked"], r["b_unmasked"], r["c_naive"], r["targets"]
        rows.append(f"| {r['start']} | {run} | parent | {r['ppl_parent']:.3f} | {r['sparsity_parent']:.4f} | "
                    f"{r['seconds_total'] / 60:.1f} min in all |")
        rows.append(f"| | | (a) masked LoRA, merged | {a['ppl_merged']:.3f} | {a['sparsity']:.4f} | unmerged "
                    f"{a['ppl_unmerged']:.3f}; max abs d logits {a['max_abs_logit_diff_merged_vs_unmerged']:.2e} "
                    f"(<= 1e-4: {'met' if t['max_abs_logit_diff']['met'] else 'MISSED'}) |")
        rows.append(f"| | | (b) unmasked LoRA, unmerged | {b['ppl_unmerged']:.3f} | "
                    f"{b['sparsity_of_dense_merge']:.4f} | W + s*BA is dense (its plain merge); "
                    f"ppl(a)/ppl(b) = {t['ppl_masked_over_unmasked']['value']:.4f} (<= 1.02: "
                    f"{'met' if t['ppl_masked_over_unmasked']['met'] else 'MISSED'}) |")
        rows.append(f"| | | (c) naive: (b) dense merge, re-pruned | {c['ppl']:.3f} | {c['sparsity']:.4f} | "
                    f"{100 * c['kept_positions_shared_with_parent']:.1f}% of the parent's kept positions |")
        if "d_full" in r:
            d = r["d_full"]
            rows.append(f"| | | (d) full masked fine-tuning | {d['ppl']:.3f} | {d['sparsity']:.4f} | "
                        f"{d['trainable_params']} params trained vs {a['trainable_params']} (LoRA) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    run = Run.for_main("benchmarks/sparse_lora.py", argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="sparsegpt@2:4", help="METHOD@SPARSITY or METHOD@N:M (finetune_llm.py's)")
    ap.add_argument("--loss", default="kd", choices=["kd", "ce"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (a and b)")
    ap.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the full fine-tuning reference")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="also run full masked fine-tuning (d) as a reference")
    ap.add_argument("--data", choices=["embedded", "docs"], default="embedded")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in training (default fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true",
                    help="wiring check: magnitude@2:4, 2 steps, rank 4, 2 eval windows of 128 tokens")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--results", type=Path)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.start, a.steps, a.rank, a.alpha = "magnitude@2:4", 2, 4, 8.0
        a.seq_len, a.batch, a.eval_windows, a.eval_seq_len = 64, 2, 2, 128
    results = a.results or (SMOKE_RESULTS if a.smoke else RESULTS)
    data = json.loads(results.read_text()) if results.is_file() else {}
    if a.table:
        print(table(data))
        return
    key = f"{a.start}|{a.loss}|r{a.rank}|{a.steps}" + ("|bf16" if a.bf16 else "") + ("|smoke" if a.smoke else "")
    print(f"running {key} ...", flush=True)
    before = load_average()
    r = run_one(a)
    r["smoke"] = a.smoke
    r["provenance"] = run.entry(before)
    data[key] = r
    data["_meta"] = run.meta(peers={"peft": None}, model="SmolLM2-135M-Instruct fp32 (de-quantized GGUF)",
                             eval="E16 = first 16 windows x 512 of the evaluation half",
                             note="(a) masked sparse LoRA merged; (b) plain LoRA unmerged; (c) (b) dense-merged "
                                  "then re-pruned by magnitude; (d) full masked fine-tuning")
    write_json(results, data)
    print(f"wrote {results}")
    print(table({key: r}))


if __name__ == "__main__":
    main()
