"""Feasibility: DP-SGD fine-tuning of a pruned SmolLM2-135M with a sparse-update scheme (issue 14,
stretch goal).

Start: the recovery benchmark's cached SparseGPT 50% model (its masks were computed on the
embedded pydoc calibration half, public here, not on the fine-tuning text). Training text: the
python3.11-doc sections (the "private" data), windows of ``--seq-len`` tokens, Poisson batches
of expected size ``--batch``. Trained: ``--update`` (default the q/k/v/o and up projections of the
last two blocks; everything else frozen), masked per-sample gradients clipped on the live norm,
noise on live coordinates only, noise multiplier calibrated to ``--eps`` over ``--steps`` steps.
Beside it, the same scheme and steps without privacy (same Poisson batches, no clipping, no
noise). Records s/step of both, E16 before and after, epsilon.

    .venv/bin/python benchmarks/dp_finetune_llm.py --steps 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dp_finetune_llm.json"
SCHEME = "last:2+q_proj,k_proj,v_proj,o_proj,up_proj"


def per_sequence_ce(model, ids, _y):  # noqa: ANN001, ANN201 - (B,) mean next-token loss per window
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(1)


def run_arm(model, masks, train, args, private: bool) -> dict:  # noqa: ANN001
    import torch

    from sparsetorch.finetune.sparse_update import apply_update
    from sparsetorch.masks import MaskSet
    from sparsetorch.privacy import DPSGD, PrivacyBudget, poisson_batches
    from sparsetorch.privacy.dpsgd import stream_seed

    handle = apply_update(model, args.update, masks)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    live = MaskSet({n: masks[n] for n in params if n in masks})
    opt = torch.optim.SGD(params.values(), lr=args.lr, momentum=0.9)
    n = len(train)
    q = args.batch / n
    budget = PrivacyBudget.for_target(args.eps, args.delta, q, args.steps) if private else None
    # SparseGPT's masks came from the public calibration half, not from the fine-tuning text
    dp = DPSGD(model, opt, noise_multiplier=budget.noise_multiplier, clip=args.clip,
               expected_batch_size=args.batch, masks=live, loss_fn=per_sequence_ce,
               mask_is_public=True) if private else None
    times, losses = [], []
    model.train()
    for idx in poisson_batches(n, q, args.steps, torch.Generator().manual_seed(stream_seed(0, "poisson"))):
        t = time.perf_counter()
        ids = train[idx]
        if private:
            losses.append(dp.step(ids, ids))
        elif len(ids):
            loss = per_sequence_ce(model, ids, ids).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            live.apply(model)
            losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t)
    model.eval()
    handle.merge()
    masks.verify(model)
    out = {"s_per_step": statistics.median(times[1:]), "trainable_params": sum(p.numel() for p in params.values()),
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    if budget is not None:
        out.update(epsilon=budget.epsilon, noise_multiplier=budget.noise_multiplier, sample_rate=q,
                   steps=args.steps, delta=args.delta, clip=args.clip)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="sparsegpt@0.5")
    ap.add_argument("--update", default=SCHEME)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="expected Poisson batch (windows)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    run = Run.for_main(__file__, argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from finetune_llm import pruned_start

    from sparsetorch.data.text import eval_windows, token_windows
    from sparsetorch.evaluate import perplexity
    from sparsetorch.finetune import python_docs_text

    torch.set_num_threads(a.threads)
    model, masks, tok, _ = pruned_start(a.start)
    train = token_windows(tok, python_docs_text(), seq_len=a.seq_len)
    e16 = eval_windows(tok, 16, 512)
    ppl0 = perplexity(model, windows=e16, progress=False)
    out = {"start": a.start, "update": a.update, "train_windows": len(train), "seq_len": a.seq_len,
           "expected_batch": a.batch, "lr": a.lr, "ppl_e16_before": ppl0, "arms": {}}
    for name, private in (("non-private", False), ("dp-sgd", True)):
        m = copy.deepcopy(model)
        r = run_arm(m, copy.deepcopy(masks), train, a, private)
        r["ppl_e16_after"] = perplexity(m, windows=e16, progress=False)
        out["arms"][name] = r
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del m
    out["_meta"] = run.meta(description="DP-SGD fine-tuning feasibility on SmolLM2 (issue 14 stretch)")
    write_json(a.results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
