"""The block-sequential one-shot pipeline (one pipeline, many solvers).

For a Hugging Face causal LM (any model whose decoder blocks sit in an ``nn.ModuleList``):

1. tokenise/batch the calibration data (:mod:`.calibration`) and capture the full input of
   decoder block 0 for every batch (hidden states + attention mask, position ids, rotary
   embeddings ..., KV cache disabled; :mod:`.blocks`);
2. for every block in order:

   a. one *statistics pass*: run the block on its inputs with forward pre-hooks on the
      targeted linear layers; layers that read the same tensor (q/k/v, gate/up) share one
      accumulator (:mod:`.stats`), so ``XXᵀ`` is computed once per distinct input;
   b. solve every targeted layer (the solver writes the new weight and returns the mask);
   c. optionally tune the block's remaining weights toward the dense *model's* outputs of
      this block (``reconstruct=True``, mask fixed; :mod:`.reconstruct`); a second stream of
      hidden states, the dense model's, is advanced alongside for these targets;
   d. one *output pass* through the pruned block; its outputs are the next block's inputs.

   With ``true_sequential=True`` step a/b is repeated per group of sublayers in execution
   order (q/k/v → o → gate/up → down for Llama), each group's statistics collected after the
   earlier groups were pruned; those passes stop right after the group's input is seen.

3. allocation: ``uniform``; ``owl`` and ``sensitivity`` first make one dense pass through the
   blocks (:mod:`.allocation`) to choose each block's sparsity.

Cost: two block forwards per block (≈ two model forwards over the calibration set) plus the
solvers; ``true_sequential`` adds partial passes; OWL/sensitivity add one dense pass.

Peak memory (fp32, ``n`` calibration sequences of ``t`` tokens, hidden size ``h``)::

    peak ≈ model weights
         + 2 · n·t·h·4 B                      (block inputs + the outputs being produced;
                                               + 2 · n·t·h·4 B more with reconstruct=True,
                                               + 1 · n·t·h·4 B during the OWL/sensitivity pass)
         + Σ_distinct inputs d² · 4 B          (XXᵀ of one block, SparseGPT only; d = in-features)
         + activations of one block on one batch (b·t·(max(h, ffn) + heads·t)·4 B roughly)
         + solver workspace (a few copies of the largest weight)

For SmolLM2-135M with 64×512 calibration tokens and batch 8: 0.54 GB weights + 2·75 MB +
(3·576² + 1536²)·4 B ≈ 14 MB + ~0.1 GB activations.

Models larger than RAM: :func:`sparsetorch.oneshot.offload.prune_pretrained` builds the model
on the meta device and streams one block at a time from a safetensors folder (see there).

Only the solvers (:meth:`Solver.apply`) write weights, under ``torch.no_grad()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MethodError, ModelError, check_sparsity
from ..masks import MaskSet
from ..patterns import NM, Pattern
from .base import PIPELINE_OPTION_SPECS, Solver, check_options
from .blocks import BlockInputs, _Stop, capture_inputs, find_decoder_blocks, run_block
from .calibration import prepare_calibration
from .reconstruct import TARGETS as REC_TARGETS
from .reconstruct import TRAIN as REC_TRAIN
from .stats import InputStats, accumulate

#: names of the pipeline's own options (the rest of ``**kwargs`` goes to the solver)
PIPELINE_OPTIONS = tuple(PIPELINE_OPTION_SPECS)


def _tqdm(it, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, **kw)


# ---------------------------------------------------------------------- layer bookkeeping
def block_layers(
    block_name: str, block: nn.Module, params: Mapping[str, nn.Parameter]
) -> dict[str, tuple[str, nn.Module]]:
    """``{relative module name: (parameter name, module)}`` of the targeted layers in a block."""
    out = {}
    prefix = block_name + "."
    for rel, mod in block.named_modules():
        w = getattr(mod, "weight", None)
        pname = f"{prefix}{rel}.weight" if rel else f"{block_name}.weight"
        if w is not None and pname in params and params[pname] is w:
            out[rel] = (pname, mod)
    return out


@torch.no_grad()
def discover_groups(block: nn.Module, rel_names: list[str], inputs: BlockInputs) -> list[list[str]]:
    """Groups of layers in execution order; layers reading the same input tensor share a group."""
    mods = dict(block.named_modules())
    order: list[tuple[str, Tensor]] = []
    seen: set[str] = set()

    def make(rel: str):
        def hook(_m, args):
            if rel not in seen:
                seen.add(rel)
                order.append((rel, args[0]))

        return hook

    handles = [mods[r].register_forward_pre_hook(make(r)) for r in rel_names]
    try:
        run_block(block, inputs, 0)
    finally:
        for h in handles:
            h.remove()
    missing = [r for r in rel_names if r not in seen]
    if missing:
        raise ModelError(
            f"layers {missing} of the decoder block never ran during calibration; ignore them."
        )
    groups: list[list[str]] = []
    prev: Tensor | None = None
    for rel, x in order:
        same = prev is not None and (
            x is prev
            or (
                x.data_ptr() == prev.data_ptr()
                and x.shape == prev.shape
                and x.stride() == prev.stride()
            )
        )
        if same:
            groups[-1].append(rel)
        else:
            groups.append([rel])
        prev = x
    return groups


@torch.no_grad()
def stats_pass(
    block: nn.Module,
    groups: list[list[str]],
    needs: Mapping[str, frozenset[str]],
    inputs: BlockInputs,
    *,
    stop_early: bool = False,
    collect_outputs: bool = False,
    batches: int | None = None,
) -> tuple[dict[str, InputStats], list[Tensor] | None]:
    """Accumulate input statistics of ``groups`` (one shared accumulator per group).

    ``stop_early`` ends each forward right after the last group's input was recorded.
    Returns ``({relative name: stats}, dense outputs or None)``.
    """
    mods = dict(block.named_modules())
    accs: dict[int, InputStats] = {}
    cur: dict[str, Any] = {"mask": None}
    last_group = len(groups) - 1

    def make(gi: int, group: list[str]):
        need = frozenset().union(*(needs.get(r, frozenset()) for r in group))

        def hook(_m, args):
            x = args[0]
            if gi not in accs:
                accs[gi] = InputStats(x.shape[-1], need, device=x.device)
            accumulate(accs[gi], x, cur["mask"])
            if stop_early and gi == last_group:
                raise _Stop

        return hook

    handles = [mods[g[0]].register_forward_pre_hook(make(i, g)) for i, g in enumerate(groups)]
    outs: list[Tensor] | None = [] if collect_outputs else None
    n = len(inputs) if batches is None else min(batches, len(inputs))
    try:
        for b in range(n):
            cur["mask"] = inputs.token_masks[b]
            try:
                y = run_block(block, inputs, b)
            except _Stop:
                continue
            if outs is not None:
                outs.append(y.detach())
    finally:
        for h in handles:
            h.remove()
    result = {}
    for gi, g in enumerate(groups):
        if gi not in accs:
            raise ModelError(f"layers {g} received no input during calibration.")
        for r in g:
            result[r] = accs[gi]
    return result, outs


@torch.no_grad()
def output_pass(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace ``inputs.hidden`` by the block's outputs, batch by batch (in place)."""
    for b in range(len(inputs)):
        inputs.hidden[b] = run_block(block, inputs, b).detach()


