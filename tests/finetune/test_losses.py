"""Recovery losses against hand-computed values, and the loss-spec grammar."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetorch.finetune import LossError, causal_ce, kd_kl, parse_loss, squarehead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_ce_gradient_is_the_definition(monkeypatch, dtype):
    # d/dz_t [1/N sum_t -log softmax(z_t)[y_{t+1}]] = (softmax(z_t) - onehot(y_{t+1})) / N, and 0 at the
    # last position (it predicts nothing) and where the next id is -100 (skipped, not counted in N)
    import sparsetorch.finetune.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 7)
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 5, 7, generator=g) * 3).to(dtype).requires_grad_()
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ids[1, 3] = -100
    (causal_ce(z, ids) * 2.0).backward()
    p = torch.softmax(z.detach().double(), -1)
    want = torch.zeros_like(p)
    logp, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = int(ids[b, t + 1])
            if y < 0:
                continue
            count += 1
            logp += float(p[b, t, y].log())
            want[b, t] = p[b, t]
            want[b, t, y] -= 1
    want *= 2.0 / count
    assert count == 7
    assert float(causal_ce(z, ids)) == pytest.approx(-logp / count, rel=1e-5)
    tol = 1e-7 if dtype == torch.float32 else 2**-8 * float(want.abs().max())
    assert z.grad.dtype == dtype
    assert torch.allclose(z.grad.double(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_gradient_is_the_definition(monkeypatch, dtype, temperature):
    # d/ds [T^2/N sum_rows KL(softmax(t/T) || softmax(s/T))] = T/N (softmax(s/T) - softmax(t/T)),
    # written out here by hand; chunks of 3 rows make the fused loss cross chunk boundaries
    import sparsetorch.finetune.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 7)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 5, 7, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(2, 5, 7, generator=g) * 3).to(dtype).requires_grad_()
    loss = kd_kl(s, t, temperature) * 0.5  # an upstream weight reaches the gradient
    loss.backward()
    ps, pt = (torch.softmax(x.detach().double() / temperature, -1) for x in (s, t))
    want_loss = 0.5 * temperature**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    want = 0.5 * temperature / 10 * (ps - pt)
    tol = 1e-7 if dtype == torch.float32 else 2**-8 * float(want.abs().max())  # bf16 rounding
    assert s.grad.dtype == dtype
    assert torch.allclose(s.grad.double(), want, atol=tol, rtol=0)
    assert t.grad is None  # the teacher is a constant


def test_causal_ce_by_hand():
    # two positions predict tokens 1 and 0; vocab of 2
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 0]])
    want = -(math.log(3 / 4) + math.log(4 / 5)) / 2  # p(1) = 3/4 at t=0, p(0) = 4/5 at t=1
    assert float(causal_ce(logits, ids)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(LossError, match=r"logits \[B, L, V\] and ids \[B, L\]"):
        causal_ce(logits, ids[:, :2])
    with pytest.raises(LossError, match="at least 2 tokens"):
        causal_ce(logits[:, :1], ids[:, :1])


def test_kd_by_hand():
    s = torch.zeros(1, 1, 2)  # uniform student
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # teacher p = (3/4, 1/4)
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_kl(s, t)) == pytest.approx(want, rel=1e-6)
    # T = 2 softens the teacher to (sqrt 3, 1) / (sqrt 3 + 1) and multiplies by T^2 = 4
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    want2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert float(kd_kl(s, t, temperature=2.0)) == pytest.approx(want2, rel=1e-6)
    # KL(p_t || p_s) is not symmetric: swapping the roles gives the other direction
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(kd_kl(t, s)) == pytest.approx(rev, rel=1e-6)
    # the mean is over positions: a second, identical position changes nothing
    assert float(kd_kl(s.repeat(1, 2, 1), t.repeat(1, 2, 1))) == pytest.approx(want, rel=1e-6)
    assert float(kd_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(LossError, match="same vocabulary"):
        kd_kl(s, torch.zeros(1, 1, 3))
    with pytest.raises(LossError, match="temperature must be > 0"):
        kd_kl(s, t, temperature=0.0)


def test_kd_gradient_matches_softmax_difference():
    """d/ds KL(p_t || softmax(s)) = softmax(s) - p_t (per position, divided by the positions)."""
    s = torch.tensor([[[0.3, -1.0, 2.0]]], requires_grad=True)
    t = torch.tensor([[[1.0, 0.0, -1.0]]])
    kd_kl(s, t).backward()
    want = torch.softmax(s.detach(), -1) - torch.softmax(t, -1)
    assert torch.allclose(s.grad, want, atol=1e-6)


def test_squarehead_by_hand():
    ht = [torch.ones(1, 2, 4), torch.full((1, 2, 4), 2.0)]
    hs = [torch.full((1, 2, 4), 3.0), torch.full((1, 2, 4), 2.0)]
    # layer 0: MSE 4 / energy 1 = 4; layer 1: 0 / 4 = 0
    assert float(squarehead(hs, ht)) == pytest.approx(2.0)
    assert float(squarehead(hs, ht, reduction="sum")) == pytest.approx(4.0)
    # normalised: scaling both teacher and student by 10 leaves it unchanged
    assert float(squarehead([10 * h for h in hs], [10 * h for h in ht])) == pytest.approx(2.0)
    with pytest.raises(LossError, match="same number of layers"):
        squarehead(hs[:1], ht)
    with pytest.raises(LossError, match="layer 1: .*same width"):
        squarehead(hs, [ht[0], torch.ones(1, 2, 5)])
    with pytest.raises(LossError, match="reduction must be 'mean' or 'sum'"):
        squarehead(hs, ht, reduction="max")


def test_parse_loss_grammar():
    spec = parse_loss("kd+squarehead")
    assert spec.weights == (("kd", 1.0), ("squarehead", 1.0))
    assert spec.needs_teacher and spec.needs_hidden and str(spec) == "kd+squarehead"
    spec = parse_loss(" 0.5 * CE + kd ")
    assert spec.weights == (("ce", 0.5), ("kd", 1.0)) and str(spec) == "0.5*ce+kd"
    assert not parse_loss("ce").needs_teacher and not parse_loss("kd").needs_hidden
    assert parse_loss({"cross_entropy": 2, "sq": 0.25}).weights == (("ce", 2.0), ("squarehead", 0.25))
    assert parse_loss({"ce": 1.0, "kd": 0.0}).weights == (("ce", 1.0),)  # zero weights drop out
    assert parse_loss("1e-1*kd").weights == (("kd", 0.1),)
    same = parse_loss("kd")
    assert parse_loss(same) is same and same.weight("ce") == 0.0
    for bad, match in (("kd+kd", "appears twice"), ("mse", "unknown loss term 'mse'"), ("kd+", "cannot parse"),
                       ("-1*ce", "cannot parse"), ("", "cannot parse")):
        with pytest.raises(LossError, match=match):
            parse_loss(bad)
    for bad, match in (({"ce": -1}, "finite number >= 0"), ({"ce": float("nan")}, "finite number >= 0"),
                       ({"ce": float("inf")}, "finite number >= 0"), ({"ce": True}, "finite number >= 0"),
                       ({"ce": 0}, "no term with a positive weight"), (3, "must be a string")):
        with pytest.raises(LossError, match=match):
            parse_loss(bad)
