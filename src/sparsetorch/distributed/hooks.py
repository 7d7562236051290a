"""Sparse gradient communication as DDP communication hooks (a hook = a function + a state object).

(No ``from __future__ import annotations`` here: DDP checks a hook's annotations as objects.)

``topk_hook`` (register with :func:`register_topk`): each rank sends, per parameter, the ``k``
largest-magnitude entries of its gradient plus its error-feedback residual, as (value, index)
pairs; the rest stays in the residual for the next step (Stich et al. 2018; DGC, Lin et al.
2018). Options: DGC's momentum correction and momentum masking, local gradient clipping, a
density warm-up, sending values in a 16-bit float (the rounding error goes back into the
residual, so nothing is lost), and ``precondition="adam"``: each rank turns its gradient into its
own Adam step direction first, and the top-k + error feedback act on that direction (the
averaged directions are then applied by plain SGD). Why: top-k of the *gradient* feeds AdamW a
gradient that is zero for most entries most of the time and, for a small entry, the error
feedback's accumulated value once in ~1/density steps; Adam normalises that spike by its own
size, so such an entry moves a few lr per spike where dense Adam moves about one lr per step --
the compressed run learns most of the model far more slowly. Compressing the local update instead
(as 1-bit Adam and SparseLoCo do) lets the residual carry the full movement.
``k = ceil(density · numel)`` is fixed per parameter, so every rank contributes the same number of
bytes and gloo's ``all_gather`` (which rejects unequal sizes) works. All of a bucket's pairs travel in one ``all_gather`` of bytes.

State is keyed by parameter, not by bucket: DDP's first iteration puts every parameter in one
bucket and rebuilds the buckets afterwards (ALGORITHMS-DISTRIBUTED §1).

Byte accounting (``state.bytes_sent``): what this rank transmits under the ring algorithms,
from the tensors' sizes: an ``all_gather`` of ``B`` bytes per rank sends ``(W−1)·B``; an
``all_reduce`` of ``B`` bytes sends ``2(W−1)/W·B`` (:func:`ring_bytes`). DDP's default hook
(``allreduce``) is counted the same way by :func:`register_allreduce_counter`, so the ratio of the
two is the compression actually bought. Top-k pays only below a density of about ``1/W``.
"""


import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DistributedError

__all__ = [
    "TopKState",
    "topk_compress",
    "topk_hook",
    "register_topk",
    "CountingState",
    "allreduce_counting_hook",
    "register_allreduce_counter",
    "ring_bytes",
]

_VALUE_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32)


def ring_bytes(kind: str, nbytes: int, world: int) -> int:
    """Bytes one rank transmits for a collective of ``nbytes`` per rank under the ring algorithm."""
    if kind == "all_gather":
        return (world - 1) * nbytes
    if kind == "all_reduce":
        return (2 * (world - 1) * nbytes) // world
    raise ValueError(f"unknown collective {kind!r}")


