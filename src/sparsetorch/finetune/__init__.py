"""After pruning: get the quality back without losing sparsity.

* :func:`finetune` -- mask-preserving fine-tuning of a pruned causal LM with cross-entropy,
  logit distillation from the dense teacher and/or SquareHead (``loss="kd+squarehead"``).
* :func:`train_masked` -- the same engine for any ``nn.Module`` and loss (AdamW, warm-up +
  cosine, accumulation, clipping on the masked gradients, atomic checkpoints, exact resume).
* :mod:`.losses` -- the loss terms as pure functions and :func:`parse_loss`.
* :func:`soup` -- Sparse Model Soups: uniform or greedy averages of children of one parent;
  :func:`train_children` and :func:`iterative_sms` (prune -> k children -> soup, m phases).
* :mod:`.lora` -- sparse LoRA: adapters whose delta is masked in the forward, so that
  :func:`merge_masked` keeps the parent's masks exactly (``finetune(..., lora=16)``).
* :mod:`.sparse_update` -- sparse backpropagation: a :class:`SparseUpdate` spec (``last:4``,
  ``bias,norm``, ``channels:0.125@mlp.up_proj``) of what trains; the rest is frozen and costs no
  backward (``finetune(..., update="last:4")``); :func:`measure_step` measures what a step costs.

``peft`` is imported only when a LoRA function is first used (it takes seconds to import).
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
from .lora import LoraError, LoraSettings, add_sparse_lora, merge_masked, merge_naive
from .losses import LossError, LossSpec, causal_ce, kd_kl, parse_loss, squarehead
from .soup import (
    Child,
    ChildSetting,
    PhaseRecord,
    SMSResult,
    SoupError,
    SoupResult,
    average_state,
    check_same_masks,
    iterative_sms,
    phase_sparsities,
    prune_further,
    recalibrate_bn,
    soup,
    train_children,
)
from .sparse_update import (
    SavedTensorsMeter,
    SparseUpdate,
    StepCost,
    UpdateError,
    apply_update,
    measure_step,
)

__all__ = [
    "Child",
    "ChildSetting",
    "DOCS_SECTIONS",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "LossError",
    "LoraError",
    "LoraSettings",
    "LossSpec",
    "PhaseRecord",
    "SMSResult",
    "SavedTensorsMeter",
    "SparseUpdate",
    "StepCost",
    "UpdateError",
    "apply_update",
    "measure_step",
    "SoupError",
    "SoupResult",
    "WindowSampler",
    "average_state",
    "add_sparse_lora",
    "bf16_available",
    "causal_ce",
    "check_same_masks",
    "check_teacher",
    "embedded_windows",
    "finetune",
    "iterative_sms",
    "kd_kl",
    "load_checkpoint",
    "lr_factor",
    "merge_masked",
    "merge_naive",
    "parse_loss",
    "phase_sparsities",
    "prune_further",
    "python_docs_text",
    "recalibrate_bn",
    "soup",
    "squarehead",
    "train_children",
    "train_masked",
]
