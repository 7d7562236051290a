"""Importance of every removable structure of one block: pure functions of tensors.

A structure is an MLP channel ``j`` (row ``j`` of ``gate_proj``/``up_proj``, column ``j`` of
``down_proj``), a query head ``h`` (its ``head_dim`` rows of ``q_proj`` and columns of
``o_proj``) or a KV head (its rows of ``k_proj``/``v_proj``; it goes with all its query heads).
Every score returns ``(channels [I], heads [H], kv_extra [KV])``; a KV group scores the sum of
its query heads plus ``kv_extra``. Low scores are removed first.

* ``magnitude``: the squared L2 norm of the structure's weights.
* ``wanda``: Wanda over the structure, ``sum_i |W_out[i, c]| * ||X_c||`` over the structure's
  input features ``c`` of the output projection (``X``: calibration activations).
* ``flap``: FLAP's fluctuation, ``Var(X_c) * ||W_out[:, c]||^2`` summed over ``c`` (An et al.
  2024); removed channels' mean output is folded into the output bias (``compensate``).
* ``taylor``: first-order Taylor, ``sum |w * dL/dw|`` over the structure's weights (LLM-Pruner's
  element-wise form), with ``dL/dw`` the LM loss's gradient summed over the calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .stats import FeatureStats


@dataclass
class BlockTensors:
    """One block's weights (``[out, in]``), calibration statistics and gradients."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor | None
    up: Tensor
    down: Tensor
    head_dim: int
    attn_stats: FeatureStats | None = None
    mlp_stats: FeatureStats | None = None
    grads: dict[str, Tensor] | None = None  # keys q, k, v, o, gate, up, down

    def per_head(self, features: Tensor) -> Tensor:
        """Sum a per-row (or per-column) score of a ``[heads * head_dim]`` projection per head."""
        return features.reshape(-1, self.head_dim).sum(1)


Scores = tuple[Tensor, Tensor, Tensor]


def _sq_rows(w: Tensor) -> Tensor:
    return w.double().pow(2).sum(1)


def _sq_cols(w: Tensor) -> Tensor:
    return w.double().pow(2).sum(0)


def magnitude(t: BlockTensors) -> Scores:
    ch = _sq_rows(t.up) + _sq_cols(t.down) + (_sq_rows(t.gate) if t.gate is not None else 0)
    heads = t.per_head(_sq_rows(t.q) + _sq_cols(t.o))
    kv = t.per_head(_sq_rows(t.k) + _sq_rows(t.v))
    return ch, heads, kv


def _need_stats(t: BlockTensors, name: str) -> tuple[FeatureStats, FeatureStats]:
    if t.attn_stats is None or t.mlp_stats is None:
        raise ValueError(f"the {name} score needs calibration statistics")
    return t.attn_stats, t.mlp_stats


def wanda(t: BlockTensors) -> Scores:
    a, m = _need_stats(t, "wanda")
    ch = t.down.double().abs().sum(0) * m.norm
    heads = t.per_head(t.o.double().abs().sum(0) * a.norm)
    return ch, heads, heads.new_zeros(t.k.shape[0] // t.head_dim)


def flap(t: BlockTensors) -> Scores:
    a, m = _need_stats(t, "flap")
    ch = m.variance * _sq_cols(t.down)
    heads = t.per_head(a.variance * _sq_cols(t.o))
    return ch, heads, heads.new_zeros(t.k.shape[0] // t.head_dim)


def taylor(t: BlockTensors) -> Scores:
    if t.grads is None:
        raise ValueError("the taylor score needs gradients")
    g = t.grads

    def wg(name: str, w: Tensor) -> Tensor:
        return (w.double() * g[name].double()).abs()

    ch = wg("up", t.up).sum(1) + wg("down", t.down).sum(0) + (wg("gate", t.gate).sum(1) if t.gate is not None else 0)
    heads = t.per_head(wg("q", t.q).sum(1) + wg("o", t.o).sum(0))
    kv = t.per_head(wg("k", t.k).sum(1) + wg("v", t.v).sum(1))
    return ch, heads, kv


SCORES: dict[str, Callable[[BlockTensors], Scores]] = {
    "magnitude": magnitude, "wanda": wanda, "flap": flap, "taylor": taylor}
"""Score registry: ``--score NAME`` maps to the function."""

NEEDS: dict[str, str | None] = {"magnitude": None, "wanda": "stats", "flap": "stats", "taylor": "grads"}
"""What each score reads from calibration data."""
