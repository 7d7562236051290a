"""Sparsity patterns: which shapes a mask may take.

Every pattern turns a score tensor (same shape as the weight; higher = more important) and a
sparsity into a boolean mask (True = keep) with an exact, deterministic count:

* ``unstructured`` - keep the ``numel - floor(s * numel)`` highest scores of the tensor.
* ``rowwise`` - the same inside every output row (the comparison group of Wanda/DSnoT).
* ``N:M`` - keep exactly N of every M consecutive weights along the input dimension
  (``"2:4"`` = 2 kept of 4; conv weights are grouped along ``c_in`` for each kernel position).
* ``blockHxW`` - prune whole H x W tiles of the 2-D weight (conv flattened to ``[out, -1]``).
* ``channel`` - prune whole output rows (structured pruning of output channels/neurons).

Ties are broken deterministically: among equal scores the lower flat index is kept.
"""

from __future__ import annotations

import math
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PatternError, check_sparsity

__all__ = [
    "Pattern",
    "Unstructured",
    "RowWise",
    "NM",
    "Block",
    "Channel",
    "parse_pattern",
    "topk_mask",
    "n_pruned",
]


def topk_mask(scores: Tensor, keep: int, dim: int = -1) -> Tensor:
    """Bool mask keeping the ``keep`` highest scores along ``dim`` (stable: lower index wins ties)."""
    n = scores.shape[dim]
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep <= 0:
        return mask
    s = scores.float()
    s = torch.nan_to_num(s, nan=float("-inf"))
    order = torch.sort(s, dim=dim, descending=True, stable=True).indices
    idx = order.narrow(dim, 0, keep)
    mask.scatter_(dim, idx, True)
    return mask


#: relative slack for float round-off in ``s * n``: a few ulps, so 0.29 * 100 (= 28.999999999999996)
#: counts 29 zeros, while 0.9999999999 * 1000 still counts 999 (the old absolute ``1e-9 * n``
#: slack rounded such a request up to every weight)
_ROUNDOFF = 8 * sys.float_info.epsilon


def n_pruned(sparsity: float, numel: int) -> int:
    """Number of zeros for a sparsity: ``floor(s * n)``, never more than the request.

    Robust to float round-off only (``0.29 * 100 -> 29``, a relative slack of a few ulps), and a
    sparsity below 1 never prunes a whole group: the count is at most ``n - 1``. Every pattern,
    allocator and solver counts zeros through this one function, so they agree exactly.
    """
    n = int(numel)
    if n <= 0 or sparsity <= 0:
        return 0
    k = int(math.floor(sparsity * n * (1.0 + _ROUNDOFF)))
    return min(k, n if sparsity >= 1 else n - 1)


#: largest N:M group accepted: beyond this a "group" is no longer a local structure any kernel
#: uses, and the numbers are almost surely a typo (blocks are bounded by the weight's shape)
MAX_GROUP = 1024


def _to_2d(t: Tensor) -> Tensor:
    """View a weight as [out, in*...]: Linear stays, conv [o, i, k...] becomes [o, i*k...]."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


class Pattern(ABC):
    """A family of allowed mask shapes."""

    #: canonical name, parseable by :func:`parse_pattern`
    name: str = "pattern"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern implies (N:M), or None when any sparsity is allowed."""
        return None

    def check_shape(self, shape: torch.Size | tuple[int, ...], param_name: str = "tensor") -> None:
        """Raise PatternError if a weight of this shape cannot take the pattern."""

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """Return the sparsity to use, checking it agrees with a fixed-sparsity pattern."""
        fixed = self.fixed_sparsity
        if sparsity is None:
            if fixed is None:
                raise PatternError(f"pattern '{self}' needs a sparsity; pass sparsity=0.5 etc.")
            return fixed
        s = check_sparsity(sparsity)
        if fixed is not None and not math.isclose(s, fixed, abs_tol=1e-6):
            raise PatternError(
                f"pattern '{self}' fixes sparsity at {fixed:g} but sparsity={s:g} was requested; "
                f"pass sparsity={fixed:g} (or None), or choose another N:M."
            )
        return s

    def mask(self, scores: Tensor, sparsity: float | None = None) -> Tensor:
        """Bool mask (True = keep) with exactly the pattern's count of pruned weights."""
        s = self.resolve_sparsity(sparsity)
        self.check_shape(scores.shape)
        return self._mask(scores.detach(), s)

    @abstractmethod
    def _mask(self, scores: Tensor, sparsity: float) -> Tensor: ...

    def violation(self, mask: Tensor) -> str | None:
        """Describe the first place where ``mask`` (True = may be non-zero) breaks the pattern."""
        return None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Unstructured(Pattern):
    """Any weights of the tensor; one threshold over the whole tensor."""

    name = "unstructured"

    def _mask(self, scores: Tensor, sparsity: float) -> Tensor:
        n = scores.numel()
        keep = n - n_pruned(sparsity, n)
        return topk_mask(scores.reshape(-1), keep).reshape(scores.shape)


