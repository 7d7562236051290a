"""The sparsetorch demo: SmolLM2-135M pruned to 50% one-shot, still a usable model.

``make demo`` runs this. In a few minutes on 2 CPU cores it:

1. loads SmolLM2-135M-Instruct (fp32) and measures its perplexity on the fixed evaluation text;
2. prunes every decoder Linear layer to 50% with SparseGPT on a small calibration set;
3. measures the perplexity again and prints a greedy sample before and after;
4. saves a compressed checkpoint (bitmask / packed formats, no pickle) and loads it back;
5. asks ``plan`` whether sparse CPU kernels would make this model faster here.

Every number is measured in this run; nothing is quoted. Options: ``--method`` (any one-shot
method), ``--sparsity``, ``--calib-samples``, ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPT = "The for statement in Python"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sparsegpt", help="one-shot method (default sparsegpt)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib-samples", type=int, default=16, help="512-token calibration windows")
    ap.add_argument("--eval-windows", type=int, default=16, help="512-token evaluation windows (E16)")
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the checkpoint and summary")
    ap.add_argument("--overwrite", action="store_true", help="replace files in --out this demo did not write")
    args = ap.parse_args(argv)

    import torch

    import sparsetorch
    from sparsetorch.data import calibration_windows, load_causal_lm
    from sparsetorch.data.text import eval_windows
    from sparsetorch.errors import SparseTorchError, check_sparsity
    from sparsetorch.evaluate import generate_sample, perplexity
    from sparsetorch.inference import plan

    try:
        check_sparsity(args.sparsity)
        ckpt = args.out / f"smollm2-{args.method}-{round(args.sparsity * 100)}.safetensors"
        summary_path = args.out / "summary.json"
        for p in (ckpt, summary_path):
            if p.exists() and not args.overwrite and not _ours(args.out):
                raise sparsetorch.errors.OutputExistsError(
                    f"{p} exists and was not written by this demo; pass --overwrite or choose another --out.")
        t_start = time.perf_counter()

        def step(what: str) -> None:
            print(f"[{time.perf_counter() - t_start:5.0f} s] {what}", flush=True)

        step("loading SmolLM2-135M-Instruct (fp32)")
        model, tok = load_causal_lm("smollm2", progress=False)
        step(f"dense perplexity on {args.eval_windows}x512 evaluation tokens, and a greedy sample")
        ew = eval_windows(tok, args.eval_windows, 512)
        ppl_dense = perplexity(model, windows=ew, progress=False)
        sample_dense = generate_sample(model, tok, PROMPT, max_new_tokens=24)
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

        step(f"pruning to {args.sparsity:.0%} with {args.method} on {args.calib_samples}x512 calibration tokens")
        calib = calibration_windows(tok, args.calib_samples, 512)
        report = sparsetorch.prune(model, args.method, args.sparsity, calibration=calib, tokenizer=tok,
                                   num_samples=args.calib_samples, seq_len=512, progress=False)
        report.masks.verify(model)
        step("sparse perplexity and sample")
        ppl_sparse = perplexity(model, windows=ew, progress=False)
        sample_sparse = generate_sample(model, tok, PROMPT, max_new_tokens=24)

        step(f"saving the compressed checkpoint to {ckpt} and loading it back")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ".sparsetorch-demo").write_text("written by examples/demo.py\n", encoding="utf-8")
        sparsetorch.save(model, ckpt, masks=report.masks)
        model2, masks2 = sparsetorch.load(ckpt)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
        masks2.verify(model2)
        del model2

        step("measuring sparse CPU kernels against dense (plan)")
        torch_threads = torch.get_num_threads()
        pl = plan(model, batch_size=1)
    except SparseTorchError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    file_bytes = ckpt.stat().st_size
    lines = [
        "",
        f"SmolLM2-135M-Instruct, {report.method} {report.pattern} {report.sparsity_actual:.1%} of "
        f"{len(report.masks)} decoder Linear layers ({args.calib_samples}x512 calibration tokens, "
        f"{report.seconds_prune:.0f} s)",
        f"  perplexity (E{ew.shape[0]}, fixed evaluation text): dense {ppl_dense:.2f} -> sparse {ppl_sparse:.2f}",
        f"  prompt: {PROMPT!r}",
        f"    dense : {sample_dense.strip()!r}",
        f"    sparse: {sample_sparse.strip()!r}",
        f"  checkpoint {ckpt}: {_mib(file_bytes)} vs {_mib(dense_bytes)} of dense fp32 weights "
        f"({file_bytes / dense_bytes:.2f}x); loads back bit-exact: {same}, masks verified",
        f"  sparse CPU kernels at batch 1, {torch_threads} threads: Linear layers "
        f"{pl.linear_dense_s * 1e3:.1f} -> {pl.linear_best_s * 1e3:.1f} ms ({pl.linear_speedup:.2f}x); {pl.verdict}",
        f"  total {time.perf_counter() - t_start:.0f} s",
    ]
    print("\n".join(lines))
    summary = {
        "method": report.method, "pattern": report.pattern, "sparsity": report.sparsity_actual,
        "calib_samples": args.calib_samples, "eval_windows": int(ew.shape[0]),
        "ppl_dense": ppl_dense, "ppl_sparse": ppl_sparse, "seconds_prune": report.seconds_prune,
        "prompt": PROMPT, "sample_dense": sample_dense, "sample_sparse": sample_sparse,
        "checkpoint": str(ckpt), "checkpoint_bytes": file_bytes, "dense_weight_bytes": dense_bytes,
        "roundtrip_bit_exact": same, "plan_linear_speedup": pl.linear_speedup, "plan_verdict": pl.verdict,
        "threads": torch_threads,
    }
    from sparsetorch.atomic import atomic_write_text

    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    print(f"  summary: {summary_path}")
    return 0


def _ours(folder: Path) -> bool:
    return (folder / ".sparsetorch-demo").is_file()


if __name__ == "__main__":
    raise SystemExit(main())
