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

**Across blocks** (``across_blocks=True``, ``allocation="greedy-global"``; not in TEAL): blocks
differ in how much their sparsity costs the model, so giving every block the same level wastes
budget. Each block's greedy path is run past the target (to ``sparsity + max(BLOCK_OFFSETS)``);
then for a few levels ``c`` on that path (``sparsity + BLOCK_OFFSETS``) only that block is
sparsified and the rest of the model run dense, and ``D_b(c)`` = the mean KL divergence of the
model's next-token distribution from the dense model's (last half of each calibration window) is
recorded. :func:`allocate_blocks` then picks per-block levels that reach the target on average
(blocks weighted by their gated weights, so the weight reads skipped stay ``sparsity``) at the
least summed ``D_b`` -- assuming the blocks' costs add, as layer-wise allocations (OWL, BESA) do.
Cost: ``blocks x len(BLOCK_OFFSETS)`` partial forward passes on the greedy windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..oneshot.blocks import block_output, capture_inputs, find_decoder_blocks, run_block

#: fraction of each calibration sequence (its end) on which the block output error is measured (TEAL)
ERROR_TAIL = 0.25
#: levels (offsets from the target) at which each block's cost to the model is measured (across blocks)
BLOCK_OFFSETS = (-0.2, -0.1, 0.0, 0.1, 0.2)
#: fraction of each calibration sequence (its end) on which the logits' KL divergence is measured
KL_TAIL = 0.5


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
    across_blocks: bool = False,
    block_costs: dict[int, dict[float, float]] | None = None,
) -> tuple[dict[str, float], dict[int, list[tuple[float, dict[str, float]]]]]:
    """Per-layer levels from TEAL's greedy search, block by block.

    ``threshold_at(name, level)`` is the layer's threshold for a fraction ``level`` of its inputs
    (its calibration histogram); ``criterion_fn(name, x)`` the value compared with it (``|x|``,
    or ``|x| * ||W[:, i]||`` for WINA). Returns ``(levels, paths)``: the level of every layer on
    the path at exactly ``sparsity`` (:func:`level_on_path`; ``across_blocks``: at the block's own
    level from :func:`allocate_blocks`), and per block the rows (effective sparsity, group levels) the
    search went through (TEAL's lookup table). ``block_costs``, if given, receives the measured
    ``{block: {effective level: KL}}`` of the cross-block allocation.
    """
    head = output_head(model) if across_blocks else None  # fails before the search when it cannot work
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

    reach = min(max_level, sparsity + max(BLOCK_OFFSETS)) if across_blocks else sparsity
    block_inputs: dict[int, list[Tensor]] = {}  # across blocks: each block's dense input
    block_sizes: dict[int, int] = {}
    target = dict.fromkeys(by_block, sparsity)
    try:
        for bi, block in enumerate(blocks):
            dense = [run_block(block, inputs, i) for i in range(len(inputs))]
            bgroups = by_block.get(bi)
            if bgroups:
                hooks = [model.get_submodule(n).register_forward_pre_hook(make(n)) for g in bgroups for n in g]
                try:
                    sizes = {g[0]: sum(int(model.get_submodule(n).weight.numel()) for n in g) for g in bgroups}
                    rows = _greedy_block(block, inputs, dense, bgroups, sizes, threshold_at, current, reach,
                                         step, max_level)
                finally:
                    for h in hooks:
                        h.remove()
                    current.clear()
                paths[bi] = rows
                block_sizes[bi] = sum(sizes.values())
                if across_blocks:
                    block_inputs[bi] = inputs.hidden
            inputs.hidden = dense  # the next block reads the dense model's hidden states
            if progress is not None:
                progress(bi + 1, len(blocks))
        if across_blocks:
            costs = _block_costs(model, blocks, inputs, block_inputs, head, paths, by_block, make, current,
                                 threshold_at, sparsity, max_level)
            target = allocate_blocks(costs, block_sizes, sparsity)
            if block_costs is not None:
                block_costs.update(costs)
    finally:
        model.train(was)
    for bi, bgroups in by_block.items():
        chosen = level_on_path(paths[bi], target[bi])
        for g in bgroups:
            for n in g:
                levels[n] = chosen[g[0]]
    return levels, paths


def level_on_path(rows: list[tuple[float, dict[str, float]]], target: float) -> dict[str, float]:
    """The group levels at effective sparsity ``target`` on a greedy path (rows of ascending
    effective sparsity): between the two rows around it, linearly. Consecutive rows differ in one
    group's level and the effective sparsity is linear in the levels, so the result skips exactly
    ``target`` of the block's weight reads (the nearest row alone overshoots or falls short by up
    to half a step). Outside the path: its first or last row."""
    if target <= rows[0][0]:
        return dict(rows[0][1])
    for (e0, l0), (e1, l1) in zip(rows, rows[1:]):
        if e0 <= target <= e1:
            f = (target - e0) / (e1 - e0) if e1 > e0 else 1.0
            return {h: l0[h] + f * (l1[h] - l0[h]) for h in l0}
    return dict(rows[-1][1])


