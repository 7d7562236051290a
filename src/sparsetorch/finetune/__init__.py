"""After pruning: get the quality back without losing sparsity.

* :func:`finetune` -- mask-preserving fine-tuning of a pruned causal LM with cross-entropy,
  logit distillation from the dense teacher and/or SquareHead (``loss="kd+squarehead"``).
* :func:`train_masked` -- the same engine for any ``nn.Module`` and loss (AdamW, warm-up +
  cosine, accumulation, clipping on the masked gradients, atomic checkpoints, exact resume).
* :mod:`.losses` -- the loss terms as pure functions and :func:`parse_loss`.
* :func:`soup` -- Sparse Model Soups: uniform or greedy averages of children of one parent.
"""

from __future__ import annotations

from .lm import (
    DOCS_SECTIONS,
    WindowSampler,
    check_teacher,
    embedded_windows,
    finetune,
    python_docs_text,
)
from .loop import (
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    bf16_available,
    load_checkpoint,
    lr_factor,
    train_masked,
)
from .losses import LossError, LossSpec, causal_ce, kd_kl, parse_loss, squarehead
from .soup import SoupError, SoupResult, average_state, check_same_masks, soup

__all__ = [
    "DOCS_SECTIONS",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "LossError",
    "LossSpec",
    "SoupError",
    "SoupResult",
    "WindowSampler",
    "average_state",
    "bf16_available",
    "causal_ce",
    "check_same_masks",
    "check_teacher",
    "embedded_windows",
    "finetune",
    "kd_kl",
    "load_checkpoint",
    "lr_factor",
    "parse_loss",
    "python_docs_text",
    "soup",
    "squarehead",
    "train_masked",
]
