"""The mask-preserving training engine shared by every recovery method (any ``nn.Module``).

:func:`train_masked` runs AdamW with linear warm-up + cosine decay, gradient accumulation and
gradient-norm clipping on a model whose :class:`~sparsetorch.MaskSet` is the source of truth:

1. ``masks.enforce(model, optimizer)`` zeroes pruned weights and installs the hooks: every
   gradient is masked right after it is accumulated, before anything reads it, so the clipping
   norm, AdamW's moments and the update see only kept weights; pruned weights are re-zeroed
   after every ``optimizer.step()``. Masks are never re-derived from zeros, so a kept weight
   that passes through exactly 0 stays kept.
2. Data comes from ``batch_fn(i)``: micro-batch ``i`` of the run is a pure function of ``i``
   (the callers draw it from a seeded permutation), so a resumed run sees the same batches.
3. Every ``checkpoint_every`` steps the whole state (weights, optimizer moments, RNG, step,
   history, masks) is written atomically to ``checkpoint_dir/last`` -- safetensors and JSON
   only, no pickle; ``resume=`` continues bit-identically to an uninterrupted run.
4. At the end ``masks.verify(model)`` must pass, pattern included (2:4 stays 2:4).

The LM-specific layer (teacher, losses, windows, perplexity) is :mod:`sparsetorch.finetune.lm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, SparseTorchError
from ..masks import MaskSet
from ..memory import peak_rss_mb

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "bf16_available", "lr_factor", "train_masked",
           "CHECKPOINT_NAME", "load_checkpoint"]

#: folder written inside ``checkpoint_dir`` (replaced atomically at every checkpoint)
CHECKPOINT_NAME = "last"
_STATE_FILE = "state.safetensors"
_MASK_FILE = "masks.safetensors"
_CKPT_VERSION = 1
#: result fields that describe this process, not the run (not stored in checkpoints)
_NOT_RESUMED = ("resumed_from", "stopped_early", "bf16")


class FinetuneError(SparseTorchError, ValueError):
    """Fine-tuning settings or inputs that cannot work (the message says which and what to do)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimisation settings of one run. All of them shape the trajectory: a resumed run must
    use the same values (checked), except ``eval_every`` and ``checkpoint_every``."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    #: warm-up steps (linear from 0); None = 5% of ``steps`` (at least 1 when steps >= 20)
    warmup_steps: int | None = None
    #: the cosine decays the learning rate to ``min_lr_ratio * lr`` at the last step
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    #: clip the global norm of the (masked) gradients; None = no clipping
    max_grad_norm: float | None = 1.0
    seed: int = 0
    #: run forward and backward under ``torch.autocast(<device>, torch.bfloat16)``; ``"auto"``: where
    #: the hardware has bf16 arithmetic (CPU flags avx512_bf16 / amx_bf16, or a CUDA device that
    #: supports it) -- see :func:`bf16_available`
    bf16: bool | str = False
    eval_every: int | None = None
    checkpoint_every: int | None = None
    #: what trains besides (or instead of) the model's own weights, as plain JSON data, e.g. the
    #: LoRA settings of :mod:`~sparsetorch.finetune.lora`; None = the model's own parameters.
    #: Part of the trajectory: a checkpoint resumes only with the same adapters.
    adapter: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, allow_none: bool = False) -> None:
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FinetuneError(f"{name} must be a positive integer, got {v!r}")

        positive_int("steps", self.steps)
        positive_int("batch_size", self.batch_size)
        positive_int("grad_accum", self.grad_accum)
        positive_int("eval_every", self.eval_every, allow_none=True)
        positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int)
                                              or not 0 <= self.warmup_steps < self.steps):
            raise FinetuneError(f"warmup_steps must be an integer in [0, steps={self.steps}), got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise FinetuneError(f"lr must be a finite number > 0, got {self.lr!r} (e.g. lr=1e-4)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise FinetuneError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FinetuneError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise FinetuneError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            raise FinetuneError(f"bf16 must be True, False or 'auto', got {self.bf16!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FinetuneError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.adapter is not None and not isinstance(self.adapter, dict):
            raise FinetuneError(f"adapter must be None or a dict of plain settings, got {type(self.adapter).__name__}")

    @property
    def warmup(self) -> int:
        """The warm-up length in steps (``warmup_steps`` or its default)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(0.05 * self.steps)

    def trajectory(self) -> dict[str, Any]:
        """The settings a resumed run must share (everything but eval/checkpoint frequency)."""
        d = dataclasses.asdict(self)
        d.pop("eval_every")
        d.pop("checkpoint_every")
        d["betas"] = list(d["betas"])
        return d


def _resolve_bf16(trajectory: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``trajectory`` with ``bf16="auto"`` replaced by what it means on this machine (True/False);
    checkpoints store the resolved value (older ones may hold "auto": resolved here too)."""
    if trajectory.get("bf16") == "auto":
        return {**trajectory, "bf16": bf16_available(_device_type(model))}
    return trajectory


def bf16_available(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast runs on bf16 hardware here: a CUDA device with bf16 support, or a
    CPU whose flags include ``avx512_bf16`` or ``amx_bf16`` (Linux ``/proc/cpuinfo``). Elsewhere
    bf16 is emulated and slower than fp32."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps (so the first step
    is not wasted at lr 0), then a cosine from 1 down to ``min_ratio`` at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = steps - warmup - 1
    if span <= 0:
        return 1.0
    t = (step - warmup) / span
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class FinetuneResult:
    """What a run did: per-step loss, gradient norm and lr; evaluations; tokens and time."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    #: ``[step, value]`` pairs from ``eval_fn`` (step = optimizer steps done)
    evals: list[list[float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    resumed_from: int | None = None
    #: True when ``on_step`` ended the run before ``config.steps``
    stopped_early: bool = False
    #: whether this process ran under bf16 autocast (``bf16="auto"`` resolved)
    bf16: bool = False
    #: number of parameters the optimizer trained (all weights, or only the adapters of a LoRA run)
    trainable_params: int = 0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or other vectors)."""
    decay, plain = [], []
    for p in model.parameters():  # deduplicated: a tied embedding appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    if not decay and not plain:
        raise FinetuneError("the model has no trainable parameters (every requires_grad is False)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _check_masks_match(masks: MaskSet, saved: MaskSet, where: Path) -> None:
    names = sorted(set(masks.masks) | set(saved.masks))
    for n in names:
        a, b = masks.masks.get(n), saved.masks.get(n)
        if a is None or b is None:
            raise FinetuneError(f"{n}: the checkpoint {where} and the given masks cover different tensors "
                                f"({'only the checkpoint' if a is None else 'only the given masks'} has it); "
                                "resume with the masks the run started with (or masks=None to use the checkpoint's)")
        if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            raise FinetuneError(f"{n}: the given mask differs from the one in checkpoint {where}; resume with "
                                "the masks the run started with (or masks=None to use the checkpoint's)")
        if str(masks.patterns[n]) != str(saved.patterns[n]):
            raise FinetuneError(f"{n}: pattern {masks.patterns[n]} differs from the checkpoint's {saved.patterns[n]}")


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself when it holds a checkpoint, else ``path/last``."""
    p = Path(path)
    return p if (p / _STATE_FILE).is_file() else p / CHECKPOINT_NAME


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], MaskSet]:
    """The state tree and the MaskSet of a checkpoint written by :func:`train_masked`."""
    from ..statefile import load_state

    p = checkpoint_path(path)
    if not (p / _STATE_FILE).is_file():
        raise CheckpointError(f"no fine-tuning checkpoint at {path} (expected {p / _STATE_FILE}); pass the "
                              "checkpoint_dir of an earlier run or its 'last' folder")
    state = load_state(p / _STATE_FILE)
    if not isinstance(state, dict) or state.get("kind") != "sparsetorch-finetune":
        raise CheckpointError(f"{p / _STATE_FILE} is not a sparsetorch fine-tuning checkpoint")
    if state.get("version") != _CKPT_VERSION:
        raise CheckpointError(f"{p} has checkpoint version {state.get('version')!r}; this sparsetorch reads "
                              f"version {_CKPT_VERSION}")
    return state, MaskSet.load(p / _MASK_FILE)


def _save_checkpoint(folder: Path, state: dict[str, Any], masks: MaskSet) -> None:
    from ..atomic import atomic_dir, is_sparsetorch_dir
    from ..statefile import save_state

    target = folder / CHECKPOINT_NAME
    # replace our own earlier checkpoint; refuse a folder of the same name the library did not write
    with atomic_dir(target, overwrite=is_sparsetorch_dir(target)) as tmp:
        save_state(state, tmp / _STATE_FILE)
        masks.save(tmp / _MASK_FILE)


def train_masked(
    model: nn.Module,
    masks: MaskSet | None,
    batch_fn: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], tuple[Tensor, int]],
    config: FinetuneConfig,
    *,
    eval_fn: Callable[[nn.Module], float] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    desc: str = "finetune",
    on_step: Callable[[int, FinetuneResult, nn.Module], bool | None] | None = None,
    eval_before: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place for ``config.steps`` optimizer steps without changing its masks.

    ``batch_fn(i)`` returns micro-batch ``i`` (``i = step * grad_accum + j``); ``loss_fn(model,
    batch)`` returns ``(loss, tokens_or_samples)``; ``eval_fn(model)`` (optional) is called every
    ``eval_every`` steps and after the last one, in eval mode. ``masks=None`` with ``resume``
    takes the checkpoint's masks; without ``resume`` it is an error (nothing to preserve).
    ``on_step(steps_done, result, model)`` runs after every step (and its evaluation and
    checkpoint); returning True stops the run there (e.g. at a wall-clock budget), with
    ``result.stopped_early`` set. The masks are verified either way. With ``eval_before`` a fresh
    run also evaluates before the first step (``result.evals[0] == [0, value]``; kept on resume).
    """
    if not isinstance(model, nn.Module):
        raise FinetuneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, FinetuneConfig):
        raise FinetuneError("config must be a FinetuneConfig")
    result = FinetuneResult()
    start = 0
    state: dict[str, Any] | None = None
    if resume is not None:
        state, saved_masks = load_checkpoint(resume)
        if masks is not None:
            _check_masks_match(masks, saved_masks, checkpoint_path(resume))
        masks = saved_masks
        # "auto" is compared as what it resolved to: a run checkpointed in fp32 and resumed where
        # "auto" means bf16 (or the reverse) would not continue the same trajectory
        mine = _resolve_bf16(config.trajectory(), model)
        theirs = _resolve_bf16(state["config"], model)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise FinetuneError(
                f"cannot resume {checkpoint_path(resume)}: its run used different settings for "
                + ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} now)" for k in diff)
                + "; resume with the same settings (only eval_every and checkpoint_every may change)")
        start = int(state["step"])
        if start > config.steps:
            raise FinetuneError(f"checkpoint is at step {start}, beyond steps={config.steps}")
    if masks is None:
        raise FinetuneError("masks is None: pass the MaskSet of the pruned model (the masks to preserve), "
                            "e.g. MaskSet.from_model(model) for a model whose zeros are its mask")
    if not isinstance(masks, MaskSet):
        raise FinetuneError(f"masks must be a sparsetorch.MaskSet, got {type(masks).__name__}")

    opt = _optimizer(model, config)
    if state is not None:
        try:
            model.load_state_dict(state["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {checkpoint_path(resume)} does not fit this model: {exc}") from None
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        hist = state["history"]
        result = FinetuneResult(**{**{k: v for k, v in hist.items() if k not in _NOT_RESUMED},
                                   "resumed_from": start})
    else:
        torch.manual_seed(config.seed)
    masks.enforce(model, opt)  # after loading: zeroes pruned weights, hooks the grads and the step
    params = [p for g in opt.param_groups for p in g["params"]]
    result.trainable_params = sum(p.numel() for p in params)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        from ..atomic import check_output_dir, is_sparsetorch_dir

        last = ckpt_dir / CHECKPOINT_NAME
        if last.exists() and not is_sparsetorch_dir(last) and resume is None:
            check_output_dir(last, overwrite=False)  # raises OutputExistsError naming it

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    use_bf16 = bf16_available(_device_type(model)) if config.bf16 == "auto" else bool(config.bf16)
    result.bf16 = use_bf16
    autocast = (torch.autocast(_device_type(model), dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    warmup = config.warmup
    if eval_fn is not None and eval_before and state is None:
        model.eval()
        with torch.no_grad():
            result.evals.append([0, float(eval_fn(model))])
    t_run = time.perf_counter()
    seconds_before = result.seconds
    was_training = model.training
    try:
        for step in range(start, config.steps):
            model.train()
            lr = config.lr * lr_factor(step, config.steps, warmup, config.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum, tokens = 0.0, 0
            for j in range(config.grad_accum):
                batch = batch_fn(step * config.grad_accum + j)
                with autocast:
                    loss, n = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FinetuneError(f"the loss is {float(loss.detach())} at step {step}; lower the lr (now {lr:.3g}) "
                                        "or check the data")
                (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach())
                tokens += int(n)
            # the grads are already masked (post-accumulate hooks): the norm is over kept weights
            # max_norm=inf measures the norm without scaling (the clip factor is clamped to 1)
            limit = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            opt.step()  # masks.rezero() runs as a post-step hook
            opt.zero_grad(set_to_none=True)
            result.steps = step + 1
            result.tokens += tokens
            result.losses.append(loss_sum / config.grad_accum)
            result.grad_norms.append(norm)
            result.lrs.append(lr)
            elapsed = time.perf_counter() - t_run
            result.seconds = seconds_before + elapsed
            if bar is not None:
                done = step + 1 - start
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}",
                                tok_s=f"{(result.tokens - _tokens_before(state)) / max(elapsed, 1e-9):.0f}"
                                if done else "")
                bar.update(1)
            last_step = step + 1 == config.steps
            if eval_fn is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or last_step):
                model.eval()
                with torch.no_grad():
                    result.evals.append([step + 1, float(eval_fn(model))])
            if ckpt_dir is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                result.peak_rss_mb = max(result.peak_rss_mb, peak_rss_mb())
                _save_checkpoint(ckpt_dir, {
                    "kind": "sparsetorch-finetune",
                    "version": _CKPT_VERSION,
                    "step": step + 1,
                    "config": _resolve_bf16(config.trajectory(), model),
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": {k: v for k, v in result.to_dict().items() if k not in _NOT_RESUMED},
                }, masks)
            if on_step is not None and on_step(step + 1, result, model) and not last_step:
                result.stopped_early = True
                if eval_fn is not None and not (result.evals and result.evals[-1][0] == step + 1):
                    model.eval()
                    with torch.no_grad():
                        result.evals.append([step + 1, float(eval_fn(model))])
                break
    finally:
        if bar is not None:
            bar.close()
        masks.release()
        model.train(was_training)
    result.peak_rss_mb = max(result.peak_rss_mb, peak_rss_mb())
    masks.verify(model)
    return result


def _tokens_before(state: dict[str, Any] | None) -> int:
    """Tokens counted before this process started (0 for a fresh run)."""
    return int(state["history"]["tokens"]) if state is not None else 0
