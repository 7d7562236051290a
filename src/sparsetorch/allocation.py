"""Allocation: how one global sparsity splits across layers.

Every allocator is a pure function ``(params, sparsity, **options) -> {name: sparsity}`` over
the *targeted* weights only (no biases/norms), following ``../shared/ALGORITHMS.md`` section A.
Counts use ``floor(s * N)`` (see :func:`sparsetorch.patterns.n_pruned`) so allocation and mask
creation agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import AllocationError, MethodError, TargetError, check_sparsity, close_matches
from .patterns import n_pruned, topk_mask

Shapes = Mapping[str, Sequence[int] | torch.Size | Tensor]


def _shape(x: Sequence[int] | torch.Size | Tensor) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else tuple(int(d) for d in x)


def _check_names(names: Iterable[str], known: Mapping[str, object], what: str) -> set[str]:
    out = set(names)
    for n in out:
        if n not in known:
            raise TargetError(f"{what} names unknown layer {n!r}." + close_matches(n, known))
    return out


def mean_sparsity(params: Shapes, sparsities: Mapping[str, float]) -> float:
    """Parameter-weighted mean sparsity actually realised by ``floor`` counts."""
    total = zeros = 0
    for name, x in params.items():
        n = math.prod(_shape(x))
        total += n
        zeros += n_pruned(sparsities[name], n)
    return zeros / max(total, 1)


def uniform(params: Shapes, sparsity: float, *, dense: Iterable[str] = ()) -> dict[str, float]:
    """Every layer gets ``sparsity``; layers named in ``dense`` get 0 (RigL keeps the first dense)."""
    s = check_sparsity(sparsity)
    d = _check_names(dense, params, "dense")
    return {name: (0.0 if name in d else s) for name in params}


def erdos_renyi(
    params: Shapes,
    sparsity: float,
    *,
    kernel: bool = True,
    power_scale: float = 1.0,
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """ER / ERK densities ``d_l = eps * p_l`` with RigL's dense-layer redistribution.

    ERK: ``p_l = (sum(shape) / prod(shape)) ** power_scale`` over all dims; ER uses only the
    last two dims (conv kernel ignored, no power). ``eps`` is solved so the total number of
    non-zeros equals that of uniform ``sparsity``; any layer with ``eps * p_l > 1`` is made dense
    and ``eps`` is solved again. Layers in ``dense`` are dense from the start, and the other
    layers absorb their extra non-zeros, so the global sparsity is kept.
    """
    s = check_sparsity(sparsity)
    dense_set = _check_names(dense, params, "dense")
    shapes = {n: _shape(x) for n, x in params.items()}
    numel = {n: math.prod(sh) for n, sh in shapes.items()}
    raw: dict[str, float] = {}
    for n, sh in shapes.items():
        if kernel:
            raw[n] = (sum(sh) / math.prod(sh)) ** power_scale
        else:
            dims = sh[:2] if len(sh) >= 2 else (sh[0], 1)
            # ER on (out, in) channels, conv kernel dims ignored, as in RigL's
            # get_sparsities_erdos_renyi; PyTorch stores conv weights [out, in, kh, kw] (TF: [kh, kw, in, out])
            raw[n] = (dims[0] + dims[1]) / (dims[0] * dims[1]) if len(sh) >= 2 else 1.0
    if s == 0.0:
        return {n: 0.0 for n in params}
    while True:
        scaled = [n for n in params if n not in dense_set]
        if not scaled:
            raise AllocationError(
                f"ERK cannot reach sparsity {s}: every layer had to be made dense. "
                "Lower the sparsity or target more layers."
            )
        rhs = sum(numel[n] - n_pruned(s, numel[n]) for n in scaled) - sum(
            n_pruned(s, numel[n]) for n in dense_set
        )
        divisor = sum(raw[n] * numel[n] for n in scaled)
        if rhs <= 0 or divisor <= 0:
            raise AllocationError(
                f"ERK cannot reach sparsity {s} with dense layers {sorted(dense_set)}: they alone "
                "hold more non-zeros than the budget allows. Lower the sparsity or make fewer layers dense."
            )
        eps = rhs / divisor
        max_p = max(raw[n] for n in scaled)
        if eps * max_p > 1.0:
            dense_set |= {n for n in scaled if math.isclose(raw[n], max_p, rel_tol=1e-12)}
            continue
        break
    out = {}
    for n in params:
        out[n] = 0.0 if n in dense_set else min(max(1.0 - eps * raw[n], 0.0), 1.0 - 1e-12)
    return out


def erk(params: Shapes, sparsity: float, **kw: object) -> dict[str, float]:
    """Erdős–Rényi-Kernel allocation (RigL's default for sparse training)."""
    return erdos_renyi(params, sparsity, kernel=True, **kw)  # type: ignore[arg-type]


def er(params: Shapes, sparsity: float, **kw: object) -> dict[str, float]:
    """Erdős–Rényi allocation on the last two dims only."""
    kw.pop("power_scale", None)
    return erdos_renyi(params, sparsity, kernel=False, **kw)  # type: ignore[arg-type]


def global_magnitude(
    params: Mapping[str, Tensor],
    sparsity: float,
    *,
    scores: Mapping[str, Tensor] | None = None,
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """One threshold over all targeted weights: keep the top ``N - floor(s*N)`` scores globally.

    ``scores`` defaults to ``|W|``. Returns each layer's resulting sparsity (count / numel), so
    an unstructured mask at that sparsity reproduces the global selection's counts exactly.
    """
    s = check_sparsity(sparsity)
    dense_set = _check_names(dense, params, "dense")
    names = [n for n in params if n not in dense_set]
    if not names:
        raise AllocationError("global allocation has no layers left after 'dense'.")
    flat = [
        (scores[n] if scores is not None else params[n].detach().abs()).reshape(-1).float().cpu()
        for n in names
    ]
    sizes = [f.numel() for f in flat]
    total_all = sum(math.prod(_shape(params[n])) for n in params)
    # zeros are taken from the non-dense layers only; the global target counts all layers
    zeros_needed = n_pruned(s, total_all)
    pool = sum(sizes)
    if pool - zeros_needed < len(names):
        raise AllocationError(
            f"global allocation at sparsity {s} would leave fewer kept weights ({pool - zeros_needed}) than "
            f"layers ({len(names)}); lower the sparsity or make fewer layers dense."
        )
    # every layer keeps at least its best weight (a sparsity < 1 never empties a layer, and a
    # layer sparsity of 1.0 would not be a valid mask request): its top score is ranked first
    allf = torch.cat(flat)  # a copy: the caller's scores are not modified
    offset = 0
    for f in flat:
        if f.numel():
            allf[offset + int(torch.argmax(torch.nan_to_num(f, nan=float("-inf"))))] = float("inf")
        offset += f.numel()
    keep = topk_mask(allf, pool - zeros_needed)
    out = {n: 0.0 for n in dense_set}
    for n, part in zip(names, torch.split(keep, sizes)):
        z = part.numel() - int(part.sum())
        out[n] = z / part.numel()
    return {n: out[n] for n in params}


def owl(
    outlier_ratios: Mapping[str, float] | Sequence[float],
    sparsity: float,
    *,
    lam: float = 0.08,
) -> dict[str, float] | list[float]:
    """OWL (Yin et al. 2024): per-block sparsity from layer outlier ratios ``D_l`` (percent).

    ``r_l = (D_l - min D) / (max D - min D) * 2*lam``; density ``d_l = r_l - mean(r) + (1 - s)``;
    a higher outlier ratio gets a lower sparsity. The mean sparsity over blocks equals ``s``
    (before clipping). As in the reference (``lib/prune_all.py``), a block sparsity ``<= 0`` is
    set to 0.01; values are capped at 0.99.
    """
    s = check_sparsity(sparsity)
    if lam < 0:
        raise AllocationError(f"OWL lambda must be >= 0, got {lam}.")
    keys = list(outlier_ratios) if isinstance(outlier_ratios, Mapping) else None
    vals = [float(outlier_ratios[k]) for k in keys] if keys else [float(v) for v in outlier_ratios]
    if not vals:
        raise AllocationError("OWL needs at least one block's outlier ratio.")
    lo, hi = min(vals), max(vals)
    span = hi - lo
    r = [((v - lo) / span * 2 * lam) if span > 0 else 0.0 for v in vals]
    mr = sum(r) / len(r)
    sp = [1.0 - (ri - mr + (1.0 - s)) for ri in r]
    sp = [0.01 if v <= 0 else min(v, 0.99) for v in sp]
    return dict(zip(keys, sp)) if keys else sp


def outlier_ratio(scores: Tensor, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: percent of scores above ``m`` times their mean."""
    f = scores.reshape(-1).float()
    return float((f > m * f.mean()).float().mean() * 100.0)


ALLOCATIONS: dict[str, Callable[..., dict[str, float]]] = {
    "uniform": uniform,
    "er": er,
    "erk": erk,
    "global": global_magnitude,
}


def allocate(method: str, params: Mapping[str, Tensor], sparsity: float, **kw: object) -> dict[str, float]:
    """Dispatch to a registered allocator by name (``uniform``, ``er``, ``erk``, ``global``)."""
    try:
        fn = ALLOCATIONS[method.lower()]
    except KeyError:
        raise MethodError(
            f"unknown allocation {method!r}; available: {', '.join(ALLOCATIONS)}."
            + close_matches(method, ALLOCATIONS)
        ) from None
    return fn(params, sparsity, **kw)