# ---------------------------------------------------------------------- the entry point
def release_freed_memory() -> None:
    """Hand the freed heap (hidden states, statistics) back to the OS: glibc keeps freed chunks of
    up to 32 MB in its arenas, which would otherwise stay resident through whatever runs next
    (evaluation, saving). ``malloc_trim`` on Linux/glibc; a no-op elsewhere."""
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no libc.so.6: nothing to trim
            pass


def run_oneshot(
    model: nn.Module,
    *,
    method: str,
    sparsity: float,
    pattern: Pattern,
    allocation: str = "uniform",
    params: Mapping[str, nn.Parameter],
    calibration: Any = None,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    block_io: Callable[[str, int, nn.Module], None] | None = None,
    **kwargs: Any,
):
    """Prune ``params`` of ``model`` block by block with solver ``method``; returns a PruneReport.

    ``block_io(event, i, block)`` is called with ``"load"`` before block ``i`` is first run and
    with ``"done"`` once its outputs are computed (used by :mod:`.offload` to keep only one
    block's weights in memory; uniform allocation only).

    Pipeline options (``kwargs``): ``true_sequential`` (False), ``batch_size`` (8),
    ``reconstruct`` (False), ``reconstruct_steps`` (16 Adam steps of one batch each),
    ``reconstruct_lr`` (3e-4), ``reconstruct_target`` ("dense": the dense model's block outputs;
    "local": the dense block on the pruned inputs), ``reconstruct_train`` ("masked"; "all" also
    tunes norms/biases),
    ``owl_m`` (5), ``owl_lambda`` (0.08), ``sensitivity_grid`` (offsets, default
    ±0.05/±0.1), ``sensitivity_samples`` (16), ``progress`` (True). Any other keyword goes to the
    solver (e.g. ``percdamp``, ``blocksize`` for SparseGPT; ``initial``, ``threshold``,
    ``max_cycles``, ``include_mlp`` for DSnoT).
    """
    from ..prune import PruneReport
    from . import SOLVERS

    t0 = time.perf_counter()
    s = check_sparsity(sparsity)
    opts = check_options("pipeline", PIPELINE_OPTION_SPECS,
                         {k: kwargs.pop(k) for k in list(kwargs) if k in PIPELINE_OPTIONS})
    solver_cls = SOLVERS.get(method)
    if solver_cls is None:
        raise MethodError(f"unknown one-shot method {method!r}; available: {', '.join(SOLVERS)}.")
    solver: Solver = solver_cls(**kwargs)
    allocation = (allocation or "uniform").lower()
    if allocation not in ("uniform", "owl", "sensitivity"):
        raise MethodError(
            f"allocation {allocation!r} is not available for one-shot pruning with calibration data; "
            "use 'uniform', 'owl' or 'sensitivity'."
        )
    if block_io is not None and allocation != "uniform":
        raise MethodError(
            f"allocation {allocation!r} needs a dense pass over all blocks first; with blocks offloaded "
            "to disk only 'uniform' is available."
        )
    if isinstance(pattern, NM) and allocation != "uniform":
        raise MethodError(
            f"allocation {allocation!r} cannot be combined with the N:M pattern {pattern}; use uniform."
        )
    if pattern.name not in ("unstructured", "rowwise") and not isinstance(pattern, NM):
        raise MethodError(
            f"one-shot solvers support unstructured, rowwise and N:M patterns, not {pattern}."
        )
    batch_size = int(opts.get("batch_size", 8))
    progress = bool(opts.get("progress", True))
    true_seq = bool(opts.get("true_sequential", False))
    reconstruct = bool(opts.get("reconstruct", False))
    rec_target = str(opts.get("reconstruct_target", "dense")).lower()
    rec_train = str(opts.get("reconstruct_train", "masked"))
    for opt, value, allowed in (
        ("reconstruct_target", rec_target, REC_TARGETS),
        ("reconstruct_train", rec_train, REC_TRAIN),
    ):
        if value not in allowed:
            raise MethodError(f"{opt} must be one of {allowed}, got {value!r}.")

    block_name, blocks = find_decoder_blocks(model)
    per_block = [block_layers(f"{block_name}.{i}", blk, params) for i, blk in enumerate(blocks)]
    covered = {pn for d in per_block for pn, _ in d.values()}
    outside = [n for n in params if n not in covered]
    if outside:
        raise ModelError(
            f"{len(outside)} targeted weight(s) are outside the decoder blocks ({outside[:3]}...); calibration-"
            "based solvers only prune layers inside the blocks. Add them to ignore=[...] (the LM head and "
            "embeddings are excluded by default)."
        )

    batches = prepare_calibration(
        model,
        calibration,
        tokenizer,
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
    )
    n_seq = sum(b["input_ids"].shape[0] for b in batches)
    torch.manual_seed(seed)

    was_training = model.training
    model.eval()
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_cache is not None:
        cfg.use_cache = False
    timings = {
        "capture": 0.0,
        "allocation": 0.0,
        "stats": 0.0,
        "solve": 0.0,
        "reconstruct": 0.0,
        "outputs": 0.0,
    }
    extra: dict[str, Any] = {
        "calib_samples": n_seq,
        "calib_tokens": sum(int(b["input_ids"].numel()) for b in batches),
    }
    masks: dict[str, Tensor] = {}
    try:
        t = time.perf_counter()
        inputs = capture_inputs(model, blocks, batches)
        # the dense model's own hidden states, advanced block by block (reconstruction targets)
        dense_inputs = inputs.clone() if reconstruct and rec_target == "dense" else None
        timings["capture"] = time.perf_counter() - t
        first = next((i for i, d in enumerate(per_block) if d), None)
        if first is None:
            raise ModelError("no targeted layer inside the decoder blocks.")
        if block_io is not None:
            block_io("load", first, blocks[first])
        template = discover_groups(blocks[first], list(per_block[first]), inputs)
        template_pos = {r: i for i, g in enumerate(template) for r in g}

        def groups_for(i: int) -> list[list[str]]:
            rels = list(per_block[i])
            if all(r in template_pos for r in rels):
                out = [[r for r in g if r in per_block[i]] for g in template]
                return [g for g in out if g]
            return discover_groups(blocks[i], rels, inputs)

        # ---- allocation
        t = time.perf_counter()
        block_sp = [s] * len(blocks)
        if allocation != "uniform":
            from .allocation import owl_block_sparsities, sensitivity_block_sparsities

            if allocation == "owl":
                block_sp, info = owl_block_sparsities(
                    blocks,
                    per_block,
                    groups_for,
                    inputs.clone(),
                    s,
                    m=float(opts.get("owl_m", 5.0)),
                    lam=float(opts.get("owl_lambda", 0.08)),
                    progress=progress,
                )
            else:
                block_sp, info = sensitivity_block_sparsities(
                    blocks,
                    per_block,
                    groups_for,
                    inputs.clone(),
                    s,
                    pattern,
                    grid=opts.get("sensitivity_grid"),
                    samples=int(opts.get("sensitivity_samples", 16)),
                    progress=progress,
                )
            extra["allocation_info"] = info
        extra["block_sparsities"] = [float(x) for x in block_sp]
        timings["allocation"] = time.perf_counter() - t

        # ---- the sequential loop
        needs = {}
        infos: dict[str, Any] = {}
        for i in _tqdm(
            range(len(blocks)), desc=f"{method} {pattern}", unit="block", disable=not progress
        ):
            layers = per_block[i]
            block = blocks[i]
            if block_io is not None:
                block_io("load", i, block)
            if layers:
                groups = groups_for(i)
                need = {r: solver.needs_for(layers[r][0]) for r in layers}
                needs.update(need)
                dense_out = None
                if dense_inputs is not None:
                    t = time.perf_counter()
                    with torch.no_grad():
                        dense_out = [
                            run_block(block, dense_inputs, b).detach()
                            for b in range(len(dense_inputs))
                        ]
                    timings["reconstruct"] += time.perf_counter() - t
                local = reconstruct and dense_inputs is None
                todo = [groups] if not true_seq else [[g] for g in groups]
                for k, gset in enumerate(todo):
                    t = time.perf_counter()
                    stats, outs = stats_pass(
                        block,
                        gset,
                        need,
                        inputs,
                        stop_early=not (local and k == 0),
                        collect_outputs=local and k == 0,
                    )
                    if outs is not None:
                        dense_out = outs
                    timings["stats"] += time.perf_counter() - t
                    t = time.perf_counter()
                    for g in gset:
                        for r in g:
                            pname, mod = layers[r]
                            masks[pname] = solver.apply(
                                mod, stats[r], block_sp[i], pattern, name=pname
                            )
                            li = getattr(solver, "last_info", None)
                            if li is not None:
                                infos[pname] = li
                                solver.last_info = None
                    del stats
                    timings["solve"] += time.perf_counter() - t
                if reconstruct and dense_out is not None:
                    from .reconstruct import reconstruct_block

                    t = time.perf_counter()
                    rec = reconstruct_block(
                        block,
                        inputs,
                        dense_out,
                        {layers[r][0]: (layers[r][1], masks[layers[r][0]]) for r in layers},
                        steps=int(opts.get("reconstruct_steps", 16)),
                        lr=float(opts.get("reconstruct_lr", 3e-4)),
                        train=rec_train,
                    )
                    extra.setdefault("reconstruct", []).append(rec)
                    if dense_inputs is not None:
                        dense_inputs.hidden[:] = dense_out
                    del dense_out
                    timings["reconstruct"] += time.perf_counter() - t
            t = time.perf_counter()
            output_pass(block, inputs)
            if dense_inputs is not None and not layers:
                output_pass(block, dense_inputs)
            timings["outputs"] += time.perf_counter() - t
            if block_io is not None:
                block_io("done", i, block)
        inputs.hidden.clear()
        if dense_inputs is not None:
            dense_inputs.hidden.clear()
    finally:
        if cfg is not None and old_cache is not None:
            cfg.use_cache = old_cache
        model.train(was_training)

    ms = MaskSet({n: masks[n] for n in params if n in masks}, pattern)
    release_freed_memory()
    seconds = time.perf_counter() - t0
    damp = {n: v["percdamp"] for n, v in infos.items() if "percdamp" in v}
    if damp and any(v != next(iter(damp.values())) for v in damp.values()):
        extra["percdamp_raised"] = {n: v for n, v in damp.items() if v > min(damp.values())}
    extra["timings"] = {k: round(v, 3) for k, v in timings.items()}
    extra["true_sequential"] = true_seq
    extra["reconstruct_enabled"] = reconstruct
    if infos:
        extra["solver_loss"] = {n: v.get("loss") for n, v in infos.items() if "loss" in v}
        refits = {n: v["refit"] for n, v in infos.items() if "refit" in v}
        if refits:  # each layer's calibration output error after / before the refit
            extra["refit_error_ratio"] = {
                n: r["objective_after"] / r["objective_before"] if r["objective_before"] > 0 else 1.0
                for n, r in refits.items()
            }
    return PruneReport.from_masks(
        model,
        ms,
        method=method,
        pattern=pattern,
        allocation=allocation,
        sparsity_target=s,
        seconds_prune=seconds,
        extra=extra,
    )
