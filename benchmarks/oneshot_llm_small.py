"""Small-scale quality check (16x256 calibration, first 4 eval windows, 1 thread): allocation, DSnoT,
true-sequential and reconstruction variants on SmolLM2-135M. Usage: NAME|method|sparsity|pattern|allocation|json-kwargs ...
Expects the fp32 folder made by benchmarks/oneshot_llm.py (~/.cache/sparsetorch/smollm2-fp32).

Each NAME is merged into ``benchmarks/results/oneshot_llm_small.json`` (``--out PATH`` to change)
with its own provenance (commit, command, load average before/after), since the entries of the
file come from different runs.

    .venv/bin/python benchmarks/oneshot_llm_small.py 'sgpt50|sparsegpt|0.5|unstructured|uniform|{}'
"""

import json
import sys
import time
from pathlib import Path

import torch
import transformers

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import Run, load_average, write_json  # noqa: E402

import sparsetorch  # noqa: E402
from sparsetorch.data.text import calibration_windows, eval_windows  # noqa: E402
from sparsetorch.evaluate import perplexity  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "oneshot_llm_small.json"
META = {
    "model": "SmolLM2-135M fp32",
    "calibration": "first 16 windows x 256 of the calibration half",
    "eval": "first 4 windows x 512 of the evaluation half",
    "threads": 1,
    "script": "benchmarks/oneshot_llm_small.py",
}


def main(argv: list[str] | None = None) -> int:
    run = Run.for_main(__file__, argv)
    args = list(sys.argv[1:] if argv is None else argv)
    out = OUT
    if "--out" in args:
        i = args.index("--out")
        out = Path(args[i + 1])
        del args[i : i + 2]
    d = str(Path.home() / ".cache/sparsetorch/smollm2-fp32")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    calib = calibration_windows(tok, 16, 256)
    ev = eval_windows(tok, 4, 512)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    results = json.loads(out.read_text()) if out.is_file() else {}
    cfgs = [a.split("|") for a in args]
    for name, method, sp, pat, alloc, kw in cfgs:
        base.load_state_dict(state)
        kw = json.loads(kw)
        load_before = load_average()
        t = time.time()
        r = sparsetorch.prune(
            base,
            method,
            None if sp == "none" else float(sp),
            pat,
            allocation=alloc,
            calibration=calib,
            progress=False,
            **kw,
        )
        t = time.time() - t
        p = perplexity(base, windows=ev, progress=False)
        print(name, round(p, 2), round(t, 1), r.extra.get("reconstruct", [{}])[:1], flush=True)
        results[name] = {
            "method": method, "sparsity": sp, "pattern": pat, "allocation": alloc, "options": kw,
            "ppl_E4": p, "prune_seconds": t, "provenance": run.entry(load_before),
        }
        results["_meta"] = run.meta(**META)
        write_json(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
