"""HyperSparse with the ART schedule (Glandorf, Kaiser, Rosenhahn, ICCV-W 2023; ALGORITHMS.md J.3).

Phases (steps counted in optimizer steps, an "ART epoch" is ``art_every`` steps):

1. dense warm-up for ``warmup`` steps, no penalty;
2. the HyperSparse gradient ``lambda_e * dL_HS/dw`` is added to ``.grad`` before every
   ``optimizer.step()`` (a step pre-hook; closed form, :func:`sparsetorch.regularize.hs_grad`) with
   ``lambda_e = lam * eta^e`` growing every ART epoch ``e``; after each ART epoch the globally
   magnitude-pruned copy (prune rate ``kappa = sparsity``) and the dense model are scored on
   ``probe_batches`` training batches (from ``attach(data=...)``); the ART rule
   (:class:`sparsetorch.regularize.ART`) stops the phase once the buffer-averaged pruned accuracy
   exceeds the dense one, or at ``harden_at`` at the latest;
3. the best pruned model of the buffer is restored (weights and global-magnitude mask), optimizer
   state is cleared (the reference starts a fresh optimizer), and the rest of the run fine-tunes
   with that mask.

The default allocation is ``"global"`` (one magnitude threshold over all targeted weights, as the
reference's ``mag_prune``). The reference's defaults (60 warm-up epochs, ``lam = 5e-6``,
``eta = 1.05`` per epoch, 160 fine-tune epochs) are for long CIFAR runs; the defaults here fit short
runs and are stated in the docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError, MethodError
from ..regularize.hypersparse import ART, hs_grad
from ..regularize.penalty import add_pre_step
from ..regularize.prox import check_lambda
from ..regularize.search import logits_of
from ._learned import LearnedSparsifier
from .base import Batches, _unpack, register_method


@register_method("hypersparse")
class HyperSparse(LearnedSparsifier):
    """HyperSparse regularisation with the ART stop rule, then fine-tuning with the best mask.

    Args:
        lam: initial strength ``lambda_init`` (>= 0).
        eta: growth factor of lambda per ART epoch (>= 1).
        warmup: dense steps before the penalty (default a third of ``total_steps``: the ART rule
            compares with the dense accuracy, which must mean something by then).
        harden_at: the latest step at which ART stops (default 70% of ``total_steps``).
        art_every: steps per ART epoch (default: ``total_steps // 40``, at least 1).
        buffer_size: ``b`` of the ART buffer (``2b + 1`` entries).
        probe_batches: training batches the pruned and dense accuracies are measured on.
    """

    needs_data = True

    def __init__(self, sparsity: float = 0.9, *, lam: float = 1e-4, eta: float = 1.25,
                 warmup: int | None = None, art_every: int | None = None, buffer_size: int = 1,
                 probe_batches: int = 8, allocation: str = "global", harden_at: int | None = None,
                 **kw: Any) -> None:
        total = kw.get("total_steps")
        if harden_at is None and total is not None:
            harden_at = max(2, int(0.7 * int(total)))
        if warmup is None:
            warmup = int(total) // 3 if total is not None else 0
        super().__init__(sparsity, allocation=allocation, harden_at=harden_at, start=int(warmup), **kw)
        self.lam = check_lambda(lam, "lam (lambda_init)")
        self.eta = float(eta)
        if not self.eta >= 1.0:
            raise MethodError(f"eta (lambda's growth per ART epoch) must be >= 1, got {eta}.")
        if art_every is None:
            art_every = max(1, (self.total_steps or 400) // 40)
        self.art_every = int(art_every)
        if self.art_every < 1 or int(probe_batches) < 1:
            raise MethodError(f"art_every and probe_batches must be >= 1, got {art_every}, {probe_batches}.")
        self.probe_batches = int(probe_batches)
        self.art = ART(buffer_size=int(buffer_size))
        self.art_epoch = 0
        self.probe: list[tuple[Any, Any]] = []
        self.stopped_at: int | None = None
        self._best_weights: dict[str, Tensor] | None = None

    def lam_now(self) -> float:
        """``lambda_e = lam * eta^e`` for the current ART epoch."""
        return self.lam * self.eta ** self.art_epoch

    def _initial_masks(self, data: Batches | None):  # noqa: ANN202
        assert data is not None
        self.probe = [_unpack(b) for b in islice(iter(data), self.probe_batches)]
        if not self.probe:
            raise DataError("hypersparse needs training batches for ART: the data passed to attach() is empty.")
        return super()._initial_masks(data)

    def _install_hooks(self) -> None:
        if self.optimizer is None:
            raise MethodError("hypersparse adds its gradient before optimizer.step(): pass the optimizer to attach().")
        names = list(self.params)

        def pre() -> None:
            if not self.active() or self.lam == 0:
                return
            ws = [self.params[n].detach() for n in names]
            grads = hs_grad(ws, self.sparsity)
            lam = self.lam_now()
            for n, g in zip(names, grads):
                p = self.params[n]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g, alpha=lam)

        self._handles.append(add_pre_step(self.optimizer, pre))

    # ---- ART
    def _pruned_masks(self) -> dict[str, Tensor]:
        return self._final_masks_magnitude()

    def _final_masks_magnitude(self) -> dict[str, Tensor]:
        scores = {n: p.detach().abs().float() for n, p in self.params.items()}
        sp = self._layer_sparsities(self.sparsity, scores=scores)
        return {n: self.pattern.mask(scores[n], sp[n]) for n in self.params}

    @torch.no_grad()
    def _accuracy(self, weights: Mapping[str, Tensor] | None) -> float:
        assert self.model is not None
        was = self.model.training
        self.model.eval()
        correct = total = 0
        for x, y in self.probe:
            out = self.model(x) if weights is None else torch.func.functional_call(self.model, dict(weights), (x,))
            correct += int((logits_of(out).argmax(-1) == y).sum())
            total += len(y)
        self.model.train(was)
        return 100.0 * correct / max(total, 1)

    def _art_epoch(self) -> bool:
        masks = self._pruned_masks()
        pruned = {n: self.params[n].detach() * masks[n] for n in self.params}
        acc_pr = self._accuracy(pruned)
        acc_dense = self._accuracy(None)
        assert self.model is not None
        payload = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for n in self.params:
            payload[n] = pruned[n].clone()
        stop = self.art.update(acc_pr, acc_dense, payload)
        self.art_epoch += 1
        return stop

    def _update(self, step: int) -> bool:
        if self.hardened:
            return False
        if step > self.start and (step - self.start) % self.art_every == 0:
            if self._art_epoch():
                self.stopped_at = step
                self.harden()
                return True
        return super()._update(step)

    def before_harden(self) -> None:
        best = self.art.best
        if best is None or best.payload is None:
            return
        assert self.model is not None
        with torch.no_grad():
            self.model.load_state_dict(best.payload)
        for p in self.model.parameters():  # the rewound weights start with fresh state
            everywhere = torch.ones_like(p, dtype=torch.bool)
            self._reset_state(p, everywhere, everywhere)
        self.art.buffer = []  # the payloads are no longer needed

    def final_scores(self) -> dict[str, Tensor]:
        return {n: p.detach().abs().float() for n, p in self.params.items()}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "art_epoch": self.art_epoch, "art": self.art.state_dict(),
                "stopped_at": -1 if self.stopped_at is None else self.stopped_at}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.art_epoch = int(extra.get("art_epoch", 0))
        st = int(extra.get("stopped_at", -1))
        self.stopped_at = None if st < 0 else st


