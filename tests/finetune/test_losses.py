"""Recovery losses against hand-computed values, and the loss-spec grammar."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetorch.finetune import LossError, causal_ce, kd_kl, parse_loss, squarehead


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
