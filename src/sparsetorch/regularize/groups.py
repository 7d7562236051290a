"""Groups: which entries of a weight are pushed to zero together.

A grouping views a weight as a ``[G, S]`` matrix (``G`` groups of ``S`` entries each) and back,
without copying where it can. Every regulariser and proximal operator in
:mod:`sparsetorch.regularize` works on that view, so "what is a group" and "how a group is pushed to
zero" stay orthogonal (the torchao ``prototype/pat`` idea).

Specs (strings, parsed by :func:`parse_grouping`):

* ``"element"`` (or ``"unstructured"``) - every weight its own group (``S = 1``; group lasso is L1);
* ``"row"`` / ``"out_channel"`` (``"channel"``) - one group per output row / filter ``W[o]``;
* ``"in_channel"`` (``"column"``) - one group per input channel ``W[:, i]`` (all kernel positions);
* ``"N:M"`` - groups of ``M`` consecutive inputs, exactly the groups of the ``N:M`` pattern
  (:mod:`sparsetorch.patterns`); e.g. ``"2:4"`` gives groups of 4;
* ``"blockHxW"`` - ``H x W`` tiles of the 2-D view ``[out, in*k*k]`` (the ``block`` pattern's tiles).

A grouping that does not tile a tensor raises :class:`~sparsetorch.errors.PatternError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PatternError
from ..patterns import NM, Block, _nm_groups, _nm_ungroup, parse_pattern

__all__ = ["Grouping", "parse_grouping", "GROUPINGS"]

GROUPINGS = ("element", "row", "out_channel", "in_channel", "N:M", "blockHxW")


@dataclass(frozen=True)
class Grouping:
    """How a weight splits into disjoint groups. ``kind`` is one of ``element``, ``row``,
    ``in_channel``, ``nm`` (groups of ``m`` consecutive inputs) or ``block`` (``h x w`` tiles)."""

    kind: str
    m: int = 0
    h: int = 0
    w: int = 0

    @property
    def name(self) -> str:
        if self.kind == "nm":
            return f"groups of {self.m} inputs"
        if self.kind == "block":
            return f"block{self.h}x{self.w}"
        return self.kind

    def check(self, shape: torch.Size | tuple[int, ...], param_name: str = "tensor") -> None:
        """Raise :class:`PatternError` when groups of this kind do not tile a tensor of ``shape``."""
        shape = tuple(shape)
        if self.kind in ("row", "in_channel") and len(shape) < 2:
            raise PatternError(
                f"{self.kind} groups need a weight with at least 2 dimensions, but {param_name} has shape "
                f"{shape}. Use groups='element' for vectors, or leave this tensor out of targets."
            )
        if self.kind == "nm":
            in_dim = shape[1] if len(shape) >= 2 else shape[0]
            if in_dim % self.m:
                raise PatternError(
                    f"groups of {self.m} consecutive inputs do not tile {param_name} of shape {shape} "
                    f"(input dimension {in_dim}). Pick an M that divides {in_dim}, or ignore this layer."
                )
        if self.kind == "block":
            Block(self.h, self.w).check_shape(shape, param_name)

    def n_groups(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Number of groups of a tensor of ``shape`` (after :meth:`check`)."""
        self.check(shape)
        numel = math.prod(shape)
        if self.kind == "element":
            return numel
        if self.kind == "row":
            return shape[0]
        if self.kind == "in_channel":
            return shape[1]
        if self.kind == "nm":
            return numel // self.m
        rows, cols = shape[0], numel // shape[0]
        return (rows // self.h) * (cols // self.w)

    def to_groups(self, t: Tensor) -> Tensor:
        """``[G, S]`` view (or copy) of ``t``: row ``g`` holds the entries of group ``g``."""
        self.check(t.shape)
        if self.kind == "element":
            return t.reshape(-1, 1)
        if self.kind == "row":
            return t.reshape(t.shape[0], -1)
        if self.kind == "in_channel":
            return t.transpose(0, 1).reshape(t.shape[1], -1)
        if self.kind == "nm":
            return _nm_groups(t, self.m).reshape(-1, self.m)
        r, c = t.shape[0], t.numel() // t.shape[0]
        tiles = t.reshape(r // self.h, self.h, c // self.w, self.w).permute(0, 2, 1, 3)
        return tiles.reshape(-1, self.h * self.w)

    def from_groups(self, g: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`to_groups`: a ``[G, S]`` tensor back to ``shape``."""
        shape = torch.Size(shape)
        if self.kind == "element":
            return g.reshape(shape)
        if self.kind == "row":
            return g.reshape(shape)
        if self.kind == "in_channel":
            perm_shape = (shape[1], shape[0], *shape[2:])
            return g.reshape(perm_shape).transpose(0, 1).contiguous()
        if self.kind == "nm":
            if len(shape) >= 2:
                lead = (shape[0], *shape[2:]) if len(shape) > 2 else (shape[0],)
                return _nm_ungroup(g.reshape(*lead, shape[1] // self.m, self.m), shape)
            return g.reshape(shape)
        r, c = shape[0], math.prod(shape) // shape[0]
        tiles = g.reshape(r // self.h, c // self.w, self.h, self.w).permute(0, 2, 1, 3)
        return tiles.reshape(shape)

    def norms(self, t: Tensor) -> Tensor:
        """The L2 norm of every group, shape ``[G]``."""
        return self.to_groups(t).float().norm(dim=1)

    def expand(self, per_group: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A per-group value ``[G]`` broadcast to every entry of a tensor of ``shape``."""
        size = math.prod(shape) // max(per_group.numel(), 1)
        return self.from_groups(per_group.reshape(-1, 1).expand(-1, size), shape)


def parse_grouping(spec: str | Grouping | None) -> Grouping:
    """Parse a group spec (see the module docstring); ``None`` means ``"element"``."""
    if spec is None:
        return Grouping("element")
    if isinstance(spec, Grouping):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"groups must be a string such as 'out_channel' or '2:4', got {spec!r}.")
    low = spec.strip().lower().replace("-", "_")
    if low in ("element", "unstructured", "weight", "elementwise"):
        return Grouping("element")
    if low in ("row", "rows", "out_channel", "out_channels", "channel", "channels", "filter", "filters"):
        return Grouping("row")
    if low in ("in_channel", "in_channels", "column", "columns", "input"):
        return Grouping("in_channel")
    try:
        pat = parse_pattern(spec)
    except PatternError:
        pat = None
    if isinstance(pat, NM):
        return Grouping("nm", m=pat.m)
    if isinstance(pat, Block):
        return Grouping("block", h=pat.h, w=pat.w)
    raise PatternError(
        f"cannot parse groups {spec!r}. Use one of: 'element', 'row' (= 'out_channel'), 'in_channel', "
        "'N:M' (groups of M consecutive inputs, e.g. '2:4'), 'blockHxW' (e.g. 'block4x4')."
    )
