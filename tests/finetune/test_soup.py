"""Sparse Model Soups against their definitions: the uniform soup is the parameter mean, it keeps
the parent's zeros, greedy adds a child only when the score does not get worse, and children
with different masks are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.finetune.soup import SoupError, average_state, soup


def _children(k=3, seed=0):
    torch.manual_seed(seed)
    parent = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    mask0 = torch.rand(5, 6) < 0.5
    mask2 = torch.rand(3, 5) < 0.5
    kids = []
    for i in range(k):
        c = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
        c.load_state_dict(parent.state_dict())
        with torch.no_grad():
            for p in c.parameters():
                p.add_(torch.randn_like(p) * (i + 1))
            c[0].weight.mul_(mask0)
            c[2].weight.mul_(mask2)
            c[1].running_mean.add_(float(i))
            c[1].num_batches_tracked.fill_(10 + i)
        kids.append(c)
    masks = MaskSet({"0.weight": mask0, "2.weight": mask2})
    return kids, masks


def test_uniform_soup_is_the_parameter_mean_and_keeps_the_zeros():
    kids, masks = _children()
    res = soup(kids)
    sd = res.model.state_dict()
    for n, t in sd.items():
        if t.is_floating_point():
            want = sum(k.state_dict()[n] for k in kids) / 3
            assert torch.allclose(t, want, atol=1e-6), n
    assert int(sd["1.num_batches_tracked"]) == 10  # integers are taken from the first model
    masks.verify(res.model)
    assert torch.equal(sd["0.weight"] != 0, masks.masks["0.weight"])
    assert res.used == [0, 1, 2] and res.model is not kids[0]
    assert soup(kids, masks=[masks] * 3).used == [0, 1, 2]


def test_average_is_exact_in_float64():
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        a.weight.fill_(1e8)
        b.weight.fill_(1.0)
    assert float(average_state([a, b])["weight"]) == pytest.approx((1e8 + 1.0) / 2)


def test_greedy_soup_adds_only_what_helps():
    kids, _ = _children(k=4)
    target = kids[1].state_dict()["2.weight"]

    def val(m):  # higher is better: closeness to child 1's last layer
        return -float((m.state_dict()["2.weight"] - target).abs().sum())

    res = soup(kids, "greedy", val)
    assert res.used[0] == 1  # the best child alone first
    # every accepted step was at least as good as the previous soup
    assert all(b >= a for a, b in zip(res.soup_scores, res.soup_scores[1:], strict=False))
    assert len(res.scores) == 4 and res.scores[1] == max(res.scores)
    # the soup of 'used' is exactly their mean
    want = average_state([kids[i] for i in res.used])
    assert all(torch.equal(res.model.state_dict()[n], want[n]) for n in want)
    # minimise a loss instead: the same ranking, reversed sign
    res2 = soup(kids, "greedy", lambda m: -val(m), maximize=False)
    assert res2.used == res.used


def test_mismatches_are_refused_naming_the_tensor():
    kids, masks = _children()
    with torch.no_grad():
        w = kids[2][0].weight
        pos = torch.nonzero(~masks.masks["0.weight"])[0]
        w[pos[0], pos[1]] = 0.5  # a pruned weight revived in child 2
    with pytest.raises(SoupError, match=r"0\.weight: the mask of model 2 differs from model 0's \(first at"):
        soup(kids)
    other = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
    with pytest.raises(SoupError, match=r"2\.weight: model 1 has shape \(4, 5\)"):
        soup([kids[0], other])
    with pytest.raises(SoupError, match="other tensors than model 0"):
        soup([kids[0], nn.Linear(6, 5)])
    with pytest.raises(SoupError, match="at least one model"):
        soup([])
    with pytest.raises(SoupError, match="needs val_fn"):
        soup(kids[:2], "greedy")
    with pytest.raises(SoupError, match="how must be 'uniform' or 'greedy'"):
        soup(kids[:2], "mean")
    with pytest.raises(SoupError, match="2 MaskSets for 3 models"):
        soup(_children()[0], masks=[masks, masks])
    flipped = MaskSet({"0.weight": ~masks.masks["0.weight"], "2.weight": masks.masks["2.weight"]})
    with pytest.raises(SoupError, match="0.weight: the mask of model 1 differs"):
        soup(_children()[0][:2], masks=[masks, flipped])


def test_recalibrate_bn_gives_the_batch_average_statistics_of_the_soup():
    # the definition, computed here by hand: with equal-size batches the re-estimated running mean
    # is the mean of BN's input over all of them and the running variance the mean of the
    # per-batch unbiased variances; weights, modes and momentum are left as they were
    from sparsetorch.finetune import recalibrate_bn

    kids, masks = _children()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 6, generator=g) * 2 + 1 for _ in range(4)]
    res = soup(kids, masks=[masks] * 3, recalibrate=recalibrate_bn(batches))
    m = res.model
    plain = soup(kids).model
    with torch.no_grad():
        pre = [m[0](b) for b in batches]  # what the BatchNorm sees
    want_mean = torch.cat(pre).mean(0)
    want_var = torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0)
    assert torch.allclose(m[1].running_mean, want_mean, atol=1e-5)
    assert torch.allclose(m[1].running_var, want_var, atol=1e-5)
    assert not torch.allclose(plain[1].running_mean, want_mean, atol=1e-2)  # averaging alone is off
    for (n, p), q in zip(m.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), n  # no weight moved
    assert m[1].momentum == 0.1 and m.training == plain.training
    masks.verify(m)
    # a function returning an iterable works too, and an eval-mode model stays in eval mode
    m.eval()
    recalibrate_bn(lambda: iter(batches))(m)
    assert torch.allclose(m[1].running_mean, want_mean, atol=1e-5)
    assert not m.training and not m[1].training
    with pytest.raises(SoupError, match="no batches"):
        recalibrate_bn([])(m)
    with pytest.raises(SoupError, match="batches must be"):
        recalibrate_bn(3)
