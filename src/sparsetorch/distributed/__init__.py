"""Sparse training on ``torch.distributed``: masks identical on every rank, checked.

* :func:`attach` — attach a training method (RigL, SET, SNFS, GMP ...) under data parallelism:
  decisions from all-reduced statistics, initial masks broadcast from one rank, then verified.
* :func:`verify_consistent` — raise on every rank when any rank's masks differ (names the rank,
  tensor and number of positions); :func:`broadcast_masks`, :func:`mask_digests`.
* :func:`register_topk` — top-k + error feedback as a DDP communication hook (DGC momentum
  correction, local clipping, density warm-up, 16-bit values as options), with byte accounting;
  :func:`register_allreduce_counter` is DDP's default all-reduce with the same accounting.
* :class:`OuterLoop` — DiLoCo (outer Nesterov SGD on all-reduced pseudo-gradients) and
  SparseLoCo (chunked top-k + error feedback + 2-bit values) every ``H`` inner steps.
* :func:`shard_masks`, :func:`save_sharded`, :func:`load_sharded` — masks under FSDP2, placed
  like their parameters, saved and resharded with DCP (2 → 3 ranks tested).
* :func:`run_local` — run a function on N local processes in a gloo group, with hard timeouts
  (the launcher of ``sparsetorch train-lm --nproc`` and of the tests; ``torchrun`` for real runs).

See ``docs/distributed.md``.
"""

from __future__ import annotations

from .fsdp import load_sharded, save_sharded, shard_masks
from .hooks import TopKState, register_allreduce_counter, register_topk, topk_hook
from .launch import run_local
from .masks import broadcast_masks, mask_digest, mask_digests, verify_consistent
from .outer import OuterLoop
from .sparsifier import all_reduce_mean, attach

__all__ = [
    "attach",
    "all_reduce_mean",
    "verify_consistent",
    "broadcast_masks",
    "mask_digest",
    "mask_digests",
    "run_local",
    "TopKState",
    "topk_hook",
    "register_topk",
    "register_allreduce_counter",
    "OuterLoop",
    "shard_masks",
    "save_sharded",
    "load_sharded",
]
