"""TEAL's greedy per-block allocation of activation sparsity across a block's projections.

Uniform thresholds give every projection the same level ``s``. TEAL (Liu et al., ICLR 2025,
``teal/greedyopt.py``) instead, per decoder block, starts every projection at level 0 and
repeatedly raises the one whose increase hurts the block's output least: each step tries
``+Δ_g`` on each input group ``g`` and keeps the try with the smallest squared error of the
block output against the dense block (on the last quarter of each calibration sequence), until
the block's *effective* sparsity -- the levels weighted by the weights they gate, i.e. the
fraction of the block's weight reads skipped -- reaches the target. ``Δ_g = step * S_min / S_g``
(``S_g`` the weights behind group ``g``, ``S_min`` the smallest group's): every try skips about
the same number of weight reads, as TEAL's ``0.05 / w_p``. Every block gets the target's
effective sparsity; where it goes inside the block is learned.

Groups are the projections that read the *same input tensor* (found by watching the inputs during
calibration: q/k/v share the normed hidden state, gate/up theirs), and share one level: the
compiled decode engine fuses them into one matrix with one threshold. Each block is measured on
its dense input (the dense model's hidden states), independently of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..oneshot.blocks import capture_inputs, find_decoder_blocks, run_block

#: fraction of each calibration sequence (its end) on which the block output error is measured (TEAL)
ERROR_TAIL = 0.25


def input_groups(model: nn.Module, names: Sequence[str], batch: dict[str, Tensor]) -> list[list[str]]:
    """The targeted layers grouped by the input tensor they read (same object in one forward)."""
    seen: dict[str, Tensor] = {}  # the tensors themselves: kept alive, their ids cannot be reused

    def make(n: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            seen.setdefault(n, args[0])
        return hook

    from ..oneshot.calibration import forward_batches

    forward_batches(model, [batch], [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names])
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(seen[n]) if n in seen else id(n), []).append(n)
    return list(groups.values())


def _block_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@torch.no_grad()
def greedy_levels(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    groups: list[list[str]],
    threshold_at: Callable[[str, float], float],
    criterion_fn: Callable[[str, Tensor], Tensor],
    sparsity: float,
    *,
    step: float = 0.1,
    max_level: float = 0.99,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], dict[int, list[tuple[float, dict[str, float]]]]]:
    """Per-layer levels from TEAL's greedy search, block by block.

    ``threshold_at(name, level)`` is the layer's threshold for a fraction ``level`` of its inputs
    (its calibration histogram); ``criterion_fn(name, x)`` the value compared with it (``|x|``,
    or ``|x| * ||W[:, i]||`` for WINA). Returns ``(levels, paths)``: the level of every layer at
    the row nearest ``sparsity``, and per block the rows (effective sparsity, group levels) the
    search went through (TEAL's lookup table).
    """
    prefix, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[list[str]]] = {}
    for g in groups:
        b = _block_of(g[0], prefix)
        if b is None or any(_block_of(n, prefix) != b for n in g):
            # a group outside the blocks (or across blocks) keeps the uniform level
            continue
        by_block.setdefault(b, []).append(g)
    levels: dict[str, float] = {n: sparsity for g in groups for n in g}
    paths: dict[int, list[tuple[float, dict[str, float]]]] = {}
    if not by_block:
        return levels, paths
    was = model.training
    model.eval()
    inputs = capture_inputs(model, blocks, batches)
    current: dict[str, float] = {}  # the threshold each hooked layer applies now (-1: none)

    def make(n: str) -> Callable[..., tuple]:
        def hook(_m: nn.Module, args: tuple) -> tuple:
            t = current.get(n, -1.0)
            if t < 0:
                return args
            x = args[0]
            return (x.masked_fill(criterion_fn(n, x) < t, 0), *args[1:])
        return hook

    try:
        for bi, block in enumerate(blocks):
            dense = [run_block(block, inputs, i) for i in range(len(inputs))]
            bgroups = by_block.get(bi)
            if bgroups:
                hooks = [model.get_submodule(n).register_forward_pre_hook(make(n)) for g in bgroups for n in g]
                try:
                    sizes = {g[0]: sum(int(model.get_submodule(n).weight.numel()) for n in g) for g in bgroups}
                    rows = _greedy_block(block, inputs, dense, bgroups, sizes, threshold_at, current, sparsity,
                                         step, max_level)
                finally:
                    for h in hooks:
                        h.remove()
                    current.clear()
                paths[bi] = rows
                _, chosen = min(rows, key=lambda r: abs(r[0] - sparsity))
                for g in bgroups:
                    for n in g:
                        levels[n] = chosen[g[0]]
            inputs.hidden = dense  # the next block reads the dense model's hidden states
            if progress is not None:
                progress(bi + 1, len(blocks))
    finally:
        model.train(was)
    return levels, paths


def _greedy_block(
    block: nn.Module,
    inputs: Any,
    dense: list[Tensor],
    groups: list[list[str]],
    sizes: dict[str, int],
    threshold_at: Callable[[str, float], float],
    current: dict[str, float],
    sparsity: float,
    step: float,
    max_level: float,
) -> list[tuple[float, dict[str, float]]]:
    """One block's greedy path: rows ``(effective sparsity, {group head: level})`` from all-zero
    levels up to the first row at or above ``sparsity``; ``sizes[head]`` = the group's weights."""
    total, smin = sum(sizes.values()), min(sizes.values())
    lv = {g[0]: 0.0 for g in groups}

    def set_level(g: list[str], level: float) -> None:
        for n in g:
            current[n] = threshold_at(n, level) if level > 0 else -1.0

    def error() -> float:
        e = 0.0
        for i, y0 in enumerate(dense):
            y = run_block(block, inputs, i)
            k = max(1, int(round(y.shape[-2] * ERROR_TAIL)))
            e += float((y[..., -k:, :] - y0[..., -k:, :]).float().pow(2).sum())
        return e

    def effective() -> float:
        return sum(lv[h] * sizes[h] for h in lv) / total

    rows = [(0.0, dict(lv))]
    while effective() < sparsity:
        best: tuple[float, str, float] | None = None
        for g in groups:
            h = g[0]
            new = min(max_level, lv[h] + step * smin / sizes[h])
            if new <= lv[h]:
                continue
            set_level(g, new)
            e = error()
            set_level(g, lv[h])
            if best is None or e < best[0]:
                best = (e, h, new)
        if best is None:  # every group at max_level
            break
        _, h, new = best
        lv[h] = new
        set_level(next(g for g in groups if g[0] == h), new)
        rows.append((effective(), dict(lv)))
    return rows
