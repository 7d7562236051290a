"""One-shot (post-training) pruning of LLMs: one block-sequential pipeline, many solvers.

``SOLVERS`` maps a method name to its solver class; :func:`run_oneshot` is called by
:func:`sparsetorch.prune` for every method listed here.
"""

from __future__ import annotations

from .base import Solver
from .dsnot import DSnoT, dsnot_refine
from .magnitude import Magnitude, magnitude_mask
from .sparsegpt import SparseGPT, sparsegpt_prune
from .stats import InputStats, accumulate
from .wanda import Wanda, wanda_mask

SOLVERS: dict[str, type[Solver]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "dsnot": DSnoT,
}

from .blocks import find_decoder_blocks  # noqa: E402
from .pipeline import run_oneshot  # noqa: E402

__all__ = [
    "SOLVERS",
    "Solver",
    "Magnitude",
    "Wanda",
    "SparseGPT",
    "DSnoT",
    "InputStats",
    "accumulate",
    "run_oneshot",
    "find_decoder_blocks",
    "magnitude_mask",
    "wanda_mask",
    "sparsegpt_prune",
    "dsnot_refine",
]
