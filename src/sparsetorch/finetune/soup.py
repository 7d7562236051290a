"""Sparse Model Soups (Zimmer et al., ICLR 2024): average models fine-tuned under one mask.

Children fine-tuned from one pruned parent under its mask (different seeds, data orders or
hyper-parameters) share the parent's zeros, so the parameter mean of any of them is exactly as
sparse as the parent. :func:`soup` makes the uniform soup (every child) or the greedy soup
(Wortsman et al. 2022: children sorted by their own validation score, each added only if the
soup's score does not get worse). Children whose masks differ are refused, naming the first
tensor that differs: their mean would be denser than either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..masks import MaskSet
from .loop import FinetuneError

__all__ = ["SoupError", "SoupResult", "average_state", "check_same_masks", "soup"]


class SoupError(FinetuneError):
    """Models that cannot be averaged: different architectures, shapes or masks."""


@dataclass
class SoupResult:
    """The soup model, which children went in (indices into ``models``), and the scores."""

    model: nn.Module
    used: list[int]
    #: each child's own score (greedy only; in the order of ``models``)
    scores: list[float] = field(default_factory=list)
    #: the soup's score after each accepted child (greedy only)
    soup_scores: list[float] = field(default_factory=list)


def _support(model: nn.Module, masks: MaskSet | None) -> dict[str, Tensor]:
    if masks is not None:
        return {n: m.cpu() for n, m in masks.masks.items()}
    return {n: (p.detach() != 0).cpu() for n, p in model.named_parameters() if p.dim() >= 2}


def check_same_masks(models: Sequence[nn.Module], masks: Sequence[MaskSet] | None = None) -> None:
    """Raise :class:`SoupError` unless every model has the same tensors, shapes and masks.

    With ``masks`` (one MaskSet per model) those are compared; without, the zero patterns of
    every weight matrix (a kept weight that is exactly zero then counts as pruned).
    """
    if len(models) < 1:
        raise SoupError("soup needs at least one model")
    if masks is not None and len(masks) != len(models):
        raise SoupError(f"got {len(masks)} MaskSets for {len(models)} models; pass one per model or none")
    ref = dict(models[0].state_dict())
    ref_sup = _support(models[0], masks[0] if masks else None)
    for i, m in enumerate(models[1:], start=1):
        sd = m.state_dict()
        if sd.keys() != ref.keys():
            extra = sorted(set(sd) ^ set(ref))
            raise SoupError(f"model {i} has other tensors than model 0 (first difference: {extra[0]!r}); "
                            "a soup averages models of one architecture")
        for n, t in sd.items():
            if t.shape != ref[n].shape:
                raise SoupError(f"{n}: model {i} has shape {tuple(t.shape)}, model 0 {tuple(ref[n].shape)}")
        sup = _support(m, masks[i] if masks else None)
        if sup.keys() != ref_sup.keys():
            extra = sorted(set(sup) ^ set(ref_sup))
            raise SoupError(f"{extra[0]}: masked in one of model 0 and model {i} but not in the other")
        for n, s in sup.items():
            if not torch.equal(s, ref_sup[n]):
                pos = tuple(torch.nonzero(s != ref_sup[n])[0].tolist())
                raise SoupError(f"{n}: the mask of model {i} differs from model 0's (first at {pos}); a soup of "
                                "different masks is denser than its ingredients: fine-tune every child under "
                                "the parent's mask")


@torch.no_grad()
def average_state(models: Sequence[nn.Module]) -> dict[str, Tensor]:
    """The element-wise mean of the models' floating-point tensors (accumulated in float64, cast
    back to each tensor's dtype); integer and bool tensors are taken from the first model."""
    sds = [m.state_dict() for m in models]
    out: dict[str, Tensor] = {}
    for n, t in sds[0].items():
        if t.is_floating_point():
            acc = torch.zeros_like(t, dtype=torch.float64)
            for sd in sds:
                acc += sd[n].to(torch.float64)
            out[n] = (acc / len(sds)).to(t.dtype)
        else:
            out[n] = t.clone()
    return out


def _make(models: Sequence[nn.Module], idx: Sequence[int]) -> nn.Module:
    soup_model = copy.deepcopy(models[idx[0]])
    soup_model.load_state_dict(average_state([models[i] for i in idx]))
    return soup_model


def soup(
    models: Sequence[nn.Module],
    how: str = "uniform",
    val_fn: Callable[[nn.Module], float] | None = None,
    *,
    masks: Sequence[MaskSet] | None = None,
    maximize: bool = True,
) -> SoupResult:
    """Average fine-tuned children of one sparse parent; the soup has the parent's masks.

    ``how="uniform"``: the mean of all models. ``how="greedy"``: needs ``val_fn(model) -> score``
    (held-out data; higher is better, or pass ``maximize=False`` for a loss or perplexity); the
    children are ranked by their own score and each is kept only if the soup's score with it is
    at least as good. The models are not changed; the soup is a new model.
    """
    models = list(models)
    check_same_masks(models, masks)
    if how == "uniform":
        return SoupResult(_make(models, range(len(models))), list(range(len(models))))
    if how != "greedy":
        raise SoupError(f"how must be 'uniform' or 'greedy', got {how!r}")
    if val_fn is None:
        raise SoupError("a greedy soup needs val_fn(model) -> score on held-out data")

    def better(a: float, b: float) -> bool:  # a at least as good as b
        return a >= b if maximize else a <= b

    def score(m: nn.Module) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            s = float(val_fn(m))
        m.train(was)
        return s

    scores = [score(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i] if maximize else scores[i])
    used = [order[0]]
    best = scores[order[0]]
    soup_scores = [best]
    for i in order[1:]:
        trial = _make(models, [*used, i])
        s = score(trial)
        if better(s, best):
            used.append(i)
            best = s
            soup_scores.append(s)
    return SoupResult(_make(models, used), used, scores, soup_scores)
