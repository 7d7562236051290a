"""Per-block sparsity for the one-shot pipeline: OWL and sensitivity-based allocation.

Both make one *dense* pass through the blocks first (no pruning; each block's statistics pass
also produces its outputs, so this costs one model forward over the calibration set).

**OWL** (ALGORITHMS.md A.4): for block ``l`` concatenate the Wanda scores of all its targeted
layers, ``D_l`` = percent of scores above ``M`` × their mean; then
:func:`sparsetorch.allocation.owl` (λ) turns the ratios into block sparsities.

**Sensitivity** (ours): for each block, prune a copy of it with Wanda at a few sparsities
``s + δ`` (default δ ∈ {-0.1, -0.05, 0, +0.05, +0.1}) and measure the relative reconstruction
error of the block output on the first ``samples`` calibration sequences,
``e_l(s) = ‖Y_dense − Y_pruned‖² / ‖Y_dense − X‖²`` (the change the block makes to the residual
stream, so blocks are comparable). Then :func:`solve_budget` picks per-block sparsities that
minimise ``Σ_l e_l(s_l)`` subject to the parameter-weighted mean sparsity being exactly ``s``:
each ``e_l`` is made piecewise linear and convex (lower convex hull over the grid) and the
budget is filled greedily by the smallest marginal error per pruned weight, which is optimal for
convex piecewise-linear costs; the last step is taken fractionally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import allocation as core_alloc
from ..errors import AllocationError
from ..patterns import Pattern
from .blocks import BlockInputs, run_block
from .pipeline import _tqdm, output_pass, stats_pass
from .wanda import wanda_mask


def _block_numel(layers: dict) -> int:
    return sum(mod.weight.numel() for _, mod in layers.values())


@torch.no_grad()
def owl_block_sparsities(
    blocks: nn.ModuleList,
    per_block: list[dict],
    groups_for: Callable[[int], list[list[str]]],
    inputs: BlockInputs,
    sparsity: float,
    *,
    m: float = 5.0,
    lam: float = 0.08,
    progress: bool = True,
) -> tuple[list[float], dict]:
    """Block sparsities from OWL outlier ratios measured on the dense model."""
    ratios: dict[int, float] = {}
    for i in _tqdm(range(len(blocks)), desc="owl (dense pass)", unit="block", disable=not progress):
        layers = per_block[i]
        if layers:
            groups = groups_for(i)
            stats, _ = stats_pass(
                blocks[i], groups, {r: frozenset({"sq"}) for r in layers}, inputs, stop_early=True
            )
            scores = []
            for r, (_, mod) in layers.items():
                w = mod.weight.detach().float()
                if type(mod).__name__ == "Conv1D":
                    w = w.t()
                scores.append((w.abs() * stats[r].input_norm().reshape(1, -1)).reshape(-1))
            ratios[i] = core_alloc.outlier_ratio(torch.cat(scores), m)
            del stats, scores
        if i < len(blocks) - 1:
            output_pass(blocks[i], inputs)
    idx = sorted(ratios)
    sp = core_alloc.owl([ratios[i] for i in idx], sparsity, lam=lam)
    out = [0.0] * len(blocks)
    for i, v in zip(idx, sp):
        out[i] = v
    return out, {
        "outlier_ratios": [ratios.get(i) for i in range(len(blocks))],
        "M": m,
        "lambda": lam,
    }


def _lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of points sorted by x."""
    hull: list[int] = []
    for k in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # remove b if it lies on or above the segment a -> k
            if (ys[b] - ys[a]) * (xs[k] - xs[a]) >= (ys[k] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def solve_budget(
    errors: Sequence[Sequence[float]], grid: Sequence[float], numels: Sequence[int], sparsity: float
) -> list[float]:
    """Per-block sparsities minimising ``Σ e_l(s_l)`` with ``Σ n_l s_l = s · Σ n_l``.

    ``errors[l][k]`` is block ``l``'s error at sparsity ``grid[k]`` (grid ascending, must bracket
    ``sparsity``). Pure function.
    """
    g = list(grid)
    if not (g[0] - 1e-12 <= sparsity <= g[-1] + 1e-12):
        raise AllocationError(
            f"sensitivity grid {g} does not contain the target sparsity {sparsity}."
        )
    total = sum(numels)
    need = sparsity * total - sum(n * g[0] for n in numels)  # pruned weights still to place
    moves = []  # (slope, block, ds)
    for blk, (e, n) in enumerate(zip(errors, numels)):
        hull = _lower_hull(g, list(e))
        for a, b in zip(hull, hull[1:]):
            ds = g[b] - g[a]
            moves.append(((e[b] - e[a]) / (ds * n), blk, ds))
    moves.sort(key=lambda t: (t[0], t[1]))
    out = [g[0]] * len(numels)
    for _, blk, ds in moves:
        if need <= 1e-9:
            break
        take = min(ds, need / numels[blk])
        out[blk] += take
        need -= take * numels[blk]
    return [min(max(v, 0.0), 0.99) for v in out]


@torch.no_grad()
def sensitivity_block_sparsities(
    blocks: nn.ModuleList,
    per_block: list[dict],
    groups_for: Callable[[int], list[list[str]]],
    inputs: BlockInputs,
    sparsity: float,
    pattern: Pattern,
    *,
    grid: Sequence[float] | None = None,
    samples: int = 16,
    progress: bool = True,
) -> tuple[list[float], dict]:
    """Measure each block's reconstruction sensitivity (Wanda proxy) and solve the budget."""
    offsets = list(grid) if grid is not None else [-0.1, -0.05, 0.0, 0.05, 0.1]
    g = sorted({min(max(sparsity + d, 0.0), 0.99) for d in offsets} | {sparsity})
    errs: dict[int, list[float]] = {}
    # number of batches covering the first `samples` sequences
    nb, seen = 0, 0
    while nb < len(inputs) and seen < samples:
        seen += inputs.hidden[nb].shape[0]
        nb += 1
    for i in _tqdm(
        range(len(blocks)), desc="sensitivity (dense pass)", unit="block", disable=not progress
    ):
        layers = per_block[i]
        block = blocks[i]
        if layers:
            stats, _ = stats_pass(
                block,
                groups_for(i),
                {r: frozenset({"sq"}) for r in layers},
                inputs,
                stop_early=True,
            )
            dense = [run_block(block, inputs, b) for b in range(nb)]
            delta = sum(float((dense[b] - inputs.hidden[b]).pow(2).sum()) for b in range(nb)) or 1.0
            saved = {r: mod.weight.detach().clone() for r, (_, mod) in layers.items()}
            row = []
            for sk in g:
                for r, (_, mod) in layers.items():
                    w = saved[r].float()
                    conv = type(mod).__name__ == "Conv1D"
                    w2 = w.t() if conv else w
                    keep = wanda_mask(w2, stats[r].input_norm(), sk, pattern)
                    keep = keep.t() if conv else keep
                    mod.weight.copy_(saved[r].masked_fill(~keep, 0))
                err = sum(
                    float((run_block(block, inputs, b) - dense[b]).pow(2).sum()) for b in range(nb)
                )
                row.append(err / delta)
            for r, (_, mod) in layers.items():
                mod.weight.copy_(saved[r])
            errs[i] = row
            del stats, dense, saved
        if i < len(blocks) - 1:
            output_pass(block, inputs)
    idx = sorted(errs)
    numels = [_block_numel(per_block[i]) for i in idx]
    sp = solve_budget([errs[i] for i in idx], g, numels, sparsity)
    out = [0.0] * len(blocks)
    for i, v in zip(idx, sp):
        out[i] = v
    if not math.isclose(
        sum(n * v for n, v in zip(numels, sp)) / max(sum(numels), 1), sparsity, abs_tol=1e-3
    ):
        raise AllocationError("sensitivity allocation could not meet the sparsity budget.")
    return out, {"grid": g, "errors": [errs.get(i) for i in range(len(blocks))], "samples": seen}
