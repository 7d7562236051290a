"""SAEs against their definitions: planted features, exact L0, unit decoder rows, AuxK, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetorch.dictionaries.sae import SAEConfig, SparseAutoencoder, jumprelu, step
from sparsetorch.dictionaries.train import (
    TrainOptions,
    auto_lr,
    geometric_median,
    normalized_mse,
    train_sae,
)
from sparsetorch.errors import DictionaryError


def planted(n: int = 60_000, d: int = 32, m: int = 64, active: int = 4, seed: int = 0):
    """Activations that are exactly ``active``-sparse combinations of ``m`` unit features."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(m, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return z @ feats, feats


def batches(x: torch.Tensor, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            yield x[p[i:i + bs]]


X, FEATS = planted()


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_recovers_planted_features(kind):
    sae = SparseAutoencoder(SAEConfig(d=32, width=128, kind=kind, k=4))
    res = train_sae(sae, batches(X, 512), 500, TrainOptions(lr=3e-3, dead_tokens=20_000, bdec_init="zeros"))
    cos = (sae.W_dec @ FEATS.T).max(0).values.mean().item()  # each planted feature's best decoder row
    assert cos >= 0.9, (kind, cos)
    assert res.final_fvu < 0.3
    assert abs(res.final_l0 - 4) < 0.5
    # decoder rows stay unit-norm after every step
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_topk_l0_is_exactly_k_and_batchtopk_total_is_k_times_batch():
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    top = SparseAutoencoder(SAEConfig(d=16, width=40, kind="topk", k=5))
    code = top.encode(x)
    assert torch.equal(code.l0(), torch.full((300,), 5))
    bt = SparseAutoencoder(SAEConfig(d=16, width=40, kind="batchtopk", k=5)).train()
    code = bt.encode(x)
    assert int((code.value != 0).sum()) == 5 * 300
    assert code.l0().float().std() > 0  # per-token counts vary: it is the batch that has k*B
    # eval mode uses the learned threshold: z = pre * [pre > theta]
    bt.threshold.fill_(0.3)
    bt.eval()
    pre = bt.pre_acts(x)
    z = bt.dense_code(x)
    assert torch.allclose(z, pre * (pre > 0.3), atol=1e-6)


def test_topk_code_matches_dense_definition_and_decode():
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d=12, width=30, kind="topk", k=3, scale=2.0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 12)
    pre = (x / 2.0 - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    r = pre.clamp_min(0)
    kth = r.topk(3, dim=1).values[:, -1:]
    z_ref = torch.where(r >= kth, r, torch.zeros_like(r))
    z = sae.dense_code(x)
    assert torch.allclose(z, z_ref.detach(), atol=1e-5)
    x_hat_ref = (z_ref @ sae.W_dec + sae.b_dec) * 2.0
    assert torch.allclose(sae(x), x_hat_ref, atol=1e-5)


def test_sparse_encoder_gradient_equals_dense_autograd():
    torch.manual_seed(2)
    sae = SparseAutoencoder(SAEConfig(d=10, width=24, kind="topk", k=4))
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(40, 10)
    target = torch.randn(40, 10)
    loss = (sae.decode_scaled(sae.encode(x)) - target).pow(2).sum()
    loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    # dense reference: the same function written with a dense top-k mask
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = F.linear(x - b_dec, W_enc, b_enc)
    r = pre.clamp_min(0)
    mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(4, dim=1).indices, True)
    x_hat = (r * mask) @ W_dec + b_dec
    (x_hat - target).pow(2).sum().backward()
    for name, ref in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        assert torch.allclose(got[name], ref.grad, atol=1e-4), name


def test_jumprelu_threshold_gradient_matches_the_straight_through_definition():
    torch.manual_seed(3)
    cfg = SAEConfig(d=8, width=20, kind="jumprelu", k=3, jump_bandwidth=0.4)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.log_theta.copy_(torch.rand(20).mul(0.5).add(0.1).log())
    x = torch.randn(64, 8)
    target = torch.randn(64, 8)
    code = sae.encode(x)
    loss = (sae.decode_scaled(code) - target).pow(2).sum() + 0.7 * code.l0_train
    loss.backward()
    g_sparse = sae.log_theta.grad.clone()
    # dense definition with the reference's straight-through functions
    log_t = sae.log_theta.detach().clone().requires_grad_()
    pre = sae.pre_acts(x).detach()
    z = jumprelu(pre, log_t.exp(), 0.4)
    l0 = step(pre, log_t.exp(), 0.4).sum(1).mean()
    ((z @ sae.W_dec.detach() + sae.b_dec.detach() - target).pow(2).sum() + 0.7 * l0).backward()
    assert torch.allclose(g_sparse, log_t.grad, atol=1e-4)
    # and the value of the code is exactly the JumpReLU of the pre-activations
    assert torch.allclose(sae.dense_code(x), pre * (pre > sae.log_theta.exp()), atol=1e-6)