class RowWise(Pattern):
    """Unstructured inside each output row: every row gets exactly ``floor(s * cols)`` zeros."""

    name = "rowwise"

    def _mask(self, scores: Tensor, sparsity: float) -> Tensor:
        s2 = _to_2d(scores)
        cols = s2.shape[1]
        keep = cols - n_pruned(sparsity, cols)
        return topk_mask(s2, keep, dim=1).reshape(scores.shape)


def _nm_groups(t: Tensor, m: int) -> Tensor:
    """Reshape to [..., m] groups of m consecutive elements along the input dim.

    Linear [out, in] -> [out, in/m, m]; conv [out, in, *k] -> [out, *k, in/m, m] (grouped along c_in).
    """
    if t.dim() == 2:
        return t.reshape(t.shape[0], t.shape[1] // m, m)
    if t.dim() > 2:
        perm = (0, *range(2, t.dim()), 1)
        tp = t.permute(perm)
        return tp.reshape(*tp.shape[:-1], tp.shape[-1] // m, m)
    return t.reshape(-1, m)


def _nm_ungroup(g: Tensor, shape: torch.Size) -> Tensor:
    if len(shape) == 2:
        return g.reshape(shape)
    if len(shape) > 2:
        permuted_shape = (shape[0], *shape[2:], shape[1])
        tp = g.reshape(permuted_shape)
        inv = (0, tp.dim() - 1, *range(1, tp.dim() - 1))
        return tp.permute(inv).contiguous()
    return g.reshape(shape)


@dataclass(frozen=True, eq=False)
class NM(Pattern):
    """N kept out of every M consecutive weights along the input dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not (0 < self.n < self.m):
            raise PatternError(
                f"N:M needs integers 0 < N < M (N = weights kept per group of M), got {self.n}:{self.m}."
            )
        if self.m > MAX_GROUP:
            raise PatternError(
                f"N:M groups of M={self.m} inputs are larger than any supported group (M <= {MAX_GROUP}); "
                "use a small M such as 2:4, 4:8 or 8:16."
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_shape(self, shape, param_name: str = "tensor") -> None:
        in_dim = shape[1] if len(shape) >= 2 else shape[0]
        if in_dim % self.m != 0:
            raise PatternError(
                f"{self.name} sparsity groups {self.m} consecutive inputs, but {param_name} of shape "
                f"{tuple(shape)} has input dimension {in_dim}, not a multiple of {self.m}. "
                f"Exclude this layer with ignore=[...] or use an M that divides {in_dim}."
            )

    def _mask(self, scores: Tensor, sparsity: float) -> Tensor:
        g = _nm_groups(scores, self.m)
        mg = topk_mask(g, self.n, dim=-1)
        return _nm_ungroup(mg, scores.shape)

    def violation(self, mask: Tensor) -> str | None:
        try:
            self.check_shape(mask.shape)
        except PatternError as exc:
            return str(exc)
        counts = _nm_groups(mask.to(torch.int32), self.m).sum(-1)
        bad = torch.nonzero(counts > self.n)
        if bad.numel() == 0:
            return None
        pos = tuple(bad[0].tolist())
        return f"group {pos} has {int(counts[pos])} non-zeros, more than {self.n} of {self.m}"


@dataclass(frozen=True, eq=False)
class Block(Pattern):
    """Whole ``h x w`` tiles of the 2-D weight (conv flattened to ``[out, in*k*k]``)."""

    h: int
    w: int

    def __post_init__(self) -> None:
        if self.h < 1 or self.w < 1:
            raise PatternError(f"block size must be positive, got {self.h}x{self.w}.")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block{self.h}x{self.w}"

    def check_shape(self, shape, param_name: str = "tensor") -> None:
        rows = shape[0]
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        if rows % self.h or cols % self.w:
            raise PatternError(
                f"{self.name} needs the weight's 2-D view to be divisible by {self.h}x{self.w}, but "
                f"{param_name} is {rows}x{cols}. Pick a block size dividing both, or ignore this layer."
            )

    def _tiles(self, t2: Tensor) -> Tensor:
        r, c = t2.shape
        return t2.reshape(r // self.h, self.h, c // self.w, self.w).permute(0, 2, 1, 3)

    def _mask(self, scores: Tensor, sparsity: float) -> Tensor:
        s2 = _to_2d(scores).float()
        tiles = self._tiles(s2).sum(dim=(-1, -2))  # [R, C] block scores
        n = tiles.numel()
        keep = n - n_pruned(sparsity, n)
        bm = topk_mask(tiles.reshape(-1), keep).reshape(tiles.shape)
        full = bm.repeat_interleave(self.h, 0).repeat_interleave(self.w, 1)
        return full.reshape(scores.shape)

    def violation(self, mask: Tensor) -> str | None:
        try:
            self.check_shape(mask.shape)
        except PatternError as exc:
            return str(exc)
        t = self._tiles(_to_2d(mask).to(torch.int32)).sum(dim=(-1, -2))
        bad = torch.nonzero((t != 0) & (t != self.h * self.w))
        if bad.numel() == 0:
            return None
        pos = tuple(bad[0].tolist())
        return f"block {pos} is partly pruned ({int(t[pos])} of {self.h * self.w} kept)"


class Channel(Pattern):
    """Whole output rows (output channels / neurons); row score = sum of its scores."""

    name = "channel"

    def _mask(self, scores: Tensor, sparsity: float) -> Tensor:
        s2 = _to_2d(scores).float()
        rows = s2.shape[0]
        keep = rows - n_pruned(sparsity, rows)
        rm = topk_mask(s2.sum(1), keep)
        return rm.view(-1, *([1] * (scores.dim() - 1))).expand(scores.shape).clone()

    def violation(self, mask: Tensor) -> str | None:
        m2 = _to_2d(mask)
        kept = m2.sum(1)
        bad = torch.nonzero((kept != 0) & (kept != m2.shape[1]))
        if bad.numel() == 0:
            return None
        r = int(bad[0])
        return f"output row {r} is partly pruned ({int(kept[r])} of {m2.shape[1]} kept)"


# at most 9 digits: int() of a longer string is slow or raises a plain ValueError
_NM_RE = re.compile(r"^\s*(\d{1,9})\s*:\s*(\d{1,9})\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*(\d{1,9})\s*x\s*(\d{1,9})\s*$", re.IGNORECASE)


def parse_pattern(spec: str | Pattern | None) -> Pattern:
    """Parse ``"unstructured"``, ``"rowwise"``, ``"2:4"``, ``"block4x4"``, ``"channel"``."""
    if spec is None:
        return Unstructured()
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"pattern must be a string like '2:4' or 'unstructured', got {spec!r}.")
    low = spec.strip().lower()
    if low in ("unstructured", "dense_unstructured", "layer"):
        return Unstructured()
    if low in ("rowwise", "row", "per-row", "per_row"):
        return RowWise()
    if low in ("channel", "channels", "row_structured", "structured"):
        return Channel()
    m = _NM_RE.match(low)
    if m:
        return NM(int(m.group(1)), int(m.group(2)))
    m = _BLOCK_RE.match(low)
    if m:
        return Block(int(m.group(1)), int(m.group(2)))
    raise PatternError(
        f"cannot parse sparsity pattern {spec!r}. Use one of: 'unstructured', 'rowwise', "
        "'N:M' with N kept of M (e.g. '2:4', '4:8', '1:4'), 'blockHxW' (e.g. 'block4x4'), 'channel'."
    )
