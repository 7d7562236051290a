"""Crosscoders: planted shared / only-A / only-B features, Delta-norm convention, Latent Scaling
against a direct least-squares solve."""

from __future__ import annotations

import pytest
import torch

from sparsetorch.dictionaries.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderOptions,
    classify,
    latent_scaling,
    train_crosscoder,
)
from sparsetorch.errors import DictionaryError


def planted_pair(n=40_000, d=24, shared=16, only=8, active=3, seed=0):
    """Pairs [n, 2, d]: shared features appear in both models, the 'only' ones in one model."""
    g = torch.Generator().manual_seed(seed)
    m = shared + 2 * only
    feats = torch.randn(m, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    in_a = torch.zeros(m)
    in_a[: shared + only] = 1
    in_b = torch.zeros(m)
    in_b[:shared] = 1
    in_b[shared + only:] = 1
    a = (z * in_a) @ feats
    b = (z * in_b) @ feats
    return torch.stack([a, b], 1), feats


def batches(x, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            yield x[p[i:i + bs]]


@pytest.mark.parametrize("kind", ["batchtopk", "l1"])
def test_planted_only_a_only_b_and_shared_are_found(kind):
    X, feats = planted_pair()
    cc = Crosscoder(CrosscoderConfig(d=24, width=64, kind=kind, k=3, l1_coeff=0.05))
    train_crosscoder(cc, batches(X, 512), 600, CrosscoderOptions(lr=3e-3, dead_tokens=20_000))
    dec = cc.W_dec.detach()
    delta = cc.delta_norm()
    hits = {"shared": 0, "only_a": 0, "only_b": 0}
    for i, f in enumerate(feats):
        # the latent whose decoder (in the model that has the feature) points along it
        home = 1 if i >= 24 else 0
        cos = (dec[:, home] @ f) / dec[:, home].norm(dim=1).clamp_min(1e-9)
        j = int(cos.argmax())
        if cos[j] < 0.8:
            continue
        want = "shared" if i < 16 else ("only_a" if i < 24 else "only_b")
        cls = [k for k, v in classify(delta).items() if j in v.tolist()][0]
        hits[want] += cls == want
    assert hits["shared"] >= 12 and hits["only_a"] >= 6 and hits["only_b"] >= 6, (kind, hits)


def test_delta_norm_convention():
    cc = Crosscoder(CrosscoderConfig(d=4, width=3, k=1))
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0          # only in A
        cc.W_dec[1, 1, 0] = 2.0          # only in B
        cc.W_dec[2, 0, 1] = cc.W_dec[2, 1, 2] = 0.5  # equal norms
    assert cc.delta_norm().tolist() == pytest.approx([1.0, 0.0, 0.5])
    c = classify(cc.delta_norm())
    assert c["only_a"].tolist() == [0] and c["only_b"].tolist() == [1] and c["shared"].tolist() == [2]


def test_latent_scaling_beta_equals_least_squares():
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(d=6, width=10, kind="l1", scales=(2.0, 0.5)))
    with torch.no_grad():
        cc.W_enc.normal_()
        cc.b_enc.fill_(0.3)
    x = torch.randn(300, 2, 6)
    lat, home = torch.tensor([1, 4, 7]), torch.tensor([0, 1, 0])
    ls = latent_scaling(cc, lat, home, [x[:100], x[100:]])
    a = cc.scaled(x).double()
    f_all = cc.encode(x).double()
    a_hat = cc.decode_scaled(f_all.float()).double()
    for n, (j, h) in enumerate(zip(lat.tolist(), home.tolist())):
        d = cc.W_dec[j, h].double()
        fj = f_all[:, j]
        design = (fj[:, None] * d[None]).reshape(-1, 1)  # vec(f_j d)
        for m in range(2):
            y_err = a[:, m] - (a_hat[:, m] - fj[:, None] * cc.W_dec[j, m].double())
            for y, got in ((y_err, ls.beta_error[n, m]), (a_hat[:, m], ls.beta_recon[n, m])):
                ref = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.item()
                assert float(got) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert torch.allclose(ls.nu("error"), ls.beta_error[torch.arange(3), 1 - home] / ls.beta_error[torch.arange(3), home])


def test_save_load_and_bad_input(tmp_path):
    cc = Crosscoder(CrosscoderConfig(d=5, width=9, k=2, scales=(1.5, 2.5), models=("x", "y"), site="resid:3"))
    cc.threshold.fill_(0.1)
    cc.save(tmp_path / "c")
    back = Crosscoder.load(tmp_path / "c")
    assert back.cfg == cc.cfg
    x = torch.randn(7, 2, 5)
    assert torch.equal(back(x), cc.eval()(x))
    with pytest.raises(DictionaryError, match="pairs"):
        cc(torch.randn(7, 5))
    with pytest.raises(DictionaryError, match="k must be"):
        Crosscoder(CrosscoderConfig(d=5, width=4, k=4))
    with pytest.raises(DictionaryError, match="not a saved crosscoder"):
        Crosscoder.load(tmp_path)
