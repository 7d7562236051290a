"""The mask-preserving engine on a plain nn.Module: schedule, clipping on masked gradients,
an AdamW reference loop written out by hand, checkpoints and exact resume, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetorch import MaskSet
from sparsetorch.errors import CheckpointError, OutputExistsError
from sparsetorch.finetune import (
    FinetuneConfig,
    FinetuneError,
    load_checkpoint,
    lr_factor,
    train_masked,
)


def test_lr_factor_by_hand():
    # 10 steps, 2 of warm-up, cosine to 0.1 at the last step (step 9)
    got = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert got[0] == 0.5 and got[1] == 1.0 and got[2] == 1.0 and got[9] == pytest.approx(0.1)
    mid = 2 + 3.5  # halfway through the 7-step cosine span
    assert lr_factor(5, 10, 2, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (5 - 2) / 7)))
    assert mid == 5.5
    assert all(a >= b for a, b in zip(got[1:], got[2:], strict=False))
    assert [lr_factor(s, 3, 0, 0.0) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(0, 1, 0, 0.0) == 1.0  # a single step runs at the full lr
    assert FinetuneConfig(steps=100).warmup == 5 and FinetuneConfig(steps=10).warmup == 0


def _problem(seed: int = 0):
    """A 6x8 linear map, half of it pruned, whose loss pulls hard on the pruned weights."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8, generator=g))
    mask = torch.rand(6, 8, generator=g) < 0.5
    target = torch.randn(6, 8, generator=g)
    scale = torch.where(mask, 1.0, 1000.0)  # pruned coordinates have 1000x the curvature

    def loss_fn(model, _batch):
        return ((model.weight - target) ** 2 * scale).sum(), 1

    return lin, MaskSet({"weight": mask}), loss_fn, mask, target, scale


CFG = dict(steps=5, lr=0.05, warmup_steps=1, min_lr_ratio=0.2, weight_decay=0.1, max_grad_norm=1.0,
           betas=(0.9, 0.99))


def _reference(clip_before_mask: bool):
    """AdamW by hand: mask the gradient, clip, step, re-zero (or, wrongly, clip first)."""
    lin, _, loss_fn, mask, _, _ = _problem()
    opt = torch.optim.AdamW([lin.weight], lr=CFG["lr"], betas=CFG["betas"], weight_decay=CFG["weight_decay"])
    with torch.no_grad():
        lin.weight.mul_(mask)
    norms = []
    for step in range(CFG["steps"]):
        for gr in opt.param_groups:
            gr["lr"] = CFG["lr"] * lr_factor(step, CFG["steps"], 1, CFG["min_lr_ratio"])
        loss, _ = loss_fn(lin, None)
        loss.backward()
        if clip_before_mask:
            norms.append(float(torch.nn.utils.clip_grad_norm_([lin.weight], 1.0)))
            lin.weight.grad.mul_(mask)
        else:
            lin.weight.grad.mul_(mask)
            norms.append(float(torch.nn.utils.clip_grad_norm_([lin.weight], 1.0)))
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            lin.weight.mul_(mask)
    return lin.weight.detach(), norms


def test_engine_equals_hand_written_adamw_with_masked_clipping():
    lin, masks, loss_fn, mask, target, scale = _problem()
    res = train_masked(lin, masks, lambda i: None, loss_fn, FinetuneConfig(**CFG), progress=False)
    want, norms = _reference(clip_before_mask=False)
    assert torch.equal(lin.weight.detach(), want)
    assert res.grad_norms == pytest.approx(norms, rel=1e-6)
    # the first clipping norm is the norm of the masked gradient, not of the full one
    w0 = _problem()[0].weight.detach() * mask
    full = 2 * (w0 - target) * scale
    assert res.grad_norms[0] == pytest.approx(float((full * mask).norm()), rel=1e-5)
    assert float(full.norm()) > 100 * res.grad_norms[0]
    # clipping before masking (the pitfall) takes another trajectory: this test can fail
    wrong, _ = _reference(clip_before_mask=True)
    assert not torch.allclose(wrong, want, atol=1e-4)
    assert torch.equal(lin.weight.detach() != 0, mask & (want != 0)) and not (lin.weight.detach()[~mask]).any()
    assert res.steps == 5 and res.tokens == 5 and len(res.losses) == 5
    assert res.lrs == pytest.approx([CFG["lr"] * lr_factor(s, 5, 1, 0.2) for s in range(5)])


