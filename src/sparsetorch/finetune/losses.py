"""Recovery losses for a pruned causal LM: cross-entropy, logit distillation, SquareHead.

Pure functions of logits and hidden states, plus :class:`LossSpec`, a weighted sum of named
terms parsed from strings like ``"kd"``, ``"kd+squarehead"`` or ``"0.5*ce+kd"``.

* ``ce`` -- next-token cross-entropy: position ``t`` predicts token ``t + 1``; the mean over
  ``batch * (seq_len - 1)`` predicted tokens (what perplexity exponentiates).
* ``kd`` -- logit distillation ``T^2 * KL(p_teacher || p_student)`` with both distributions
  softened by the temperature ``T`` (Hinton et al. 2015; the ``T^2`` keeps gradient scale
  independent of ``T``), summed over the vocabulary and averaged over every position.
* ``squarehead`` -- per-layer hidden-state distillation normalised by the teacher's energy
  (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of LLMs"):
  ``MSE(h_s^l, h_t^l) / MSE(h_t^l, 0)`` for the output of every decoder block ``l``. The paper
  sums the per-layer terms; ``reduction="mean"`` (default) averages them so that its weight
  does not grow with depth (``"sum"`` = ``mean * num_layers`` reproduces the paper).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SparseTorchError

__all__ = ["LOSS_TERMS", "LossError", "LossSpec", "causal_ce", "kd_kl", "squarehead", "parse_loss"]


class LossError(SparseTorchError, ValueError):
    """A loss spec that does not parse, or inputs the loss cannot compare."""


def causal_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits [B, L, V]`` on ``input_ids [B, L]``."""
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise LossError(f"causal_ce needs logits [B, L, V] and ids [B, L], got {tuple(logits.shape)} "
                        f"and {tuple(input_ids.shape)}")
    if logits.shape[1] < 2:
        raise LossError("causal_ce needs sequences of at least 2 tokens")
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1))


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T))`` (sum over the vocab)."""
    if student_logits.shape != teacher_logits.shape:
        raise LossError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ: the teacher needs the same vocabulary")
    if not temperature > 0:
        raise LossError(f"temperature must be > 0, got {temperature}")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s); log_target avoids exp/log round trips
    kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def squarehead(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
               reduction: str = "mean", eps: float = 1e-12) -> Tensor:
    """Sum or mean over layers of ``MSE(h_s, h_t) / MSE(h_t, 0)`` (normalised feature KD)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise LossError(f"squarehead needs the same number of layers from student and teacher, got "
                        f"{len(student_hidden)} and {len(teacher_hidden)}: the teacher needs the same depth")
    if reduction not in ("mean", "sum"):
        raise LossError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    terms = []
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if hs.shape != ht.shape:
            raise LossError(f"layer {i}: student hidden state {tuple(hs.shape)} and teacher's "
                            f"{tuple(ht.shape)} differ: the teacher needs the same width")
        ht = ht.float()
        terms.append(F.mse_loss(hs.float(), ht) / (ht.pow(2).mean() + eps))
    total = torch.stack(terms)
    return total.mean() if reduction == "mean" else total.sum()


#: term name -> (needs the teacher, needs hidden states)
LOSS_TERMS: dict[str, tuple[bool, bool]] = {
    "ce": (False, False),
    "kd": (True, False),
    "squarehead": (True, True),
}
_ALIASES = {"cross_entropy": "ce", "crossentropy": "ce", "distill": "kd", "logit_kd": "kd",
            "square_head": "squarehead", "sq": "squarehead"}
_TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?\s*\*\s*)?([a-z_]+)\s*$", re.I)


@dataclass(frozen=True)
class LossSpec:
    """A weighted sum of loss terms, e.g. ``{"kd": 1.0, "squarehead": 1.0}``."""

    weights: tuple[tuple[str, float], ...]

    @property
    def needs_teacher(self) -> bool:
        return any(LOSS_TERMS[n][0] for n, _ in self.weights)

    @property
    def needs_hidden(self) -> bool:
        return any(LOSS_TERMS[n][1] for n, _ in self.weights)

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, 0.0)

    def __str__(self) -> str:
        return "+".join(n if w == 1.0 else f"{w:g}*{n}" for n, w in self.weights)


def parse_loss(spec: str | Mapping[str, float] | LossSpec) -> LossSpec:
    """``"kd"``, ``"kd+squarehead"``, ``"0.5*ce+kd"`` or ``{"ce": 0.5, "kd": 1}`` -> :class:`LossSpec`."""
    if isinstance(spec, LossSpec):
        return spec
    items: list[tuple[str, float]] = []
    if isinstance(spec, Mapping):
        raw = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        raw = []
        for part in spec.split("+"):
            m = _TERM.match(part)
            if not m:
                raise LossError(f"cannot parse loss term {part.strip()!r} in {spec!r}; use names "
                                f"{', '.join(LOSS_TERMS)} joined by '+', each optionally weighted as "
                                "'0.5*ce'")
            w = part.split("*")[0] if "*" in part else "1"
            raw.append((m.group(2), float(w)))
    else:
        raise LossError(f"loss must be a string like 'kd+squarehead' or a mapping of weights, got {spec!r}")
    for name, w in raw:
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in LOSS_TERMS:
            raise LossError(f"unknown loss term {name!r}; known: {', '.join(LOSS_TERMS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0) or w == float("inf"):
            raise LossError(f"loss weight of {key!r} must be a finite number >= 0, got {w!r}")
        if any(key == k for k, _ in items):
            raise LossError(f"loss term {key!r} appears twice in {spec!r}")
        if w > 0:
            items.append((key, float(w)))
    if not items:
        raise LossError(f"loss {spec!r} has no term with a positive weight")
    return LossSpec(tuple(items))