def test_auxk_revives_planted_dead_latents():
    sae = SparseAutoencoder(SAEConfig(d=32, width=64, kind="topk", k=4))
    with torch.no_grad():  # 16 latents with tiny encoder rows: positive, but never in the top-k
        sae.W_enc[:16] *= 0.02

    def dead_after(alpha: float) -> int:
        s = SparseAutoencoder(sae.cfg)
        s.load_state_dict(sae.state_dict())
        train_sae(s, batches(X, 512), 300, TrainOptions(lr=3e-3, auxk_alpha=alpha, dead_tokens=2048,
                                                       bdec_init="zeros", k_aux=16))
        fired = torch.zeros(64, dtype=torch.bool)
        c = s.encode(X[:20_000])
        fired[c.latent[c.value != 0]] = True
        return int((~fired[:16]).sum())

    without, with_aux = dead_after(0.0), dead_after(1 / 32)
    assert without >= 12  # the planted dead latents stay dead without AuxK
    assert with_aux <= without - 8


def test_geometric_median_and_normalized_mse_against_definitions():
    torch.manual_seed(4)
    pts = torch.cat([torch.randn(50, 3), torch.full((5, 3), 100.0)])
    gm = geometric_median(pts)
    obj = lambda y: (pts - y).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):  # no nearby point does better
        assert obj(gm) <= obj(gm + 0.01 * torch.randn(3)) + 1e-4
    assert gm.norm() < 5  # robust to the outliers, unlike the mean
    p, t = torch.randn(7, 3), torch.randn(7, 3)
    assert torch.isclose(normalized_mse(p, t), ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())
    # Gao et al.'s 1/sqrt(width) (base 2e-3 at 2^14) below 4,608, flat to 18,432, 1/sqrt(width) beyond
    assert auto_lr(1024) == pytest.approx(2e-3 * 4) and auto_lr(4096) == pytest.approx(2e-3 * 2)
    flat = 2e-3 / math.sqrt(4608 / 2**14)
    assert auto_lr(4608) == pytest.approx(flat) and auto_lr(9216) == pytest.approx(flat)
    assert auto_lr(18432) == pytest.approx(flat) and auto_lr(4 * 18432) == pytest.approx(flat / 2)
    assert auto_lr(18433) < flat  # continuous and falling past the flat stretch


def test_save_load_round_trip(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d=6, width=10, kind="batchtopk", k=2, scale=3.0, site="resid:1"))
    sae.threshold.fill_(0.25)
    sae.save(tmp_path / "s")
    back = SparseAutoencoder.load(tmp_path / "s")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    x = torch.randn(9, 6)
    sae.eval()
    assert torch.equal(sae(x), back(x))
    with pytest.raises(DictionaryError, match="not a saved SAE"):
        SparseAutoencoder.load(tmp_path)


@pytest.mark.parametrize("bad, msg", [
    (dict(k=10), "k must be"), (dict(k=0), "k must be"), (dict(kind="relu"), "unknown"),
    (dict(scale=0.0), "scale"),
])
def test_bad_config(bad, msg):
    with pytest.raises(DictionaryError, match=msg):
        SparseAutoencoder(SAEConfig(**{"d": 4, "width": 10, "k": 2, **bad}))


def test_bad_training_options():
    sae = SparseAutoencoder(SAEConfig(d=4, width=10, k=2))
    for bad in (dict(lr=-1.0), dict(batch_size=1), dict(auxk_alpha=-1.0), dict(bdec_init="median")):
        with pytest.raises(DictionaryError):
            train_sae(sae, iter([]), 3, TrainOptions(**bad))
    with pytest.raises(DictionaryError, match="ran out"):
        train_sae(sae, iter([torch.randn(8, 4)]), 3)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_resumed_training_equals_an_uninterrupted_run(kind, tmp_path):
    cfg = dict(d=32, width=768, kind=kind, k=4)
    # dead_tokens small enough that AuxK switches on before the interruption
    opts = TrainOptions(lr=3e-3, dead_tokens=1024, log_every=1)
    whole = SparseAutoencoder(SAEConfig(**cfg), seed=1)
    ref = train_sae(whole, batches(X, 256), 12, opts)

    def crashing(stop: int):
        for i, x in enumerate(batches(X, 256)):
            if i == stop:
                raise KeyboardInterrupt
            yield x

    ck = tmp_path / "state.safetensors"
    part = SparseAutoencoder(SAEConfig(**cfg), seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_sae(part, crashing(7), 12, opts, checkpoint=ck, checkpoint_every=3)
    again = SparseAutoencoder(SAEConfig(**cfg), seed=1)  # a fresh process: nothing kept but the file
    res = train_sae(again, batches(X, 256), 12, opts, checkpoint=ck, checkpoint_every=3, resume=True)
    for name, t in whole.state_dict().items():  # bit for bit (the threshold of a TopK SAE is nan)
        torch.testing.assert_close(again.state_dict()[name], t, rtol=0, atol=0, equal_nan=True, msg=name)
    assert res.history == ref.history and res.final_fvu == ref.final_fvu
    assert res.dead_fraction == ref.dead_fraction and res.threshold == ref.threshold
    assert max(h[3] for h in ref.history) > 0  # some latents were dead on the way: the clock was restored
    # another configuration refuses the checkpoint
    with pytest.raises(DictionaryError, match="cannot resume"):
        train_sae(SparseAutoencoder(SAEConfig(**{**cfg, "k": 5}), seed=1), batches(X, 256), 12, opts,
                  checkpoint=ck, resume=True)
    with pytest.raises(DictionaryError, match="checkpoint path"):
        train_sae(again, batches(X, 256), 12, opts, checkpoint_every=3)
