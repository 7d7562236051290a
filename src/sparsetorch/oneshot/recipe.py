"""YAML recipes for one-shot pruning.

A recipe is a mapping (YAML file, YAML string or dict), flat or under a ``oneshot:`` /
``prune:`` key::

    method: sparsegpt          # magnitude | wanda | sparsegpt | dsnot
    sparsity: 0.5              # omit for N:M
    pattern: 2:4               # unstructured | rowwise | N:M
    allocation: uniform        # uniform | owl | sensitivity
    targets: ["re:.*proj"]     # optional
    ignore: ["re:.*self_attn.*"]
    num_samples: 64
    seq_len: 512
    options:                   # solver and pipeline options
      percdamp: 0.01
      true_sequential: true

:func:`apply_recipe` calls :func:`sparsetorch.prune` with it. The section is also registered
with :mod:`sparsetorch.recipes` as ``oneshot`` (and ``prune``), where it builds a
:class:`OneshotRecipe`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MethodError, close_matches

KEYS = (
    "method",
    "sparsity",
    "pattern",
    "allocation",
    "targets",
    "ignore",
    "num_samples",
    "seq_len",
    "seed",
    "options",
)


@dataclass
class OneshotRecipe:
    method: str = "sparsegpt"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    targets: list[str] | str | None = None
    ignore: list[str] | str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_oneshot_section(section: Mapping[str, Any]) -> OneshotRecipe:
    """Validate a recipe mapping and return a :class:`OneshotRecipe`."""
    from . import SOLVERS

    data = dict(section)
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise MethodError(
            f"unknown one-shot recipe key(s) {unknown}; allowed: {', '.join(KEYS)} (solver options go under 'options')."
            + close_matches(str(unknown[0]), KEYS)
        )
    r = OneshotRecipe(**data)
    r.method = str(r.method).lower()
    if r.method not in SOLVERS:
        raise MethodError(
            f"unknown one-shot method {r.method!r}; available: {', '.join(SOLVERS)}."
            + close_matches(r.method, SOLVERS)
        )
    if not isinstance(r.options, Mapping):
        raise MethodError("recipe 'options' must be a mapping of solver/pipeline options.")
    from ..prune import check_request

    # every model-independent setting (pattern, sparsity, allocation, option values) is checked
    # when the recipe is read, not when a model is already loaded
    req = check_request(r.method, r.sparsity, r.pattern, allocation=r.allocation, options=dict(r.options),
                        num_samples=r.num_samples, seq_len=r.seq_len)
    r.options, r.allocation = req.options, req.allocation
    r.pattern = str(r.pattern)
    return r


def load_oneshot_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> OneshotRecipe:
    """Load a recipe from a YAML path, YAML string or dict (flat or under ``oneshot:``/``prune:``)."""
    from ..recipes import read_recipe_source

    data = read_recipe_source(source)
    for key in ("oneshot", "prune"):
        if key in data and isinstance(data[key], Mapping) and len(data) == 1:
            data = dict(data[key])
    return build_oneshot_section(data)


def apply_recipe(
    model: Any, source: Any, *, calibration: Any = None, tokenizer: Any = None, **overrides: Any
):
    """Prune ``model`` as the recipe says; returns the :class:`~sparsetorch.prune.PruneReport`."""
    from ..prune import prune

    r = source if isinstance(source, OneshotRecipe) else load_oneshot_recipe(source)
    opts = {**r.options, **overrides}
    return prune(
        model,
        r.method,
        r.sparsity,
        r.pattern,
        allocation=r.allocation,
        targets=r.targets,
        ignore=r.ignore,
        calibration=calibration,
        tokenizer=tokenizer,
        num_samples=r.num_samples,
        seq_len=r.seq_len,
        seed=r.seed,
        **opts,
    )


# make `oneshot:` / `prune:` sections available to sparsetorch.recipes.load_recipe
from .. import recipes as _recipes  # noqa: E402

for _name in ("oneshot", "prune"):
    _recipes.SECTIONS.setdefault(_name, build_oneshot_section)
