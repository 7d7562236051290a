"""SynFlow (Tanaka et al., 2020): data-free, iterative pruning at init (ALGORITHMS.md C.3).

Scores come from a linearised copy of the network (every parameter and buffer replaced by its
absolute value, eval mode, float64) fed an all-ones input: ``S = |W * dR/dW|`` with
``R = sum(f(1))``. Pruning is iterative: ``n`` rounds, round ``k`` keeps a global density of
``(1 - s) ** (k / n)``; pruned weights score ``-inf`` and stay pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..masks import MaskSet
from ..patterns import n_pruned, topk_mask
from .base import Batches, Sparsifier, _unpack, register_method


def synflow_scores(
    model: nn.Module,
    names: Sequence[str],
    input_shape: Sequence[int],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """SynFlow scores ``|W * dR/dW|`` of the parameters ``names``; never touches ``model`` (works on a copy)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
        params = dict(net.named_parameters())
        if masks is not None:
            for n, m in masks.items():
                params[n].masked_fill_(~m.to(params[n].device), 0)
    dev = next(iter(params.values())).device
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=dev)
    with torch.enable_grad():
        r = net(x).sum()
        grads = torch.autograd.grad(r, [params[n] for n in names], allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        w = params[n].detach()
        out[n] = (w * g).abs().float() if g is not None else torch.zeros_like(w, dtype=torch.float32)
    return out


@register_method("synflow")
class SynFlow(Sparsifier):
    """Iterative SynFlow pruning at init (global scope, exponential density schedule, ``iterations`` rounds).

    ``input_shape`` (without batch dim) is required unless ``data`` is passed to ``attach``, in
    which case only the shape of the first batch's inputs is used.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        allocation: str = "global",
        iterations: int = 100,
        input_shape: Sequence[int] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(sparsity, allocation=allocation, **kw)
        if int(iterations) < 1:
            raise MethodError(f"synflow iterations must be >= 1, got {iterations}.")
        self.iterations = int(iterations)
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def _has_data_fallback(self) -> bool:
        return self.input_shape is not None

    def _resolve_shape(self, data: Batches | None) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        if data is None:
            raise MethodError("synflow needs input_shape=(C, H, W) (or data to read the shape from).")
        x, _ = _unpack(next(iter(data)))
        return tuple(x.shape[1:])

    def _initial_masks(self, data: Batches | None) -> MaskSet:
        assert self.model is not None
        shape = self._resolve_shape(data)
        names = list(self.params)
        numel = {n: self.params[n].numel() for n in names}
        total = sum(numel.values())
        density = 1.0 - self.sparsity
        masks = {n: torch.ones_like(self.params[n], dtype=torch.bool) for n in names}
        if self.allocation != "global":
            # per-layer counts from the allocation, still iterative
            sp_final = self._layer_sparsities(self.sparsity)
        for k in range(1, self.iterations + 1):
            sc = synflow_scores(self.model, names, shape, masks)
            for n in names:
                sc[n] = sc[n].to(masks[n].device).masked_fill(~masks[n], float("-inf"))
            frac = density ** (k / self.iterations)
            if self.allocation == "global":
                keep = total - n_pruned(1.0 - frac if k < self.iterations else self.sparsity, total)
                flat = topk_mask(torch.cat([sc[n].reshape(-1) for n in names]), keep)
                masks = {n: part.reshape(self.params[n].shape) for n, part in zip(names, torch.split(flat, [numel[n] for n in names]))}
            else:
                for n in names:
                    d_final = 1.0 - sp_final[n]
                    s_k = sp_final[n] if k == self.iterations else 1.0 - d_final ** (k / self.iterations)
                    masks[n] = topk_mask(sc[n].reshape(-1), numel[n] - n_pruned(s_k, numel[n])).reshape(masks[n].shape)
        return MaskSet(masks)
