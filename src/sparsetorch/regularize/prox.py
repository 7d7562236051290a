"""Penalties and their proximal operators, as pure tensor functions (ALGORITHMS.md §J).

Every function takes a ``[G, S]`` group view (see :mod:`.groups`) or a plain tensor, never a
model, and never mutates its input. ``t`` is the prox step: ``prox_{t*Omega}(y) = argmin_x
1/2 ||x - y||^2 + t * Omega(x)``; in proximal SGD ``t = lr * lambda``.

* L1: ``Omega(x) = ||x||_1``, prox = soft threshold.
* Group lasso: ``Omega(x) = sum_g c_g ||x_g||_2`` (``c_g = sqrt(|g|)`` by default, so wide groups are not
  penalised more per entry), prox = block soft threshold ``x_g * max(0, 1 - t c_g / ||x_g||)``.
* Sparse group lasso: ``mu ||x||_1 + sum_g c_g ||x_g||``; its prox is the soft threshold followed
  by the block soft threshold (Friedman, Hastie, Tibshirani 2010; Simon et al. 2013).
* k-level group envelope (Refael, Arbel, Huleihel, arXiv 2212.12921): with ``v_g = ||x_g||`` the
  group norms, the *group sparse envelope* is ``S_k(x) = 1/2 ||v||_{(k)}^2``, the convex envelope of
  ``1/2 ||x||^2`` restricted to vectors with at most ``k`` non-zero groups (``||.||_{(k)}`` is the
  k-support norm of Argyriou, Foygel, Srebro 2012). The penalty used here is
  ``P_k(x) = S_k(x) - 1/2 ||x||^2 >= 0``, which is zero exactly when at most ``k`` groups are non-zero,
  so the sparsity level is fixed in advance. Its prox (derived here; ALGORITHMS.md marks the paper's
  formulas unverified) acts on the group norms only:

  - ``t >= 1``: keep the ``k`` groups of largest norm unchanged, zero the others (so at most ``k``
    non-zero groups; by Fenchel-Young this is the global minimiser for every ``t >= 1``);
  - ``t < 1``: ``(1-t)/2 ||x||^2 - <x, y> + t S_k(x)`` is strongly convex, and the prox equals
    ``prox_{beta S_k}(y / (1-t))`` with ``beta = t / (1-t)``; that one is computed exactly from the
    variational form ``||u||_{(k)}^2 = min { sum u_i^2 / theta_i : 0 < theta_i <= 1, sum theta_i <= k }``
    (McDonald, Pontil, Stamos 2016): ``theta_i = clip(alpha p_i - beta, 0, 1)`` with ``sum theta = k``
    (a one-dimensional monotone equation, solved by bisection then exactly on its linear piece) and
    ``u_i = p_i theta_i / (theta_i + beta)``.

  No per-group weights are applied (the paper's "weighted" variant scales the group norms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import MethodError

__all__ = [
    "check_lambda",
    "soft_threshold",
    "group_soft_threshold",
    "sparse_group_prox",
    "group_lasso_penalty",
    "ksupport_norm_sq",
    "kgroup_penalty",
    "kgroup_prox_norms",
    "kgroup_prox",
    "check_k",
]


def check_lambda(value: float, name: str = "lambda") -> float:
    """Return ``value`` as a float, or raise :class:`MethodError` when it is negative or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MethodError(f"{name} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(v) or v < 0:
        raise MethodError(
            f"{name} must be a finite number >= 0 (the strength of the penalty), got {value!r}; "
            "use 0 to switch the penalty off."
        )
    return v


def check_k(k: int, n_groups: int, what: str = "tensor") -> int:
    """Validate the number of surviving groups ``k`` (``1 <= k <= n_groups``)."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise MethodError(f"k (groups kept) must be a positive integer, got {k!r}.")
    if k > n_groups:
        raise MethodError(
            f"k={k} groups cannot survive in {what}: it has only {n_groups} groups. Use k <= {n_groups}, "
            "or a finer grouping."
        )
    return int(k)


def soft_threshold(x: Tensor, t: float | Tensor) -> Tensor:
    """``sign(x) * max(|x| - t, 0)``: the prox of ``t * ||x||_1``."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


def group_lasso_penalty(groups: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum_g c_g ||x_g||_2`` of a ``[G, S]`` view; ``c_g`` defaults to ``sqrt(S)``."""
    norms = groups.norm(dim=1)
    c = torch.full_like(norms, math.sqrt(groups.shape[1])) if weights is None else weights
    return (c * norms).sum()


def group_soft_threshold(groups: Tensor, t: float | Tensor, weights: Tensor | None = None) -> Tensor:
    """Block soft threshold of a ``[G, S]`` view: ``x_g * max(0, 1 - t c_g / ||x_g||)``.

    The prox of ``t * sum_g c_g ||x_g||``; ``c_g`` defaults to ``sqrt(S)`` (group-size normalisation).
    A group whose norm is at most ``t c_g`` becomes exactly zero.
    """
    norms = groups.norm(dim=1, keepdim=True)
    c = math.sqrt(groups.shape[1]) if weights is None else weights.reshape(-1, 1)
    scale = torch.clamp(1 - (t * c) / norms.clamp_min(torch.finfo(norms.dtype).tiny), min=0)
    return groups * scale


def sparse_group_prox(groups: Tensor, t_l1: float, t_group: float, weights: Tensor | None = None) -> Tensor:
    """Prox of ``t_l1 ||x||_1 + t_group sum_g c_g ||x_g||``: soft threshold, then block soft threshold."""
    return group_soft_threshold(soft_threshold(groups, t_l1), t_group, weights)


def _sorted_desc(v: Tensor) -> Tensor:
    return torch.sort(v.abs().double().reshape(-1), descending=True).values


def ksupport_norm_sq(v: Tensor, k: int) -> Tensor:
    """``||v||_{(k)}^2``, the squared k-support norm (Argyriou, Foygel, Srebro 2012, Prop. 2.1).

    With ``z`` = ``|v|`` sorted descending and ``z_0 = +inf``: find the ``r`` in ``0..k-1`` with
    ``z_{k-r-1} > T_r / (r+1) >= z_{k-r}``, ``T_r = sum_{i >= k-r} z_i``; then the value is
    ``sum_{i < k-r} z_i^2 + T_r^2 / (r+1)``. For ``k >= len(v)`` it is ``||v||_2^2``.
    """
    z = _sorted_desc(v)
    d = z.numel()
    if k >= d:
        return (z * z).sum()
    k = check_k(k, d, "the vector")
    tail = torch.flip(torch.cumsum(torch.flip(z, [0]), 0), [0])  # tail[j] = sum_{i >= j} z_i (0-based)
    head_sq = torch.cat([z.new_zeros(1), torch.cumsum(z * z, 0)])  # head_sq[j] = sum_{i < j} z_i^2
    j = torch.arange(k)  # j = k - r - 1, the 0-based index of z_{k-r}
    avg = tail[j] / (k - j).to(z.dtype)
    upper = torch.cat([z.new_full((1,), float("inf")), z[: k - 1]])
    ok = (upper > avg) & (avg >= z[j])
    # unique in exact arithmetic; under round-off take the first r (largest j) that holds
    jj = int(j[ok].max()) if bool(ok.any()) else 0
    return head_sq[jj] + tail[jj] ** 2 / (k - jj)


def kgroup_penalty(norms: Tensor, k: int) -> Tensor:
    """``P_k = 1/2 ||v||_{(k)}^2 - 1/2 ||v||^2`` of the group norms ``v``: >= 0, and 0 iff at most
    ``k`` groups are non-zero."""
    z = norms.double()
    return 0.5 * ksupport_norm_sq(z, k) - 0.5 * (z * z).sum()


def _solve_theta(p: Tensor, k: int, beta: float) -> Tensor:
    """``theta_i = clip(alpha p_i - beta, 0, 1)`` with ``sum theta = k`` (``p >= 0``, float64)."""
    pos = p > 0
    if int(pos.sum()) <= k:
        return pos.to(p.dtype)
    kth = torch.topk(p, k).values[-1]
    lo, hi = 0.0, float((1 + beta) / kth)  # g(lo) = 0 < k <= g(hi)

    def g(alpha: float) -> float:
        return float(torch.clamp(alpha * p - beta, 0, 1).sum())

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if g(mid) < k:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    # exact on the linear piece around the root: active (0 < theta < 1) and saturated (theta = 1)
    a = 0.5 * (lo + hi)
    raw = a * p - beta
    active = (raw > 0) & (raw < 1)
    sat = raw >= 1
    if bool(active.any()):
        a_exact = (k - int(sat.sum()) + beta * int(active.sum())) / float(p[active].sum())
        cand = torch.clamp(a_exact * p - beta, 0, 1)
        if abs(float(cand.sum()) - k) < 1e-9 * max(k, 1):
            return cand
    return torch.clamp(a * p - beta, 0, 1)


def kgroup_prox_norms(norms: Tensor, k: int, t: float) -> Tensor:
    """New group norms ``u = argmin_u 1/2 ||u - n||^2 + t P_k(u)`` for group norms ``n >= 0``.

    ``t >= 1``: the ``k`` largest norms kept, the rest zero. ``t < 1``: the exact convex prox (see
    the module docstring). Returns float64 norms of the same shape.
    """
    t = check_lambda(t, "prox step t")
    n = norms.double().reshape(-1)
    k = check_k(k, n.numel(), "the group norms")
    if t == 0 or k >= n.numel():
        return n.clone().reshape(norms.shape)
    if t >= 1:
        keep = torch.zeros_like(n, dtype=torch.bool)
        keep[torch.sort(n, descending=True, stable=True).indices[:k]] = True
        return (n * keep).reshape(norms.shape)
    beta = t / (1 - t)
    p = n / (1 - t)
    theta = _solve_theta(p, k, beta)
    u = p * theta / (theta + beta)
    return u.reshape(norms.shape)


def kgroup_prox(groups: Tensor, k: int, t: float) -> Tensor:
    """Prox of ``t * P_k`` on a ``[G, S]`` group view: every group rescaled to its new norm."""
    norms = groups.double().norm(dim=1)
    u = kgroup_prox_norms(norms, k, t)
    scale = torch.where(norms > 0, u / norms.clamp_min(1e-300), torch.zeros_like(u))
    return groups * scale.to(groups.dtype).reshape(-1, 1)