def topk_compress(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, values, residual)``: the ``k`` largest ``|a|`` of a flat tensor, and ``a`` with
    them zeroed. ``residual + scatter(indices, values) == a`` exactly (a partition of ``a``)."""
    flat = a.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    vals = flat[idx]
    residual = flat.clone()
    residual[idx] = 0
    return idx, vals, residual


@dataclass
class TopKState:
    """State of :func:`topk_hook` (one per DDP model, per rank).

    Args:
        density: fraction of each parameter's entries sent per step, in (0, 1]; DGC uses 0.001.
        process_group: the group DDP runs on (None: the default group).
        error_feedback: keep what was not sent and add it to the next gradient (default True;
            without it top-k training loses what it drops).
        momentum: DGC momentum correction ``u ← m·u + g; v ← v + u``, top-k taken of ``v``, and
            both ``u`` and ``v`` zeroed where sent (momentum masking). Use it with an optimizer
            *without* momentum (plain SGD), or momentum is applied twice. 0 turns it off.
        clip_norm: local clipping: each rank's gradient of a parameter is clipped to norm
            ``clip_norm / sqrt(W)`` before it enters the residual (DGC). None: off.
        warmup_steps: density warm-up: at step ``t < warmup_steps`` the density is
            ``density ** ((t + 1) / (warmup_steps + 1))`` (DGC's exponential schedule).
        value_dtype: send values in this dtype (``torch.float16`` / ``bfloat16``); the rounding
            error stays in the residual. None: the gradient's dtype.
        precondition: ``"none"`` (default: compress the gradient; use any optimizer) or
            ``"adam"``: compress each rank's own Adam direction ``m̂ / (√v̂ + eps)`` (moments of
            its local gradient, ``betas``, ``eps``, bias-corrected); the hook then returns the
            mean of the ranks' sparse directions, so train with ``torch.optim.SGD(lr=...)`` and
            no momentum -- that SGD step is then AdamW's step (weight decay as SGD's
            ``weight_decay``: the same decoupled decay at momentum 0). On one rank at density 1
            this is exactly Adam. Not combinable with ``momentum``.
        betas, eps: the Adam moments' decay rates and denominator floor (``precondition="adam"``).
    """

    density: float
    process_group: Any = None
    error_feedback: bool = True
    momentum: float = 0.0
    clip_norm: float | None = None
    warmup_steps: int = 0
    value_dtype: torch.dtype | None = None
    precondition: str = "none"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: optimizer steps seen (advanced on each step's last bucket)
    iteration: int = 0
    #: bytes this rank transmitted, all steps (ring model; see the module docstring)
    bytes_sent: int = 0
    #: bytes this rank transmitted in the last completed step
    bytes_last_step: int = 0
    residuals: dict[int, Tensor] = field(default_factory=dict)
    velocities: dict[int, Tensor] = field(default_factory=dict)
    #: precondition="adam": each parameter's (first, second) moment of this rank's gradient
    moments: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _step_bytes: int = 0

    def __post_init__(self) -> None:
        d = float(self.density)
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise DistributedError(f"top-k density must be in (0, 1], got {self.density}; e.g. 0.01 sends 1%.")
        if not (0.0 <= float(self.momentum) < 1.0):
            raise DistributedError(f"top-k momentum must be in [0, 1), got {self.momentum}.")
        if self.clip_norm is not None and not float(self.clip_norm) > 0:
            raise DistributedError(f"clip_norm must be positive (or None), got {self.clip_norm}.")
        if int(self.warmup_steps) < 0:
            raise DistributedError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.value_dtype not in _VALUE_DTYPES:
            raise DistributedError(f"value_dtype must be one of {_VALUE_DTYPES}, got {self.value_dtype}.")
        if self.precondition not in ("none", "adam"):
            raise DistributedError(f"precondition must be 'none' or 'adam', got {self.precondition!r}.")
        if self.precondition == "adam" and self.momentum:
            raise DistributedError("precondition='adam' already keeps a momentum (Adam's first moment): "
                                   "set momentum=0.")
        b1, b2 = (float(b) for b in self.betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise DistributedError(f"betas must both be in [0, 1), got {self.betas}.")
        if not float(self.eps) > 0:
            raise DistributedError(f"eps must be positive, got {self.eps}.")

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Counters, residuals, velocities and Adam moments keyed by ``model``'s parameter names (checkpoints)."""
        names = {id(p): n for n, p in model.named_parameters()}
        return {"iteration": self.iteration, "bytes_sent": self.bytes_sent,
                "residuals": {names[k]: v.clone() for k, v in self.residuals.items()},
                "velocities": {names[k]: v.clone() for k, v in self.velocities.items()},
                "moments": {names[k]: [m.clone(), v.clone()] for k, (m, v) in self.moments.items()}}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """Restore :meth:`state_dict` output onto ``model``'s parameters."""
        by_name = dict(model.named_parameters())
        self.iteration, self.bytes_sent = int(state["iteration"]), int(state["bytes_sent"])
        self.residuals = {id(by_name[n]): t for n, t in state["residuals"].items()}
        self.velocities = {id(by_name[n]): t for n, t in state["velocities"].items()}
        # checkpoints written before the Adam precondition existed have no moments
        self.moments = {id(by_name[n]): (m, v) for n, (m, v) in state.get("moments", {}).items()}

    @torch.no_grad()
    def reset(self, param: Tensor, where: Tensor) -> None:
        """Forget this rank's residual, velocity and Adam moments of ``param`` at the bool positions
        ``where`` (shaped like ``param``). Register it with a sparsifier
        (``sparsifier.on_mask_change(state.reset)``, or ``register_topk(..., sparsifier=sp)``) so a
        weight RigL grows starts from zero state, as its optimizer state does, and a dropped
        weight's leftover residual is not sent to a weight that is held at zero."""
        key = id(param)
        flat = where.reshape(-1)
        for t in (self.residuals.get(key), self.velocities.get(key), *self.moments.get(key, ())):
            if t is not None:
                t.masked_fill_(flat.to(t.device), 0)

    def density_at(self, step: int) -> float:
        """The density used at optimizer step ``step`` (0-based), warm-up included."""
        if step < self.warmup_steps:
            return float(self.density) ** ((step + 1) / (self.warmup_steps + 1))
        return float(self.density)

    def k_for(self, numel: int, step: int | None = None) -> int:
        """Entries sent for a parameter of ``numel`` entries: ``ceil(density · numel)``, at least 1."""
        d = self.density_at(self.iteration if step is None else step)
        return max(1, min(numel, math.ceil(d * numel - 1e-9)))


