"""Masked per-sample clipping against its definition: a loop over single examples with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch.errors import PrivacyError
from sparsetorch.privacy.grad_sample import PerSampleClipper, dp_layers

pytest.importorskip("opacus")


class Net(nn.Module):
    """Conv1d, Conv2d, a Linear on 2-D input and a Linear on sequence input (B, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.c1 = nn.Conv1d(3, 4, 2, dilation=2)
        self.seq = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.c2(x))                      # (B, 3, 3, 3)
        h = F.relu(self.c1(h.flatten(2)))           # (B, 4, 7)
        h = torch.tanh(self.seq(h.transpose(1, 2)))  # (B, 7, 5)
        return self.head(h.mean(1))


def reference(model, x, y, clip, masks):
    """Per-example autograd: grad_i ⊙ M, flat norm, clip, sum."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(loss, list(params.values()))
        gs = {n: g * masks[n] if n in masks else g for n, g in zip(params, gs)}
        norm = torch.sqrt(sum(g.double().square().sum() for g in gs.values()))
        norms.append(float(norm))
        c = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in gs.items():
            total[n] += c * g
    return total, torch.tensor(norms)


def random_masks(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density
            for n, p in model.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("clip", [1e9, 0.05])
def test_clipped_sum_equals_a_loop_over_single_examples(density, clip):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))
    masks = random_masks(model, density) if density < 1 else {}
    ref, ref_norms = reference(model, x, y, clip, masks)
    clipper = PerSampleClipper(model, clip, masks)
    with clipper.capture():
        losses = F.cross_entropy(model(x), y, reduction="none")
    grads, norms = clipper.clipped_sum(losses)
    assert set(grads) == set(ref)
    torch.testing.assert_close(norms, ref_norms.float(), rtol=1e-4, atol=1e-6)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)
        if n in masks:  # nothing on pruned coordinates
            assert torch.all(grads[n][~masks[n]] == 0)
    if clip < 1:
        assert (norms > clip).any()  # the clipping branch ran


def test_the_live_norm_is_smaller_than_the_dense_norm_when_pruned_weights_have_gradient():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 4))
    masks = {"0.weight": torch.rand(4, 8) < 0.5}
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    dense, sparse = PerSampleClipper(model, 1.0), PerSampleClipper(model, 1.0, masks)
    for c in (dense, sparse):
        with c.capture():
            losses = F.cross_entropy(model(x), y, reduction="none")
        c.result = c.clipped_sum(losses)
    assert torch.all(sparse.result[1] < dense.result[1])
    # and the sparse one is the norm over live coordinates only, by a per-example loop
    _, ref_norms = reference(model, x, y, 1e9, masks)
    torch.testing.assert_close(sparse.result[1], ref_norms.float(), rtol=1e-4, atol=1e-6)


def test_frozen_parameters_get_no_gradient_and_do_not_count_in_the_norm():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ref, ref_norms = reference(model, x, y, 0.1, {})
    clipper = PerSampleClipper(model, 0.1)
    with clipper.capture():
        losses = F.cross_entropy(model(x), y, reduction="none")
    grads, norms = clipper.clipped_sum(losses)
    assert set(grads) == {"0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(norms, ref_norms.float(), rtol=1e-4, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


def test_chunked_materialisation_gives_the_same_norms():
    torch.manual_seed(3)
    model = Net()
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    masks = random_masks(model, 0.5)
    res = []
    for chunk in (1, 10**9):  # one example per chunk vs all at once
        c = PerSampleClipper(model, 1.0, masks, chunk_bytes=chunk)
        with c.capture():
            losses = F.cross_entropy(model(x), y, reduction="none")
        res.append(c.clipped_sum(losses)[1])
    torch.testing.assert_close(res[0], res[1])


def test_unsupported_layers_and_reuse_are_refused():
    with pytest.raises(PrivacyError, match="BatchNorm1d"):
        dp_layers(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    bn[1].requires_grad_(False)
    assert [la.name for la in dp_layers(bn)] == ["0"]  # frozen norm layers are fine
    with pytest.raises(PrivacyError, match="groups=1"):
        dp_layers(nn.Conv2d(4, 4, 3, groups=2))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(PrivacyError, match="no trainable"):
        dp_layers(frozen)

    lin = nn.Linear(3, 3)
    c = PerSampleClipper(lin, 1.0)
    with c.capture():
        out = lin(lin(torch.randn(2, 3)))
    with pytest.raises(PrivacyError, match="ran 2 times"):
        c.clipped_sum(out.sum(1))
    with c.capture():
        out = lin(torch.randn(2, 3))
    with pytest.raises(PrivacyError, match="one loss per example"):
        c.clipped_sum(out.sum())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_norms_agree_with_opacus_per_sample_gradients():
    """Opacus 1.6 runs with this torch; its GradSampleModule's dense per-sample gradients, masked
    by hand, give the same live norms as ours (a second, independent implementation)."""
    from opacus import GradSampleModule

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    masks = random_masks(model, 0.4)
    x, y = torch.randn(7, 1, 6, 6), torch.randint(0, 5, (7,))
    clipper = PerSampleClipper(model, 1.0, masks)
    with clipper.capture():
        losses = F.cross_entropy(model(x), y, reduction="none")
    _, norms = clipper.clipped_sum(losses)
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    sq = torch.zeros(7)
    for n, p in model.named_parameters():
        g = p.grad_sample * masks[n] if n in masks else p.grad_sample
        sq += g.flatten(1).square().sum(1)
    gsm._close()
    torch.testing.assert_close(norms, sq.sqrt(), rtol=1e-4, atol=1e-6)
