"""benchmarks/learned_sparsity.py: the verdict logic on made-up entries, and the physically shrunk
CNN computing exactly what the channel-masked one computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench_module import load_benchmark


def _bench():
    return load_benchmark("learned_sparsity")


def test_verdict_from_made_up_entries() -> None:
    b = _bench()
    res = {}
    for seed, accs in enumerate([(88.0, 89.0, 90.0, 88.5), (88.2, 89.2, 89.6, 88.9)]):
        for m, a in zip(("rigl", "snip", "hypersparse", "dass"), accs):
            res[b.key(m, 0.95, seed)] = {"label": m, "sparsity_target": 0.95, "accuracy": a}
    res[b.key("snip", 0.98, 0)] = {"label": "snip", "sparsity_target": 0.98, "accuracy": 85.0}
    res[b.key("l0", 0.98, 0)] = {"label": "l0", "sparsity_target": 0.98, "accuracy": 85.3}
    res[b.key("rigl", 0.98, 1)] = {"label": "rigl", "sparsity_target": 0.98, "accuracy": 80.0, "seed": 1}
    for k, e in res.items():
        e.setdefault("seed", int(k.rsplit("|", 1)[1]))
    s = b.summarise(res)
    assert s["0.95"]["snip"]["n"] == 2 and abs(s["0.95"]["snip"]["mean"] - 89.1) < 1e-9
    v = b.verdict(res)
    assert v["learned_vs_score_0.95"]["best_learned"] == "hypersparse"
    assert abs(v["learned_vs_score_0.95"]["gain_points"] - 0.7) < 1e-9 and v["learned_vs_score_0.95"]["met"]
    assert v["learned_vs_score_0.98"]["met"] is False  # +0.3 < 0.5
    assert v["learned_vs_score_0.98"]["seeds"] == [0]  # snip and l0 share seed 0 only
    assert abs(v["dass_vs_erk_rigl_0.95"]["gain_points"] - 0.6) < 1e-9
    text = b.table(res)
    assert "89.10 ± 0.14" in text and "(1 seed)" in text and "MISSED" in text


def test_shrunk_cnn_computes_the_masked_function() -> None:
    b = _bench()
    from sparsetorch.models import SmallCNN
    from sparsetorch.training import get_method

    torch.manual_seed(0)
    model = SmallCNN(width=8, hidden=32)
    sp = get_method("group_lasso", sparsity=0.5, groups="out_channel", targets=["conv1", "conv2", "fc1"],
                    total_steps=4, harden_at=2, lam=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.attach(model, opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    small, kept = b.shrink_cnn(model, sp.masks)
    assert kept == {"conv1": (4, 8), "conv2": (8, 16), "fc1": (16, 32)}
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 2