def test_accumulation_averages_micro_batches():
    """grad_accum=2 with micro-batches a, b equals one step on the mean of their losses."""
    lin, masks, _, mask, target, _ = _problem()
    data = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def loss_fn(model, x):
        return ((model.weight - x) ** 2).sum(), 3

    cfg = FinetuneConfig(steps=2, lr=0.01, grad_accum=2, max_grad_norm=None, warmup_steps=0)
    res = train_masked(lin, masks, lambda i: data[i], loss_fn, cfg, progress=False)
    lin2, masks2, *_ = _problem()

    def mean_loss(model, i):
        return (((model.weight - data[2 * i]) ** 2).sum() + ((model.weight - data[2 * i + 1]) ** 2).sum()) / 2, 6

    cfg2 = FinetuneConfig(steps=2, lr=0.01, grad_accum=1, max_grad_norm=None, warmup_steps=0)
    train_masked(lin2, masks2, lambda i: i, mean_loss, cfg2, progress=False)
    assert torch.allclose(lin.weight, lin2.weight, atol=1e-6)
    assert res.tokens == 12


class _Stop(Exception):
    pass


def test_resume_is_bit_identical(tmp_path):
    cfg = FinetuneConfig(**CFG, checkpoint_every=2)
    full_model, full_masks, loss_fn, *_ = _problem()
    full = train_masked(full_model, full_masks, lambda i: None, loss_fn, cfg,
                        checkpoint_dir=tmp_path / "a", progress=False)

    part_model, part_masks, *_ = _problem()

    def interrupted(i):
        if i == 3:  # after the checkpoint at step 2 and one more step
            raise _Stop
        return None

    with pytest.raises(_Stop):
        train_masked(part_model, part_masks, interrupted, loss_fn, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    state, saved = load_checkpoint(tmp_path / "b")
    assert state["step"] == 2 and torch.equal(saved.masks["weight"], part_masks.masks["weight"])
    fresh, fresh_masks, *_ = _problem(seed=1)  # other weights: all of it must come from the checkpoint
    res = train_masked(fresh, None, lambda i: None, loss_fn, cfg, checkpoint_dir=tmp_path / "b",
                       resume=tmp_path / "b", progress=False)
    assert torch.equal(fresh.weight, full_model.weight)
    assert res.losses == full.losses and res.grad_norms == full.grad_norms and res.resumed_from == 2
    assert res.steps == 5 and res.tokens == full.tokens


def test_resume_refuses_other_settings_and_masks(tmp_path):
    cfg = FinetuneConfig(**CFG, checkpoint_every=5)
    lin, masks, loss_fn, mask, *_ = _problem()
    train_masked(lin, masks, lambda i: None, loss_fn, cfg, checkpoint_dir=tmp_path, progress=False)
    other = FinetuneConfig(**{**CFG, "lr": 0.1}, checkpoint_every=5)
    with pytest.raises(FinetuneError, match=r"different settings for lr \(0\.05 there, 0\.1 now\)"):
        train_masked(lin, None, lambda i: None, loss_fn, other, resume=tmp_path, progress=False)
    # eval_every and checkpoint_every may change
    train_masked(lin, None, lambda i: None, loss_fn, FinetuneConfig(**CFG, eval_every=1), resume=tmp_path,
                 progress=False)
    flipped = MaskSet({"weight": ~mask})
    with pytest.raises(FinetuneError, match=r"weight: the given mask differs from the one in checkpoint"):
        train_masked(lin, flipped, lambda i: None, loss_fn, cfg, resume=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="no fine-tuning checkpoint"):
        train_masked(lin, masks, lambda i: None, loss_fn, cfg, resume=tmp_path / "nothing", progress=False)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train_masked(nn.Linear(8, 6), None, lambda i: None, loss_fn, cfg, resume=tmp_path, progress=False)


def test_checkpoint_never_replaces_foreign_files(tmp_path):
    lin, masks, loss_fn, *_ = _problem()
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        train_masked(lin, masks, lambda i: None, loss_fn, FinetuneConfig(steps=2, checkpoint_every=1),
                     checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "last" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("kw", "match"), [
    ({"steps": 0}, "steps must be a positive integer"), ({"steps": -3}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"), ({"steps": 5, "lr": -1e-3}, "lr must be a finite number > 0"),
    ({"steps": 5, "lr": 0.0}, "lr must be"), ({"steps": 5, "lr": float("nan")}, "lr must be"),
    ({"steps": 5, "batch_size": 0}, "batch_size"), ({"steps": 5, "grad_accum": 0}, "grad_accum"),
    ({"steps": 5, "warmup_steps": 5}, r"warmup_steps must be an integer in \[0, steps=5\)"),
    ({"steps": 5, "max_grad_norm": 0.0}, "max_grad_norm must be > 0 or None"),
    ({"steps": 5, "weight_decay": -0.1}, "weight_decay"), ({"steps": 5, "min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"steps": 5, "betas": (0.9, 1.0)}, "betas"), ({"steps": 5, "eval_every": 0}, "eval_every")])
def test_bad_settings(kw, match):
    with pytest.raises(FinetuneError, match=match):
        FinetuneConfig(**kw)


def test_bad_inputs():
    lin, masks, loss_fn, *_ = _problem()
    with pytest.raises(FinetuneError, match="masks is None"):
        train_masked(lin, None, lambda i: None, loss_fn, FinetuneConfig(steps=1), progress=False)
    with pytest.raises(FinetuneError, match="must be a sparsetorch.MaskSet"):
        train_masked(lin, {"weight": None}, lambda i: None, loss_fn, FinetuneConfig(steps=1), progress=False)
    with pytest.raises(FinetuneError, match="model must be a torch.nn.Module"):
        train_masked("model", masks, lambda i: None, loss_fn, FinetuneConfig(steps=1), progress=False)
    frozen = nn.Linear(8, 6, bias=False).requires_grad_(False)
    with pytest.raises(FinetuneError, match="no trainable parameters"):
        train_masked(frozen, masks, lambda i: None, loss_fn, FinetuneConfig(steps=1), progress=False)
    w = lin.weight.detach().clone()
    with pytest.raises(FinetuneError, match=r"the loss is nan at step 0"):
        train_masked(lin, masks, lambda i: None, lambda m, b: (m.weight.sum() * float("nan"), 1),
                     FinetuneConfig(steps=1), progress=False)
    assert torch.equal(lin.weight.detach(), w * masks.masks["weight"])  # no update was taken


def test_on_step_can_stop_the_run_and_it_is_evaluated_there():
    lin, masks, loss_fn, *_ = _problem()
    seen = []

    def on_step(done, res, model):
        seen.append((done, len(res.losses)))
        return done == 2

    res = train_masked(lin, masks, lambda i: None, loss_fn, FinetuneConfig(steps=10, eval_every=5), progress=False,
                       on_step=on_step, eval_fn=lambda m: float(m.weight.detach().abs().sum()))
    assert seen == [(1, 1), (2, 2)] and res.steps == 2 and res.stopped_early
    assert res.evals[0][0] == 0 and res.evals[1:] == [[2, pytest.approx(float(lin.weight.detach().abs().sum()))]]
    masks.verify(lin)


def test_bf16_modes(monkeypatch):
    import sparsetorch.finetune.loop as loop_mod

    with pytest.raises(FinetuneError, match=r"bf16 must be True, False or 'auto'"):
        FinetuneConfig(steps=1, bf16="yes")
    for avail in (True, False):
        monkeypatch.setattr(loop_mod, "bf16_available", lambda device, a=avail: a)
        lin, masks, loss_fn, *_ = _problem()
        res = train_masked(lin, masks, lambda i: None, loss_fn, FinetuneConfig(steps=1, bf16="auto"), progress=False)
        assert res.bf16 is avail
    res = train_masked(*_problem()[:1], _problem()[1], lambda i: None, _problem()[2], FinetuneConfig(steps=1, bf16=False),
                       progress=False)
    assert res.bf16 is False


def test_resume_compares_what_bf16_auto_resolved_to(tmp_path, monkeypatch):
    """bf16="auto" is stored as what it meant when the checkpoint was written: resuming where
    "auto" means something else is refused (it would not continue the same trajectory), while an
    explicit value equal to the stored one resumes."""
    import sparsetorch.finetune.loop as loop

    lin, masks, loss_fn, *_ = _problem()
    monkeypatch.setattr(loop, "bf16_available", lambda device_type="cpu": False)
    cfg = FinetuneConfig(**CFG, bf16="auto", checkpoint_every=5)
    train_masked(lin, masks, lambda i: None, loss_fn, cfg, checkpoint_dir=tmp_path, progress=False)
    state, _ = load_checkpoint(tmp_path)
    assert state["config"]["bf16"] is False  # resolved, not "auto"
    monkeypatch.setattr(loop, "bf16_available", lambda device_type="cpu": True)
    with pytest.raises(FinetuneError, match=r"bf16 \(False there, True now\)"):
        train_masked(lin, None, lambda i: None, loss_fn, cfg, resume=tmp_path, progress=False)
    res = train_masked(lin, None, lambda i: None, loss_fn, FinetuneConfig(**CFG, bf16=False), resume=tmp_path,
                       progress=False)
    assert res.bf16 is False
