"""Attach a training method under data parallelism so that every rank keeps the same masks.

The lifecycle is the single-process one (``attach`` → ``step()`` after every optimizer step),
with three differences, all made here and nowhere else:

* the method's :attr:`~sparsetorch.training.Sparsifier.average` becomes an all-reduce mean, so
  decisions that need global information use the global quantity (RigL grows where the dense
  gradient *of the global batch* is largest; SNFS redistributes by the averaged momentum);
* after the initial masks are chosen, rank ``src``'s masks are broadcast to every rank (a mask
  chosen from rank-local data, e.g. SNIP on each rank's own batch, would otherwise differ);
* the masks are checked with :func:`~sparsetorch.distributed.masks.verify_consistent`.

Randomness needs nothing extra: every method draws from its own generator seeded by ``seed``,
identical on every rank. Magnitude decisions need nothing either: DDP keeps the parameters
identical, and gloo's all-reduce gives every rank bit-identical gradients.

Order with DDP: attach first, then wrap the model in ``DistributedDataParallel`` (either order
works: DDP broadcasts rank 0's parameters at construction, and the masks agree already). The
masks are a :class:`~sparsetorch.masks.MaskSet`, never module buffers, so DDP's buffer
broadcast cannot overwrite them and hide a divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DistributedError
from ..masks import MaskSet, _is_sharded
from .masks import broadcast_masks, verify_consistent

__all__ = ["attach", "all_reduce_mean"]


def all_reduce_mean(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor]:
    """``t -> mean of t over the ranks of group`` (a new tensor; ``t`` is left as it is).

    SUM then divide (gloo rejects ``ReduceOp.AVG`` in older torch releases).
    """

    def average(t: Tensor) -> Tensor:
        if _is_sharded(t):  # FSDP2: a shard of an already averaged gradient
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.div_(dist.get_world_size(group))

    return average


def attach(
    sparsifier: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    data: Any = None,
    group: dist.ProcessGroup | None = None,
    src: int = 0,
) -> MaskSet:
    """``sparsifier.attach(model, optimizer, data=data)`` on every rank, made consistent across ranks.

    Collective: call on every rank of ``group``, with the same method and settings. Returns the
    masks (identical on every rank, checked). After each ``sparsifier.step()`` that returns
    True, ``verify_consistent(sparsifier.masks, group)`` checks them again (8 bytes per mask).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            "sparsetorch.distributed.attach needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets the environment), or use "
            "sparsifier.attach(...) on one process.")
    sparsifier.average = all_reduce_mean(group)
    masks = sparsifier.attach(model, optimizer, data=data)
    if broadcast_masks(masks, src=src, group=group):
        masks.rezero()
    verify_consistent(masks, group)
    return masks
