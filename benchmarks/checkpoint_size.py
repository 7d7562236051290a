"""Checkpoint size benchmark: compressed sparsetorch files vs the dense safetensors file.

SmolLM2-135M in fp16, magnitude-pruned (all decoder Linear layers; embedding / tied lm_head and
norms stay dense) at 50 / 70 / 90 % unstructured and 2:4. For each, the dense safetensors file
(``safetensors.torch.save_model``, tied weights stored once) is compared with our file per format
(auto, bitmask, csr, and n:m where the masks are N:M), plus the ratio over the pruned tensors
alone, and a bit-exact round-trip check of every tensor.

    .venv/bin/python benchmarks/checkpoint_size.py            # prints a table, writes JSON
    .venv/bin/python benchmarks/checkpoint_size.py --model DIR

Results: ``benchmarks/results/checkpoint_size.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint_size.json"
# label, sparsity, pattern, targets (None = default: decoder Linear layers; embedding stays dense)
# "50%all" also prunes the (tied) embedding, so that the whole model is 50% sparse: the issue's
# size target ("a 50%-sparse fp16 model is <= 0.57x") is about such a model.
ALL_WEIGHTS = ["Linear", "Embedding"]
SPECS = [
    ("50%", 0.5, "unstructured", None),
    ("50%all", 0.5, "unstructured", ALL_WEIGHTS),
    ("70%", 0.7, "unstructured", None),
    ("90%", 0.9, "unstructured", None),
    ("2:4", None, "2:4", None),
]
FORMATS = ["auto", "bitmask", "csr", "n:m"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a HF model folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from safetensors.torch import save_model

    import sparsetorch
    from sparsetorch.data.llm import load_causal_lm
    from sparsetorch.export import checkpoint_summary, load_state_dict, save

    model, _ = load_causal_lm(args.model, dtype=torch.float16, progress=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        for label, sparsity, pattern, targets in SPECS:
            model.load_state_dict(original)
            rep = sparsetorch.prune(model, "magnitude", sparsity, pattern, targets=targets)
            masks = rep.masks
            dense_path = tmpd / "dense.safetensors"
            save_model(model, str(dense_path))
            dense_bytes = dense_path.stat().st_size
            ref = model.state_dict()
            row = {"config": label, "pattern": pattern, "sparsity": round(rep.sparsity_actual, 4),
                   "dense_bytes": dense_bytes, "formats": {}}
            for fmt in FORMATS:
                path = tmpd / f"{fmt.replace(':', '')}.safetensors"
                t0 = time.perf_counter()
                try:
                    save(model, path, format=fmt, masks=masks)
                except sparsetorch.PatternError:
                    row["formats"][fmt] = None  # n:m is not valid for unstructured masks
                    continue
                t_save = time.perf_counter() - t0
                t0 = time.perf_counter()
                sd, lmasks = load_state_dict(path)
                t_load = time.perf_counter() - t0
                exact = all(torch.equal(_bits(sd[k]), _bits(ref[k])) for k in ref) and all(
                    torch.equal(lmasks[n], masks[n]) for n in masks
                )
                summ = checkpoint_summary(path)
                pr_dense = sum(s.dense_bytes for s in summ if s.name in masks)
                pr_stored = sum(s.stored_bytes for s in summ if s.name in masks)
                used = sorted({s.format for s in summ if s.name in masks})
                size = path.stat().st_size
                row["formats"][fmt] = {
                    "bytes": size,
                    "ratio": round(size / dense_bytes, 4),
                    "pruned_tensors_ratio": round(pr_stored / pr_dense, 4),
                    "formats_used": used,
                    "roundtrip_bit_exact": exact,
                    "save_s": round(t_save, 2),
                    "load_s": round(t_load, 2),
                }
            rows.append(row)
            print(f"done {label}", file=sys.stderr, flush=True)

    hdr = f"{'config':<7}{'dense MiB':>10}" + "".join(f"{f + ' MiB (ratio)':>22}" for f in FORMATS) + f"{'pruned-only (auto)':>20}{'exact':>7}"
    print(f"SmolLM2-135M fp16 ({args.model}); ratio = our file / dense safetensors file")
    print(hdr)
    for r in rows:
        cells = []
        for f in FORMATS:
            v = r["formats"][f]
            cells.append(f"{'n/a':>22}" if v is None else f"{v['bytes'] / 2**20:>13.1f} ({v['ratio']:.3f})")
        auto = r["formats"]["auto"]
        ok = all(v["roundtrip_bit_exact"] for v in r["formats"].values() if v)
        print(f"{r['config']:<7}{r['dense_bytes'] / 2**20:>10.1f}" + "".join(cells) + f"{auto['pruned_tensors_ratio']:>20.3f}{str(ok):>7}")
    result = {
        "_meta": run.meta(),
        "benchmark": "checkpoint_size",
        "model": args.model,
        "dtype": "float16",
        "method": "magnitude",
        "note": "embedding (tied lm_head) and norms stay dense except in '50%all', where the embedding is pruned too; pruned_tensors_ratio counts the pruned tensors only",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
