"""MaskSet: zeros stay zero through training, verify finds violations, masks round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.errors import CheckpointError, MaskError
from sparsetorch.patterns import NM


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _masks(model, pattern="unstructured", s=0.5):
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    return MaskSet.from_scores(scores, s, pattern)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    ],
    ids=["adamw", "adam-l2", "sgd-nesterov"],
)
def test_enforce_keeps_zeros_through_20_steps(make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    # warm optimizer state while dense, so momentum/moments of soon-pruned weights are non-zero
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    masks = _masks(model, "2:4")
    masks.enforce(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        for n, p in model.named_parameters():
            if n in masks:
                assert p.grad[~masks[n]].abs().max() == 0  # gradient masked
        opt.step()
    for n, m in masks.items():
        p = dict(model.named_parameters())[n]
        assert p[~m].abs().max() == 0, n
        assert not torch.equal(p, before[n])  # kept weights still train
    masks.verify(model)
    masks.release()


def test_enforce_with_gradient_accumulation():
    """Accumulated .grad = sum of the micro-batch gradients on kept weights, 0 on pruned ones."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = _masks(model).enforce(model, opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        micro = [torch.randn(4, 16, generator=g) for _ in range(3)]
        # reference: each micro-batch's gradient on a hook-free copy of the masked model
        ref = _model()
        ref.load_state_dict(model.state_dict())
        expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
        for x in micro:
            ref.zero_grad()
            ref(x).sum().backward()
            for n, p in ref.named_parameters():
                expected[n] += p.grad
        for x in micro:  # accumulate 3 micro-batches
            model(x).sum().backward()
        for n, p in model.named_parameters():
            if n in masks:
                keep = masks[n]
                assert bool((p.grad[~keep] == 0).all()), n
                assert bool((expected[n][~keep] != 0).any())  # the hook had something to mask
                torch.testing.assert_close(p.grad[keep], expected[n][keep], rtol=1e-5, atol=1e-6)
            else:  # biases are not masked
                torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)
        opt.step()
        opt.zero_grad()
    masks.verify(model)


def test_release_removes_hooks():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masks = _masks(model).enforce(model, opt)
    masks.release()
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    with pytest.raises(MaskError):
        masks.verify(model)


def test_verify_names_tensor_and_position():
    model = _model()
    masks = _masks(model).apply(model)
    masks.verify(model)
    m = masks["2.weight"]
    pos = tuple(torch.nonzero(~m)[0].tolist())
    with torch.no_grad():
        model[2].weight[pos] = 0.5
    with pytest.raises(MaskError, match=rf"2\.weight: weight at position \({pos[0]}, {pos[1]}\)"):
        masks.verify(model)


def test_verify_checks_pattern():
    model = _model()
    masks = MaskSet.from_model(model, pattern="2:4")  # dense weights: every group has 4 non-zeros
    with pytest.raises(MaskError, match="2:4"):
        masks.verify(model)


def test_sparsity_counts():
    model = _model()
    masks = _masks(model, s=0.25)
    st = masks.sparsity()
    assert st.zeros == {"0.weight": 128, "2.weight": 64}
    assert st.overall == pytest.approx(0.25)


def test_from_model_recovers_masks():
    model = _model()
    masks = _masks(model, "2:4").apply(model)
    rec = MaskSet.from_model(model, pattern="2:4")
    for n in masks:
        assert torch.equal(rec[n], masks[n])
    rec.verify(model)


def test_state_dict_and_file_round_trip(tmp_path):
    model = _model()
    masks = _masks(model, "2:4")
    clone = MaskSet({}, None)
    clone.load_state_dict(masks.state_dict())
    path = tmp_path / "m.safetensors"
    masks.save(path)
    loaded = MaskSet.load(path)
    for ms in (clone, loaded):
        assert ms.names() == masks.names()
        for n in masks:
            assert torch.equal(ms[n], masks[n])
            assert isinstance(ms.patterns[n], NM)


def test_mismatched_mask_raises():
    model = _model()
    bad = MaskSet({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="shape"):
        bad.apply(model)
    with pytest.raises(MaskError, match="different model"):
        MaskSet({"nope.weight": torch.ones(2, dtype=torch.bool)}).verify(model)


def test_corrupt_or_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MaskSet.load(tmp_path / "missing.safetensors")
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError):
        MaskSet.load(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _model()
    masks = _masks(model)
    path = tmp_path / "m.safetensors"
    masks.save(path)
    good = path.read_bytes()
    import safetensors.torch as sft

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sft, "save_file", boom)
    with pytest.raises(RuntimeError):
        masks.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
