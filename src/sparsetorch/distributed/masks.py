"""Masks across ranks: a digest per mask, a check that every rank holds the same masks, and a
broadcast from one rank.

Under data parallelism every rank must apply the same mask to the same weight; a rank that
drifts trains a different network while the loss still looks fine (ALGORITHMS-DISTRIBUTED §2).
:func:`verify_consistent` all-gathers one 64-bit digest per mask (a few bytes per tensor, not
the masks) and raises on every rank alike, naming the first rank and tensor that differ and by
how many positions, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DistributedError
from ..masks import MaskSet, _place_like, _whole

__all__ = ["mask_digest", "mask_digests", "verify_consistent", "broadcast_masks"]


def mask_digest(name: str, mask: Tensor) -> int:
    """A signed 64-bit BLAKE2b digest of a mask's name, shape and bits (the same in every process:
    never Python's ``hash()``, which is salted per process)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(name.encode("utf-8"))
    h.update(repr(tuple(mask.shape)).encode("ascii"))
    h.update(np.packbits(_whole(mask.detach()).to("cpu", torch.bool).numpy().reshape(-1)).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def mask_digests(masks: MaskSet) -> Tensor:
    """``int64[len(masks)]``: :func:`mask_digest` of every mask, in the MaskSet's order."""
    return torch.tensor([mask_digest(n, m) for n, m in masks.items()], dtype=torch.int64)


def _names_digest(masks: MaskSet) -> int:
    h = hashlib.blake2b(digest_size=8)
    for n, m in masks.items():
        h.update(f"{n}:{tuple(m.shape)};".encode())
    return int.from_bytes(h.digest(), "little", signed=True)


def _all_gather_int64(values: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``[world, n]``: every rank's ``values`` (all ranks pass the same n)."""
    world = dist.get_world_size(group)
    out = [torch.zeros_like(values) for _ in range(world)]
    dist.all_gather(out, values.contiguous(), group=group)
    return torch.stack(out)


def verify_consistent(masks: MaskSet, group: dist.ProcessGroup | None = None) -> None:
    """Check that every rank of ``group`` holds bit-identical masks; collective (call on all ranks).

    Raises :class:`~sparsetorch.errors.DistributedError` on *every* rank when any rank differs:
    first when the ranks mask different tensors (names or shapes), else naming the first rank
    (after rank 0) and the first tensor that differ from rank 0's, with the number of positions
    that differ. Costs one all-gather of 8 bytes per mask (plus one broadcast of the first
    differing mask when there is a difference).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("verify_consistent needs an initialised process group "
                               "(torch.distributed.init_process_group); on one process masks cannot differ.")
    layout = _all_gather_int64(torch.tensor([_names_digest(masks), len(masks)], dtype=torch.int64), group)
    bad = [r for r in range(layout.shape[0]) if not torch.equal(layout[r], layout[0])]
    if bad:
        raise DistributedError(
            f"ranks mask different tensors: rank {bad[0]} has {int(layout[bad[0], 1])} masks, rank 0 "
            f"has {int(layout[0, 1])} (or their names/shapes differ); every rank must attach the same "
            "method to the same model.")
    if not len(masks):
        return
    table = _all_gather_int64(mask_digests(masks), group)  # [world, n_masks]
    differ = (table != table[0]).nonzero()
    if not differ.numel():
        return
    rank, idx = int(differ[0, 0]), int(differ[0, 1])
    name = masks.names()[idx]
    ref = _whole(masks[name].detach()).to("cpu", torch.uint8).clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    mine = torch.tensor([int((_whole(masks[name].detach()).to("cpu", torch.uint8) != ref).sum())], dtype=torch.int64)
    counts = _all_gather_int64(mine, group)[:, 0]
    n_tensors = int((table != table[0]).any(0).sum())
    n_ranks = int((table != table[0]).any(1).sum())
    raise DistributedError(
        f"masks differ across ranks: rank {rank} disagrees with rank 0 on {name!r} "
        f"({int(counts[rank])} of {masks[name].numel()} positions); {n_tensors} tensor(s) differ on "
        f"{n_ranks} rank(s). A mask decision used rank-local data: attach the method with "
        "sparsetorch.distributed.attach(...) so that it decides from averaged statistics.")


@torch.no_grad()
def broadcast_masks(masks: MaskSet, src: int = 0, group: dist.ProcessGroup | None = None) -> list[str]:
    """Overwrite every rank's masks with rank ``src``'s (collective); returns the names that changed
    on this rank. The caller zeroes the weights the new masks prune (``MaskSet.rezero``)."""
    changed = []
    for name, m in list(masks.items()):
        whole = _whole(m.detach())
        buf = whole.to("cpu", torch.uint8).clone()
        dist.broadcast(buf, src=src, group=group)
        new = buf.to(device=whole.device, dtype=torch.bool)
        if not torch.equal(new, whole):
            masks.set(name, _place_like(new, m))  # a sharded mask stays sharded (FSDP2)
            changed.append(name)
    return changed