def output_head(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``hidden states after the last block -> logits``: the model's final norm and output embedding.

    Found by name (``<base>.norm`` as in Llama/Qwen/Mistral, ``ln_f`` as in GPT-2,
    ``decoder.final_layer_norm`` as in OPT); :class:`MethodError` when the model has no such pair."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    norm = None
    for holder in (base, getattr(base, "decoder", None)):
        for attr in ("norm", "ln_f", "final_layer_norm"):
            if holder is not None and isinstance(getattr(holder, attr, None), nn.Module):
                norm = getattr(holder, attr)
                if getattr(holder, "project_out", None) is not None:
                    norm = None  # OPT-350m style: a projection after the norm this does not model
                break
        if norm is not None:
            break
    if emb is None or norm is None:
        raise MethodError("allocation='greedy-global' measures each block's effect on the logits and needs the model's "
                          "final norm and output embedding (<base>.norm / ln_f / decoder.final_layer_norm and "
                          "get_output_embeddings()); this model has no such pair: use allocation='greedy'.")
    return lambda h: emb(norm(h))


def _block_costs(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: Any,
    block_inputs: dict[int, list[Tensor]],
    head: Callable[[Tensor], Tensor],
    paths: dict[int, list[tuple[float, dict[str, float]]]],
    by_block: dict[int, list[list[str]]],
    make: Callable[[str], Callable[..., tuple]],
    current: dict[str, float],
    threshold_at: Callable[[str, float], float],
    sparsity: float,
    max_level: float,
) -> dict[int, dict[float, float]]:
    """``{block: {effective level: mean KL(dense || only this block sparsified)}}`` at the path rows
    nearest ``sparsity + BLOCK_OFFSETS`` (level 0 costs 0). ``inputs.hidden`` holds the dense
    model's output of the last block."""

    def tail_logp(h: Tensor) -> Tensor:
        k = max(1, int(round(h.shape[-2] * KL_TAIL)))
        return torch.log_softmax(head(h[..., -k:, :]).float(), dim=-1)

    ref = [tail_logp(h) for h in inputs.hidden]
    positions = sum(r[..., 0].numel() for r in ref)
    grid = sorted({min(max_level, sparsity + d) for d in BLOCK_OFFSETS if sparsity + d > 0})
    costs: dict[int, dict[float, float]] = {}
    for bi, bgroups in by_block.items():
        costs[bi] = {0.0: 0.0}
        rows = {eff: lv for eff, lv in paths[bi]}
        picked = {min(rows, key=lambda e: abs(e - c)) for c in grid} - {0.0}
        hooks = [model.get_submodule(n).register_forward_pre_hook(make(n)) for g in bgroups for n in g]
        try:
            for eff in sorted(picked):
                for g in bgroups:
                    lv = rows[eff][g[0]]
                    for n in g:
                        current[n] = threshold_at(n, lv) if lv > 0 else -1.0
                kl = 0.0
                for i, r in enumerate(ref):
                    h = block_inputs[bi][i]
                    for j in range(bi, len(blocks)):
                        h = block_output(blocks[j](h, *inputs.args[i], **inputs.kwargs[i]))
                    kl += float((r.exp() * (r - tail_logp(h))).sum(dtype=torch.float64))
                costs[bi][eff] = kl / positions
        finally:
            for h in hooks:
                h.remove()
            current.clear()
    return costs


def allocate_blocks(costs: dict[int, dict[float, float]], sizes: dict[int, int], target: float) -> dict[int, float]:
    """Per-block levels whose size-weighted mean is ``target``, at the least summed cost.

    ``costs[b]`` maps measured levels of block ``b`` to its cost (level 0 included); ``sizes[b]``
    the weights its levels gate. From every block at its lowest level, the step with the least
    cost per weight read skipped is taken until the mean reaches ``target`` (optimal when each
    block's cost is convex in its level); the last step is then cut back to land on ``target``
    (a level between two measured ones: the caller interpolates along the search path, :func:`level_on_path`).
    """
    pts = {b: sorted(c.items()) for b, c in costs.items()}
    at = dict.fromkeys(pts, 0)
    total = sum(sizes[b] for b in pts)
    if not total:
        return {b: target for b in pts}

    def mean() -> float:
        return sum(pts[b][at[b]][0] * sizes[b] for b in pts) / total

    last = None
    while mean() < target - 1e-12:
        steps = [((pts[b][at[b] + 1][1] - pts[b][at[b]][1]) / (sizes[b] * (pts[b][at[b] + 1][0] - pts[b][at[b]][0])), b)
                 for b in pts if at[b] + 1 < len(pts[b])]
        if not steps:  # every block at its highest measured level
            break
        last = min(steps)[1]
        at[last] += 1
    out = {b: pts[b][at[b]][0] for b in pts}
    if last is not None:
        over = (mean() - target) * total / sizes[last]
        out[last] = max(pts[last][at[last] - 1][0], out[last] - over)
    return out


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