def _adam_direction(state: TopKState, key: int, g: Tensor) -> Tensor:
    """This rank's bias-corrected Adam direction for one parameter's flat gradient ``g``
    (moments updated in ``state``; step count = the optimizer step being taken)."""
    b1, b2 = (float(b) for b in state.betas)
    m, v = state.moments.get(key) or (torch.zeros_like(g), torch.zeros_like(g))
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    state.moments[key] = (m, v)
    t = state.iteration + 1
    return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(float(state.eps)))


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: top-k (+ error feedback) of every parameter in the bucket, one
    ``all_gather`` of the bucket's (value, index) bytes, then the mean of every rank's sparse
    gradient written back into the bucket."""
    group = state.process_group
    world = dist.get_world_size(group)
    grads, params = bucket.gradients(), bucket.parameters()
    payload, layout = [], []
    for p, g in zip(params, grads):
        key = id(p)
        a = g.detach().reshape(-1)
        if state.clip_norm is not None:
            limit = float(state.clip_norm) / math.sqrt(world)
            norm = float(a.norm())
            if norm > limit:
                a = a * (limit / norm)
        if state.precondition == "adam":
            a = _adam_direction(state, key, a)
        if state.momentum:
            u = state.velocities.get(key)
            u = a.clone() if u is None else u.mul_(state.momentum).add_(a)
            state.velocities[key] = u
            a = u
        if state.error_feedback:
            e = state.residuals.get(key)
            if e is not None:
                a = a + e
        k = state.k_for(a.numel())
        idx, vals, residual = topk_compress(a, k)
        if state.value_dtype is not None and state.value_dtype != vals.dtype:
            sent = vals.to(state.value_dtype)
            residual[idx] = vals - sent.to(vals.dtype)  # rounding error is kept, not lost
            vals = sent
        if state.error_feedback:
            state.residuals[key] = residual
        if state.momentum:
            state.velocities[key][idx] = 0  # momentum masking: what was sent leaves u too
        payload += [vals.contiguous().view(torch.uint8), idx.to(torch.int32).view(torch.uint8)]
        layout.append((g.numel(), k, vals.dtype, a.dtype))
    mine = torch.cat(payload)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    state._step_bytes += ring_bytes("all_gather", mine.numel(), world)
    if bucket.is_last():
        state.iteration += 1
        state.bytes_last_step, state._step_bytes = state._step_bytes, 0
        state.bytes_sent += state.bytes_last_step
    fut = dist.all_gather(gathered, mine, group=group, async_op=True).get_future()

    def decode(done: torch.futures.Future) -> Tensor:
        done.value()  # a failed all_gather (a peer died) raises here, before its empty rows are read
        out = bucket.buffer()
        offset = 0
        for (numel, k, vdtype, adtype), g in zip(layout, grads):
            dense = torch.zeros(numel, dtype=adtype, device=g.device)
            vb = k * torch.empty((), dtype=vdtype).element_size()
            for row in gathered:
                # clone: a slice at an odd byte offset cannot be viewed as a wider dtype
                vals = row[offset:offset + vb].clone().view(vdtype).to(adtype)
                idx = row[offset + vb:offset + vb + 4 * k].clone().view(torch.int32).long()
                dense.index_add_(0, idx, vals)
            g.copy_(dense.div_(world).view_as(g).to(g.dtype))
            offset += vb + 4 * k
        return out

    return fut.then(decode)


def register_topk(ddp_model: nn.parallel.DistributedDataParallel, density: float, *,
                  sparsifier: Any = None, **options: Any) -> TopKState:
    """Register :func:`topk_hook` on a DDP model; returns its :class:`TopKState` (bytes, residuals).

    ``sparsifier``: the attached sparse-training method of the same model (e.g. RigL); its mask
    changes then reset the hook's per-element state at the grown and pruned positions
    (:meth:`TopKState.reset`). Without it a grown weight inherits its pruned predecessor's residual
    and Adam moments.

    Raises :class:`~sparsetorch.errors.DistributedError` on one process (nothing to communicate)
    and for bad options. Register before the first backward.
    """
    state = TopKState(density=density, **options)  # bad options fail first, on every rank
    if sparsifier is not None and not callable(getattr(sparsifier, "on_mask_change", None)):
        raise DistributedError(f"sparsifier= takes a sparsetorch training method (a Sparsifier), "
                               f"got {type(sparsifier).__name__}.")
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise DistributedError(f"register_topk needs a DistributedDataParallel model, got {type(ddp_model).__name__}.")
    if dist.get_world_size(state.process_group) < 2:
        raise DistributedError("a sparse communication hook needs at least 2 ranks; with one process there "
                               "is nothing to send: train without DDP.")
    if sparsifier is not None:
        sparsifier.on_mask_change(state.reset)
    ddp_model.register_comm_hook(state, topk_hook)
    return state


@dataclass
class CountingState:
    """State of :func:`allreduce_counting_hook`: DDP's default all-reduce with byte accounting."""

    process_group: Any = None
    iteration: int = 0
    bytes_sent: int = 0
    bytes_last_step: int = 0
    _step_bytes: int = 0

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The counters (checkpoints); ``model`` is unused, as in :meth:`TopKState.state_dict`."""
        return {"iteration": self.iteration, "bytes_sent": self.bytes_sent}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        self.iteration, self.bytes_sent = int(state["iteration"]), int(state["bytes_sent"])


def allreduce_counting_hook(state: CountingState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's default behaviour (divide by W, all-reduce SUM), counting the bytes sent (the baseline)."""
    group = state.process_group
    world = dist.get_world_size(group)
    buf = bucket.buffer().div_(world)
    state._step_bytes += ring_bytes("all_reduce", buf.numel() * buf.element_size(), world)
    if bucket.is_last():
        state.iteration += 1
        state.bytes_last_step, state._step_bytes = state._step_bytes, 0
        state.bytes_sent += state.bytes_last_step
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def register_allreduce_counter(ddp_model: nn.parallel.DistributedDataParallel,
                               process_group: Any = None) -> CountingState:
    """Register :func:`allreduce_counting_hook` (the dense baseline with byte accounting)."""
    state = CountingState(process_group=process_group)
    ddp_model.register_comm_hook(state, allreduce_counting_hook)
    return state

