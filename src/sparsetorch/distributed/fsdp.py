"""Masks under FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded beside their parameters,
saved and resharded with ``torch.distributed.checkpoint``.

After ``fully_shard`` every parameter is a DTensor holding one shard per rank.
:func:`shard_masks` turns each mask into a DTensor on the parameter's mesh with the
parameter's placements, so a rank holds exactly the rows of the mask that match its rows of
the weight (uneven splits included). ``MaskSet.enforce`` then works unchanged, and every step
of it is local to the shard: zeroing, masking the reduce-scattered gradient, re-zeroing after
``optimizer.step()``. ``MaskSet.sparsity``/``verify``/``save`` read the whole tensors.

:func:`save_sharded` / :func:`load_sharded` write and read model, optimizer and masks with
DCP: one file per rank plus metadata, readable by another world size (2 → 3 tested). The
masks come back identical.

Build the full masks identically on every rank (a seeded rule, or after
:func:`~.masks.broadcast_masks`) *before* sharding. RigL and SET run under FSDP2 through
:func:`~.sparsifier.attach` (masks placed like the parameters; update steps gather whole
layers); SNFS does not (FSDP2 bypasses its gradient hook).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import DistributedError
from ..masks import MaskSet, _place_like

__all__ = ["shard_masks", "save_sharded", "load_sharded"]


def shard_masks(masks: MaskSet, model: nn.Module) -> MaskSet:
    """A MaskSet whose masks are placed like ``model``'s (``fully_shard``-ed) parameters.

    ``masks`` holds whole masks, identical on every rank. A parameter that is not a DTensor
    keeps a plain mask. Raises :class:`~sparsetorch.errors.DistributedError` when a mask names
    no parameter or its shape differs from the parameter's whole shape.
    """
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        p = params.get(name)
        if p is None:
            raise DistributedError(f"mask {name!r} names no parameter of the sharded model; shard the same "
                                   "model the masks were made for (names without FSDP prefixes).")
        if tuple(p.shape) != tuple(m.shape):
            raise DistributedError(f"mask {name!r} has shape {tuple(m.shape)}, the parameter's whole shape is "
                                   f"{tuple(p.shape)}.")
        out[name] = _place_like(m.detach().to(torch.bool), p)
    return MaskSet(out, dict(masks.patterns))


def save_sharded(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 masks: MaskSet, extra: dict[str, Any] | None = None) -> None:
    """Collective: DCP-save model, optimizer and (sharded) masks to folder ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd, "masks": dict(masks.items()), **({"optim": osd} if optimizer is not None else {}),
             **({"extra": extra} if extra else {})}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 masks: MaskSet) -> MaskSet:
    """Collective: DCP-load into ``model`` (already ``fully_shard``-ed, any world size), the
    optimizer and the layout of ``masks`` (e.g. :func:`shard_masks` of placeholder masks);
    returns the loaded masks, placed like the parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": msd, "masks": {n: torch.zeros_like(m) for n, m in masks.items()}}
    if optimizer is not None:
        state["optim"] = osd
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return MaskSet(state["masks"], dict(masks.patterns))
