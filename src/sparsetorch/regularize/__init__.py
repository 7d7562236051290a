"""Learned sparsity: penalties with proximal steps, learned gates, per-layer sparsity search.

Pure pieces live here; the training methods that use them (``hypersparse``, ``group_lasso``,
``kgroup``, ``l0``, ``ste_gates``, ``dass``, ``random_search``) are registered in
:mod:`sparsetorch.training` and end in a :class:`~sparsetorch.masks.MaskSet` like every other method.

* :mod:`.groups` - what a group is (elements, rows/output channels, input channels, N:M groups, blocks);
* :mod:`.prox` - L1, group lasso, sparse group lasso and the k-level group envelope, with their proxes;
* :mod:`.hypersparse` - the HyperSparse loss, its closed-form gradient and the ART stop rule;
* :mod:`.gates` - straight-through top-k gates and hard-concrete (L0) gates as parametrizations;
* :mod:`.search` - differentiable (DASS-style) and random search over per-layer sparsities;
* :mod:`.penalty` - hooking gradient terms and proximal steps into any ``torch.optim`` optimizer.
"""

from __future__ import annotations

from .gates import HardConcreteGate, TopKGate, expected_l0
from .groups import Grouping, parse_grouping
from .hypersparse import ART, hs_grad, hs_loss, hs_scale
from .prox import (
    group_lasso_penalty,
    group_soft_threshold,
    kgroup_penalty,
    kgroup_prox,
    kgroup_prox_norms,
    ksupport_norm_sq,
    soft_threshold,
    sparse_group_prox,
)
from .search import dass_search, project_budget, random_search

__all__ = [
    "ART",
    "Grouping",
    "HardConcreteGate",
    "TopKGate",
    "dass_search",
    "expected_l0",
    "group_lasso_penalty",
    "group_soft_threshold",
    "hs_grad",
    "hs_loss",
    "hs_scale",
    "kgroup_penalty",
    "kgroup_prox",
    "kgroup_prox_norms",
    "ksupport_norm_sq",
    "parse_grouping",
    "project_budget",
    "random_search",
    "soft_threshold",
    "sparse_group_prox",
]
