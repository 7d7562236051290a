"""Importance scores: pure functions ``(weight, **context) -> Tensor`` of the weight's shape.

Higher score = more important = kept first. A score never mutates its inputs. New scores
register with :func:`register_score` so recipes can name them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .errors import MethodError, close_matches


class ScoreFn(Protocol):
    """The interface every score follows: keyword-only context, result shaped like ``weight``."""

    def __call__(self, weight: Tensor, **context: object) -> Tensor: ...


SCORES: dict[str, ScoreFn] = {}


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a score function to the registry under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        return fn

    return deco


def get_score(name: str) -> ScoreFn:
    """Look a score up by name, with a helpful error for typos."""
    try:
        return SCORES[name]
    except KeyError:
        raise MethodError(
            f"unknown score {name!r}; available: {', '.join(sorted(SCORES))}."
            + close_matches(name, SCORES)
        ) from None


@register_score("magnitude")
def magnitude(weight: Tensor, **_: object) -> Tensor:
    """|W|: the classic magnitude criterion."""
    return weight.detach().abs()


@register_score("random")
def random(weight: Tensor, *, seed: int = 0, generator: torch.Generator | None = None, **_: object) -> Tensor:
    """Uniform random scores, reproducible from ``seed`` (or an explicit generator)."""
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


@register_score("gradient")
def gradient(weight: Tensor, *, grad: Tensor, **_: object) -> Tensor:
    """|dL/dW|: used by RigL to grow connections where the dense gradient is largest."""
    return grad.detach().abs()


@register_score("snip")
def snip(weight: Tensor, *, grad: Tensor, **_: object) -> Tensor:
    """|W * dL/dW| (connection sensitivity, Lee et al. 2019)."""
    return (weight.detach() * grad.detach()).abs()


@register_score("wanda")
def wanda(weight: Tensor, *, input_norm: Tensor, **_: object) -> Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al. 2024); ``input_norm`` has one entry per input feature."""
    w = weight.detach()
    norm = input_norm.to(w.device, torch.float32)
    if norm.numel() != w.shape[-1]:
        raise MethodError(
            f"wanda score needs one input norm per input feature ({w.shape[-1]}), got {norm.numel()}."
        )
    return w.abs().float() * norm.reshape(1, -1)
