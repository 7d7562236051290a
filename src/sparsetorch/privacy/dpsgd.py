"""DP-SGD on sparse models: masked per-sample gradients, clipped on the live norm, Gaussian noise
on live coordinates only, Poisson sampling, and an accountant.

One step, for a batch drawn by Poisson sampling at rate q (every example independently, so the
batch size varies):

1. per-sample gradients ``g_i`` of the trainable parameters, masked: ``g_i ⊙ M``;
2. clipped on the live norm: ``g_i ⊙ M · min(1, C / ||g_i ⊙ M||)`` (flat over all parameters);
3. summed, plus ``N(0, σ²C²)`` on live coordinates only (noise on a pruned coordinate would be
   masked away again: it costs nothing in privacy but wastes nothing either);
4. divided by the *expected* batch size ``q·N`` (not the drawn one, which is private);
5. the optimizer steps, and the mask re-zeros pruned weights.

Why sparse helps: the noise a step adds has energy ``σ²C²·d_live`` instead of ``σ²C²·d``, and no
clipping budget goes to coordinates that are pruned anyway.

**The mask must not depend on the private data.** A mask chosen at initialisation without data
(random, ERK, SynFlow) or computed on public data is part of the model definition and costs no
privacy. A mask computed by a data-dependent method (SNIP, GraSP, Wanda, SparseGPT, RigL's
gradient regrowth ...) on the private training set leaks it and is refused unless the caller
states ``mask_is_public=True``. Masks must also stay fixed during DP training.

The random numbers come from ``torch.Generator`` (reproducible with ``seed``), which is not a
cryptographically secure generator; for a deployment that needs one, see Opacus's secure mode.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PrivacyError, require
from ..masks import MaskSet
from .accountant import PrivacyBudget, check_privacy_args
from .grad_sample import CHUNK_BYTES, PerSampleClipper

#: per-sample losses of a batch: (model, inputs, targets) -> (B,)
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def stream_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream, derived from the run's ``seed``.

    The noise, the Poisson sampler and a random mask must not share a seed: ``torch.rand`` and
    ``torch.randn`` on generators seeded alike read the same underlying numbers, so a mask drawn
    with ``rand < density`` would select exactly the coordinates whose noise is small (and the
    sampler would pick examples by the mask's coin flips).
    """
    digest = hashlib.sha256(f"{int(seed)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cross_entropy_per_sample(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The default loss: cross-entropy of each example, shape (B,)."""
    return F.cross_entropy(model(x), y, reduction="none")


def check_mask_privacy(sparsifier: Any = None, *, masks: MaskSet | None = None,
                       mask_is_public: bool = False) -> None:
    """Refuse masks that may encode the private training data.

    ``sparsifier`` (a :class:`~sparsetorch.training.base.Sparsifier` or None for dense): a
    method that scores weights on data at initialisation (``needs_data``: SNIP, GraSP) is refused
    unless ``mask_is_public`` (the batches it saw were public); a method that changes masks during
    training (GMP, SET, RigL, SNFS, AC-DC, the N:M methods ...) is refused always: its updates read
    the private gradients or weights at every step and DP-SGD here keeps masks fixed. ``masks``
    given alone (a MaskSet made elsewhere): its origin is unknown, so ``mask_is_public=True`` is
    required to say it does not depend on the private data.
    """
    if sparsifier is not None:
        from ..training.base import Sparsifier

        name = getattr(sparsifier, "name", type(sparsifier).__name__)
        if type(sparsifier)._update is not Sparsifier._update:
            raise PrivacyError(
                f"method {name!r} changes the masks during training from the private data "
                "(gradients, weights or momentum of every step); DP-SGD needs a fixed mask: use "
                "'static'/'random' (random ERK or uniform), 'synflow' (data-free), or a mask "
                "computed on public data."
            )
        if getattr(sparsifier, "needs_data", False) and not mask_is_public:
            raise PrivacyError(
                f"method {name!r} chooses its mask by scoring weights on training data; a mask "
                "computed on the private data leaks it (its privacy cost is not accounted). Use a "
                "data-free mask ('static', 'random', 'synflow'), or compute it on public data and "
                "pass mask_is_public=True (CLI: --dp-mask-is-public)."
            )
    elif masks is not None and not mask_is_public:
        raise PrivacyError(
            "masks given without the method that made them: DP-SGD cannot tell whether they "
            "depend on the private data. Pass mask_is_public=True if they were chosen without it "
            "(random, ERK, SynFlow) or on public data; a mask computed by a data-dependent method "
            "on the private training set leaks it."
        )


class DPSGD:
    """DP-SGD steps for a model (with optional fixed masks) and any ``torch.optim`` optimizer.

    The optimizer must hold the model's trainable parameters; pruned weights are re-zeroed after
    every step.

    Args:
        noise_multiplier: σ; the noise standard deviation is ``σ·clip``.
        clip: the per-sample clipping norm C (on the live coordinates).
        expected_batch_size: q·N, the divisor of the noisy sum.
        masks: fixed masks by parameter name (True = live), or None for a dense model.
        mask_is_public: required with ``masks``: the caller states that they do not depend on
            the private data (see :func:`check_mask_privacy`; :func:`dp_fit` checks the method).
        seed: seed of the noise generator (through :func:`stream_seed`; reproducible, not
            cryptographically secure).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 clip: float, expected_batch_size: float, masks: MaskSet | None = None,
                 mask_is_public: bool = False, loss_fn: LossFn = cross_entropy_per_sample,
                 seed: int = 0, chunk_bytes: int = CHUNK_BYTES) -> None:
        check_privacy_args(noise_multiplier=noise_multiplier, clip=clip)
        check_mask_privacy(masks=masks, mask_is_public=mask_is_public)
        if not (expected_batch_size > 0):
            raise PrivacyError(f"expected_batch_size must be positive, got {expected_batch_size!r}.")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.noise_multiplier, self.clip = float(noise_multiplier), float(clip)
        self.expected_batch_size = float(expected_batch_size)
        self.masks = masks
        mask_tensors = dict(masks.items()) if masks is not None else {}
        self.clipper = PerSampleClipper(model, clip, mask_tensors, chunk_bytes)
        self.params = self.clipper.params()
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.params.items() if id(p) not in in_opt]
        if missing:
            raise PrivacyError(f"the optimizer does not hold the trainable parameters {missing[:3]}; "
                               "build it from the model's trainable parameters.")
        self.generator = torch.Generator().manual_seed(stream_seed(seed, "dp-noise"))
        self.steps = 0
        #: per-sample live norms of the last step (before clipping), for monitoring
        self.last_norms: Tensor | None = None

    def step(self, x: Tensor, y: Tensor) -> float:
        """One DP-SGD step on the Poisson batch ``(x, y)`` (may be empty); returns its mean loss
        (0.0 for an empty batch). The loss is computed from private data: log it only in
        aggregate, as here."""
        grads: dict[str, Tensor]
        loss = 0.0
        if len(x):
            with self.clipper.capture():
                losses = self.loss_fn(self.model, x, y)
            grads, self.last_norms = self.clipper.clipped_sum(losses)
            loss = float(losses.detach().mean())
        else:
            grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
            self.last_norms = torch.zeros(0, device=x.device)
        std = self.noise_multiplier * self.clip
        for name, p in self.params.items():
            # drawn on the CPU generator (reproducible on any device), then moved
            noise = (torch.randn(p.shape, generator=self.generator) * std).to(p.device)
            g = grads[name].to(p.device) + noise
            if self.masks is not None and name in self.masks:
                g = g * self.masks[name].to(g.device)  # noise on live coordinates only
            p.grad = (g / self.expected_batch_size).to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masks is not None:
            self.masks.apply(self.model)
        self.steps += 1
        return loss


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator):
    """Indices of ``steps`` Poisson batches: each of ``n`` examples joins each batch independently
    with probability ``sample_rate`` (the sampling the accountant assumes)."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def check_dp_options(epsilon: float | None, noise_multiplier: float | None, batch_size: int,
                     n: int, epochs: int) -> None:
    """The run-shape checks of :func:`dp_fit` (also made by the CLI before reading data)."""
    if (epsilon is None) == (noise_multiplier is None):
        raise PrivacyError("give exactly one of epsilon (the noise is calibrated to it) or a noise multiplier.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise PrivacyError(f"the expected batch size must be an integer in [1, {n}] (the training "
                           f"examples), got {batch_size!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise PrivacyError(f"epochs must be a positive integer, got {epochs!r}.")


@dataclass
class DPFitResult:
    """What one DP-SGD training run produced."""

    accuracy: float
    accuracy_per_epoch: list[float]
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float
    accountant: str
    seconds: float
    seconds_per_step: float
    sparsity_actual: float
    mean_batch: float
    clipped_fraction: float
    layer_sparsity: dict[str, float] = field(default_factory=dict)


def dp_fit(
    model: nn.Module,
    sparsifier: Any,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float = 1e-5,
    clip: float = 1.0,
    epochs: int = 1,
    batch_size: int = 512,
    lr: float = 2.0,
    momentum: float = 0.9,
    accountant: str = "prv",
    mask_is_public: bool = False,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> DPFitResult:
    """Train ``model`` with DP-SGD (SGD + momentum, cosine learning rate) for ``epochs`` epochs of
    Poisson batches of expected size ``batch_size``, optionally sparse through an (unattached)
    fixed-mask ``sparsifier``; give ``epsilon`` (σ is calibrated by the accountant) or
    ``noise_multiplier``. Returns accuracy and the privacy spent (ε at ``delta``)."""
    from ..training.loop import sparsity_report, train_epochs

    check_privacy_args(epsilon=epsilon, delta=delta, clip=clip, noise_multiplier=noise_multiplier,
                       accountant=accountant)
    xtr, ytr = train
    n = len(xtr)
    check_dp_options(epsilon, noise_multiplier, batch_size, n, epochs)
    check_mask_privacy(sparsifier, mask_is_public=mask_is_public)
    # the accountant needs opacus; without it, a noise multiplier run would fail only when the
    # result reads budget.epsilon, after all the training
    require("opacus", "privacy")
    q = batch_size / n
    steps = epochs * math.ceil(n / batch_size)
    if epsilon is not None:
        budget = PrivacyBudget.for_target(epsilon, delta, q, steps, accountant)
    else:
        budget = PrivacyBudget(float(noise_multiplier), q, steps, delta, accountant)  # type: ignore[arg-type]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    masks = None
    if sparsifier is not None:
        if mask_is_public:  # the caller states that these examples are public
            data = [(xtr[:batch_size], ytr[:batch_size])]
        else:  # data-free methods read only the input shape (SynFlow), which is public
            data = [(torch.zeros_like(xtr[:1]), torch.zeros_like(ytr[:1]))]
        masks = sparsifier.attach(model, opt, data=data)
    # the method behind the masks was checked above (check_mask_privacy(sparsifier, ...))
    dp = DPSGD(model, opt, noise_multiplier=budget.noise_multiplier, clip=clip,
               expected_batch_size=batch_size, masks=masks, mask_is_public=True, seed=seed)
    sampler = torch.Generator().manual_seed(stream_seed(seed, "poisson"))
    per_epoch = math.ceil(n / batch_size)
    batches = poisson_batches(n, q, steps, sampler)
    drawn, clipped = 0, 0

    def step(idx: Tensor) -> float:
        nonlocal drawn, clipped
        loss = dp.step(xtr[idx], ytr[idx])
        drawn += len(idx)
        clipped += int((dp.last_norms > clip).sum())
        return loss

    # Poisson batches are drawn lazily, one per step, on the epoch's clock
    accs, seconds = train_epochs(model, test, epochs, lambda: itertools.islice(batches, per_epoch), step,
                                 sched, total=steps, progress=progress, desc=desc or "dp-sgd")
    sp, layers = sparsity_report(model, sparsifier)
    if sparsifier is not None:
        sparsifier.detach()
    return DPFitResult(
        accuracy=accs[-1], accuracy_per_epoch=accs, epsilon=budget.epsilon, delta=delta,
        noise_multiplier=budget.noise_multiplier, sample_rate=q, steps=steps, clip=clip,
        accountant=accountant, seconds=seconds, seconds_per_step=seconds / steps,
        sparsity_actual=sp, mean_batch=drawn / steps, clipped_fraction=clipped / max(drawn, 1),
        layer_sparsity=layers,
    )
