"""Small-scale quality check (16x256 calibration, first 4 eval windows, 1 thread): allocation, DSnoT,
true-sequential and reconstruction variants on SmolLM2-135M. Usage: NAME|method|sparsity|pattern|allocation|json-kwargs ...
Expects the fp32 folder made by benchmarks/oneshot_llm.py (~/.cache/sparsetorch/smollm2-fp32)."""

import json
import sys
import time

import torch
import transformers

torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
import sparsetorch  # noqa: E402
from sparsetorch.data.text import calibration_windows, eval_windows  # noqa: E402
from sparsetorch.evaluate import perplexity  # noqa: E402

d = str(__import__("pathlib").Path.home() / ".cache/sparsetorch/smollm2-fp32")
tok = transformers.AutoTokenizer.from_pretrained(d)
calib = calibration_windows(tok, 16, 256)
ev = eval_windows(tok, 4, 512)
base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
state = {k: v.clone() for k, v in base.state_dict().items()}
cfgs = [a.split("|") for a in sys.argv[1:]]
for name, method, sp, pat, alloc, kw in cfgs:
    base.load_state_dict(state)
    kw = json.loads(kw)
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
