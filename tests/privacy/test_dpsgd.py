"""DP-SGD steps against their definition: masked clipping, noise only on live coordinates with
std sigma*C, division by the expected batch size, Poisson sampling, fixed-mask privacy rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch.errors import PrivacyError
from sparsetorch.masks import MaskSet
from sparsetorch.privacy import DPSGD, check_mask_privacy, dp_fit, poisson_batches
from sparsetorch.training.loop import build_sparsifier

pytest.importorskip("opacus")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def half_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MaskSet({n: torch.rand(p.shape, generator=g) < 0.5
                    for n, p in model.named_parameters() if n.endswith("weight")})


def test_noise_is_exactly_zero_on_pruned_coordinates_and_has_std_sigma_c_elsewhere():
    # the noised gradient is read where the optimizer receives it (a step pre-hook), not from the
    # weights afterwards: the step re-applies the masks to the weights, which would hide noise
    # left on pruned coordinates
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 3))
    masks = half_masks(model).apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
        {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"]}))
    sigma, clip, b = 2.0, 0.5, 4.0
    dp = DPSGD(model, opt, noise_multiplier=sigma, clip=clip, expected_batch_size=b, masks=masks,
               mask_is_public=True)
    dp.step(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))  # empty batch: pure noise
    assert len(seen) == 1 and set(seen[0]) == set(names.values())
    noise = {n: g * b for n, g in seen[0].items()}  # p.grad = noise / expected batch size
    assert set(masks) == {"0.weight", "2.weight"}
    for n, z in noise.items():
        assert z.shape == dict(model.named_parameters())[n].shape
        if n in masks:
            assert torch.all(z[~masks[n]] == 0)  # exactly zero, not small
            assert torch.all(dict(model.named_parameters())[n].detach()[~masks[n]] == 0)
            live = z[masks[n]]
        else:  # biases are dense
            live = z.flatten()
        assert torch.all(live != 0)
    live = torch.cat([noise[n][masks[n]] if n in masks else noise[n].flatten() for n in noise])
    assert live.numel() > 2000
    assert live.std().item() == pytest.approx(sigma * clip, rel=0.05)  # N(0, (sigma*C)^2) / b
    assert abs(live.mean().item()) < 0.1


def test_a_step_without_noise_is_the_clipped_masked_sum_over_the_expected_batch_size():
    model = mlp()
    masks = half_masks(model).apply(model)
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 10), torch.randint(0, 3, (5,))
    clip, b = 0.1, 8.0
    # definition, one example at a time
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(5):
        gs = torch.autograd.grad(F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]), list(ref.parameters()))
        gs = [g * masks[n] if n in masks else g for (n, _), g in zip(ref.named_parameters(), gs)]
        c = min(1.0, clip / (torch.sqrt(sum(g.square().sum() for g in gs)).item() + 1e-6))
        for (n, _), g in zip(ref.named_parameters(), gs):
            total[n] += c * g
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = DPSGD(model, opt, noise_multiplier=1e-12, clip=clip, expected_batch_size=b, masks=masks,
               mask_is_public=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp.step(x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), total[n] / b, rtol=1e-4, atol=1e-7)


def test_frozen_parameters_are_untouched_and_absent_from_the_optimizer_check():
    model = mlp()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = DPSGD(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4)
    dp.step(torch.randn(4, 10), torch.randint(0, 3, (4,)))
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    with pytest.raises(PrivacyError, match="optimizer does not hold"):
        DPSGD(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), noise_multiplier=1.0, clip=1.0,
              expected_batch_size=4)


def test_poisson_batches_include_each_example_independently_at_the_sample_rate():
    g = torch.Generator().manual_seed(0)
    sizes, seen = [], torch.zeros(1000)
    for idx in poisson_batches(1000, 0.05, 400, g):
        sizes.append(len(idx))
        seen[idx] += 1
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(50, rel=0.05)
    var = sum((s - mean) ** 2 for s in sizes) / len(sizes)
    assert var == pytest.approx(1000 * 0.05 * 0.95, rel=0.25)  # binomial, not a fixed size
    assert seen.mean().item() == pytest.approx(20, rel=0.05) and seen.min() > 0


def test_masks_that_depend_on_the_private_data_are_refused():
    with pytest.raises(PrivacyError, match="leaks it"):
        check_mask_privacy(build_sparsifier("snip", 0.9, 10))
    check_mask_privacy(build_sparsifier("snip", 0.9, 10), mask_is_public=True)
    for dynamic in ("rigl", "gmp", "set"):
        with pytest.raises(PrivacyError, match="fixed mask"):
            check_mask_privacy(build_sparsifier(dynamic, 0.9, 10), mask_is_public=True)
    for free in ("static", "random"):
        check_mask_privacy(build_sparsifier(free, 0.9, 10))
    check_mask_privacy(None)
    with pytest.raises(PrivacyError, match="mask_is_public=True"):
        check_mask_privacy(masks=half_masks(mlp()))
    check_mask_privacy(masks=half_masks(mlp()), mask_is_public=True)
    model = mlp()
    with pytest.raises(PrivacyError, match="mask_is_public=True"):  # the step class checks too
        DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip=1.0,
              expected_batch_size=4, masks=half_masks(model))


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[3.0] * 5 + [0.0] * 5, [0.0] * 5 + [3.0] * 5, [-3.0] * 10])
    return centers[y] + torch.randn(n, 10, generator=g), y


def test_dp_fit_learns_keeps_masks_exact_and_reports_the_budget():
    train, test = _blobs(600, 0), _blobs(300, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    sp = build_sparsifier("static", 0.8, 10, allocation="uniform")
    r = dp_fit(model, sp, train, test, epsilon=8.0, delta=1e-3, batch_size=60, epochs=3, lr=0.5,
               progress=False)
    assert r.accuracy > 90.0  # easy blobs: private training still learns
    assert r.epsilon <= 8.0 and r.epsilon > 7.5
    assert r.steps == 30 and r.sample_rate == pytest.approx(0.1)
    assert r.sparsity_actual == pytest.approx(0.8, abs=0.01)
    assert 0 < r.mean_batch and abs(r.mean_batch - 60) < 15
    for n in ("0.weight", "2.weight"):
        w = dict(model.named_parameters())[n]
        assert (w == 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert math.isfinite(r.seconds_per_step)


def test_dp_fit_refuses_bad_settings_before_training():
    train = _blobs(50, 0)
    with pytest.raises(PrivacyError, match="exactly one"):
        dp_fit(mlp(), None, train, train, epsilon=1.0, noise_multiplier=1.0, progress=False)
    with pytest.raises(PrivacyError, match="exactly one"):
        dp_fit(mlp(), None, train, train, progress=False)
    with pytest.raises(PrivacyError, match="batch size"):
        dp_fit(mlp(), None, train, train, epsilon=1.0, batch_size=100, progress=False)
    with pytest.raises(PrivacyError, match="clipping norm"):
        dp_fit(mlp(), None, train, train, epsilon=1.0, clip=0.0, batch_size=10, progress=False)
    with pytest.raises(PrivacyError, match="leaks it"):
        dp_fit(mlp(), build_sparsifier("snip", 0.5, 10), train, train, epsilon=1.0, batch_size=10,
               progress=False)
