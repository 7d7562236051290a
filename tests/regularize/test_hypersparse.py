"""HyperSparse's closed-form gradient against autograd of its definition; the ART stop rule on
scripted accuracy sequences."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetorch.errors import MethodError
from sparsetorch.regularize.hypersparse import ART, HS_CONSTANT, hs_grad, hs_loss, hs_scale


def paper_loss(ws: list[torch.Tensor], s: float) -> torch.Tensor:
    """The reference's loss, written out: sum |w| * T / stopgrad(T) - sum |w|, T = sum tanh(s |w|)."""
    w = torch.cat([x.reshape(-1) for x in ws])
    t = torch.tanh(s * w.abs()).sum()
    return (w.abs() * t / t.detach()).sum() - w.abs().sum()


def test_scale_is_the_constant_over_the_kappa_quantile() -> None:
    w = [torch.tensor([0.5, -0.1, 0.3]), torch.tensor([[0.2, -0.4]])]
    # sorted |w| = .1 .2 .3 .4 .5; kappa = 0.6 -> index floor(0.6 * 5) = 3 -> 0.4
    assert hs_scale(w, 0.6) == pytest.approx(HS_CONSTANT / 0.4)


def test_gradient_matches_autograd_of_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    kappa = 0.7
    s = hs_scale(ws, kappa)
    leaves = [w.clone().requires_grad_(True) for w in ws]
    paper_loss(leaves, s).backward()
    ours = hs_grad(ws, kappa)
    for leaf, mine in zip(leaves, ours):
        torch.testing.assert_close(mine, leaf.grad, rtol=1e-6, atol=1e-10)
    # and the library's own loss is the same function
    leaves2 = [w.clone().requires_grad_(True) for w in ws]
    hs_loss(leaves2, kappa).backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad)


def test_gradient_is_large_for_small_weights_and_vanishes_for_large() -> None:
    w = [torch.tensor([0.001, 0.01, 0.1, 1.0, 10.0], dtype=torch.float64)]
    g = hs_grad(w, 0.4)[0]
    assert torch.all(g[:-1] >= g[1:])
    assert float(g[-1]) < 1e-6 * float(g[0])
    # closed form at one point
    s = hs_scale(w, 0.4)
    l1 = float(w[0].abs().sum())
    t = float(torch.tanh(s * w[0].abs()).sum())
    assert float(g[1]) == pytest.approx(s / math.cosh(s * 0.01) ** 2 * l1 / t)


def test_art_stops_when_the_buffer_average_exceeds_dense() -> None:
    """Buffer of 3: averages 70, 75, 80, 86.67 > 85 at the 4th epoch; best = middle entry (epoch 3)."""
    art = ART(buffer_size=1)
    seq = [(70, 90), (80, 90), (90, 88), (90, 85)]
    stops = [art.update(p, d, payload=i) for i, (p, d) in enumerate(seq)]
    assert stops == [False, False, False, True]
    assert art.best is not None and art.best.epoch == 3 and art.best.payload == 2
    assert art.best_mean == pytest.approx((80 + 90 + 90) / 3)


def test_art_best_before_the_buffer_is_full_and_no_stop_below_dense() -> None:
    art = ART(buffer_size=2)  # 5 entries
    assert art.update(50, 99) is False
    assert art.best.epoch == 1  # the last entry while the buffer is short
    for acc in (60, 55, 52, 51, 50):
        assert art.update(acc, 99) is False
    # averages: 50, 55, 55, 54.25, 53.6, 53.6 -> best stays at the 2nd update's middle (epoch 2)
    assert art.best.epoch == 2
    assert art.best_mean == pytest.approx(55.0)


def test_art_zero_buffer_is_a_plain_comparison() -> None:
    art = ART(buffer_size=0)
    assert art.update(80, 81) is False
    assert art.update(82, 81) is True and art.best.epoch == 2


def test_art_rejects_negative_buffer() -> None:
    with pytest.raises(MethodError):
        ART(buffer_size=-1)
