"""``sparsetorch diff``: a crosscoder between a tiny model and its 2:4-pruned version, the report
files, and patching latents back."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import flat, run_script
from test_cli_main import run
from tiny_models import make_tiny_llama

from sparsetorch.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from sparsetorch.dictionaries.diff import patch_losses
from sparsetorch.dictionaries.sites import parse_site


def test_diff_cli_writes_report_histogram_and_page(hf_dir, pruned_dir, tmp_path):
    out = tmp_path / "d"
    js = tmp_path / "d.json"
    assert run(["diff", "--a", str(hf_dir), "--b", str(pruned_dir), "--site", "resid:1", "--tokens", "2048",
                "--width", "64", "--k", "4", "--batch-size", "256", "--seq-len", "64", "--eval-windows", "2",
                "--out", str(out), "--json", str(js)]) == 0
    rep = json.loads((out / "diff_report.json").read_text())
    assert rep == json.loads(js.read_text())
    c = rep["counts"]
    assert c["only_a"] + c["only_b"] + c["shared"] + c["other"] == 64
    assert c["lost"] <= c["only_a"] and c["gained"] <= c["only_b"]
    assert (out / "delta_norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "latents.html").read_text()
    assert page.startswith("<!doctype html>") and "<h2>lost (only in A)" in page
    cc = Crosscoder.load(out / "crosscoder")
    assert cc.cfg.width == 64 and torch.isfinite(cc.threshold)
    assert (tmp_path / "d.activations" / "manifest.json").is_file()
    # the same folder again is refused without --overwrite; the error comes before any work
    p = run_script("diff", "--a", str(hf_dir), "--b", str(pruned_dir), "--site", "resid:1", "--out", str(out),
                   "--tokens", "4096")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "already exists" in flat(p.stderr + p.stdout)


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "relu"], "unknown"), (["--k", "70", "--width", "64"], "k must be"),
    (["--tokens", "10"], "--tokens must be at least --batch-size"),
])
def test_diff_bad_input(hf_dir, tmp_path, args, message):
    p = run_script("diff", "--b", str(hf_dir), "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert message in flat(p.stderr + p.stdout)


def test_patching_every_latent_of_an_exact_crosscoder_recovers_model_a():
    """With a crosscoder whose latents reconstruct both models exactly (decoders = the identity
    basis scaled, one latent per coordinate sign), patching all latents turns B's site into A's:
    the patched loss equals A's and 'explained' is 1."""
    a = make_tiny_llama(layers=2, hidden=16, intermediate=32, vocab=50, seed=0)
    b = make_tiny_llama(layers=2, hidden=16, intermediate=32, vocab=50, seed=0)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(-4.0)  # B differs from A before the site
    site = parse_site("resid:0", a)
    d = 16
    cc = Crosscoder(CrosscoderConfig(d=d, width=4 * d, kind="l1"))
    eye = torch.eye(d)
    with torch.no_grad():
        # latents 0..2d-1 read model A (+e_i, -e_i), 2d..4d-1 read model B; decoders write back
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        cc.b_dec.zero_()
        cc.b_enc.zero_()
        cc.W_enc[:d, 0] = eye
        cc.W_enc[d:2 * d, 0] = -eye
        cc.W_enc[2 * d:3 * d, 1] = eye
        cc.W_enc[3 * d:, 1] = -eye
        cc.W_dec[:d, 0] = eye
        cc.W_dec[d:2 * d, 0] = -eye
        cc.W_dec[2 * d:3 * d, 1] = eye
        cc.W_dec[3 * d:, 1] = -eye
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    # patch A's latents in and B's latents out: x_B + (x_A - x_B) = x_A
    r = patch_losses(a, b, cc, site, ids, torch.arange(4 * d), skip_first=0)
    assert r["loss_b"] != pytest.approx(r["loss_a"])
    assert r["loss_b_patched"] == pytest.approx(r["loss_a"], rel=1e-5)
    assert r["explained"] == pytest.approx(1.0, abs=1e-3)
