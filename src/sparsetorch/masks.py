"""MaskSet: the masks of a sparse model, by parameter name.

A sparse model is a dense model plus a MaskSet. ``True`` in a mask means the weight may be
non-zero (kept); ``False`` means it is pruned and must stay exactly zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import CheckpointError, MaskError, PatternError, TargetError, close_matches
from .patterns import Pattern, Unstructured, parse_pattern

FORMAT_VERSION = 1


@dataclass
class SparsityStats:
    """Zeros per layer and overall, as counted from masks (or from weights)."""

    per_layer: dict[str, float]
    zeros: dict[str, int]
    numel: dict[str, int]
    overall: float = field(init=False)

    def __post_init__(self) -> None:
        total = sum(self.numel.values())
        self.overall = sum(self.zeros.values()) / total if total else 0.0


def _is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a mask or weight sharded by FSDP2)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def _whole(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (collective), else ``t``."""
    return t.full_tensor() if _is_sharded(t) else t


def _place_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (a whole tensor, the same on every rank) placed like ``p``: a DTensor on p's mesh
    with p's placements when p is sharded (collective), else ``t`` itself."""
    if _is_sharded(t) or not _is_sharded(p):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(p.to_local().device), p.device_mesh, p.placements)


class MaskSet:
    """Boolean masks keyed by parameter name, each with the pattern it must satisfy."""

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        patterns: Mapping[str, Pattern | str] | Pattern | str | None = None,
    ) -> None:
        self.masks: dict[str, Tensor] = {}
        self.patterns: dict[str, Pattern] = {}
        for name, m in masks.items():
            if not isinstance(m, Tensor):
                raise MaskError(f"mask for {name!r} must be a tensor, got {type(m).__name__}.")
            self.masks[name] = m.detach().to(torch.bool)
        for name in self.masks:
            if isinstance(patterns, Mapping):
                p = patterns.get(name)
            else:
                p = patterns
            self.patterns[name] = parse_pattern(p) if p is not None else Unstructured()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pruned: dict[str, Tensor] = {}
        self._enforced: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, Tensor],
        sparsities: Mapping[str, float] | float,
        pattern: Pattern | str | Mapping[str, Pattern | str] | None = None,
    ) -> MaskSet:
        """Build masks from scores (higher = keep) at per-layer sparsities with a pattern."""
        masks, pats = {}, {}
        for name, sc in scores.items():
            p = parse_pattern(pattern.get(name) if isinstance(pattern, Mapping) else pattern)
            s = sparsities[name] if isinstance(sparsities, Mapping) else sparsities
            p.check_shape(sc.shape, name)
            masks[name] = p.mask(sc, s)
            pats[name] = p
        return cls(masks, pats)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        pattern: Pattern | str | Mapping[str, Pattern | str] | None = None,
    ) -> MaskSet:
        """Recover masks from the zeros of a model's targeted weights (``mask = weight != 0``)."""
        from .targets import select

        params = select(model, targets, ignore)
        return cls({n: p.detach() != 0 for n, p in params.items()}, pattern)

    # ------------------------------------------------------------------ container
    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.masks[name]
        except KeyError:
            raise TargetError(f"no mask for {name!r}." + close_matches(name, self.masks)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def names(self) -> list[str]:
        return list(self.masks)

    def items(self):
        return self.masks.items()

    def set(self, name: str, mask: Tensor) -> None:
        """Replace one mask (same shape), e.g. after a dynamic-sparse-training update."""
        old = self[name]
        if tuple(mask.shape) != tuple(old.shape):
            raise MaskError(f"new mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(old.shape)}.")
        self.masks[name] = mask.detach().to(torch.bool).to(old.device)
        if name in self._pruned:
            self._pruned[name] = ~self.masks[name]

    # ------------------------------------------------------------------ model interaction
    def _params(self, model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
        params = dict(model) if isinstance(model, Mapping) else dict(model.named_parameters())
        out = {}
        for name, m in self.masks.items():
            p = params.get(name)
            if p is None and not isinstance(model, Mapping):
                # a weight under torch.nn.utils.parametrize (e.g. learned gates) is still that weight
                mod, _, attr = name.rpartition(".")
                p = params.get(f"{mod}.parametrizations.{attr}.original" if mod else f"parametrizations.{attr}.original")
            if p is None:
                raise MaskError(
                    f"mask {name!r} names no parameter of {'the tensors' if isinstance(model, Mapping) else type(model).__name__}."
                    + close_matches(name, params)
                    + " The masks were made for a different model."
                )
            if tuple(p.shape) != tuple(m.shape):
                raise MaskError(
                    f"mask {name!r} has shape {tuple(m.shape)} but the parameter has shape "
                    f"{tuple(p.shape)}. The masks were made for a different model."
                )
            out[name] = p
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> MaskSet:
        """Zero every pruned weight of ``model`` in place."""
        for name, p in self._params(model).items():
            m = self.masks[name]
            if m.device != p.device:
                m = self.masks[name] = m.to(p.device)
            p.masked_fill_(~m, 0)
        return self

    def enforce(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MaskSet:
        """Keep pruned weights at exactly zero through training.

        Zeros the weights now, masks each gradient after it is accumulated (so momentum and
        Adam moments of pruned weights receive nothing), and re-zeros pruned weights after
        every ``optimizer.step()`` (weight decay, momentum and Adam's eps otherwise move them).
        Call :meth:`release` to remove the hooks.
        """
        self.release()
        params = self._params(model)
        self.apply(model)
        self._pruned = {n: ~self.masks[n] for n in params}
        self._enforced = params

        for name, p in params.items():
            if not p.requires_grad:
                continue

            def grad_hook(param: Tensor, _name: str = name) -> None:
                if param.grad is not None:
                    param.grad.masked_fill_(self._pruned[_name], 0)

            self._hooks.append(p.register_post_accumulate_grad_hook(grad_hook))

        if optimizer is not None:

            def post_step(_opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
                self.rezero()

            self._hooks.append(optimizer.register_step_post_hook(post_step))
        return self

    @torch.no_grad()
    def rezero(self) -> None:
        """Re-zero pruned weights of the model passed to :meth:`enforce`."""
        for name, p in self._enforced.items():
            p.masked_fill_(self._pruned[name], 0)

    def release(self) -> None:
        """Remove the hooks installed by :meth:`enforce` (masks and weights are unchanged)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._enforced = {}

    # ------------------------------------------------------------------ reporting
    def sparsity(self) -> SparsityStats:
        """Fraction of pruned entries per layer and overall, from the masks (whole tensors, also
        for masks sharded across ranks as DTensors: every rank gets the same numbers)."""
        zeros = {n: int((~_whole(m)).sum()) for n, m in self.masks.items()}
        numel = {n: m.numel() for n, m in self.masks.items()}
        return SparsityStats({n: zeros[n] / max(numel[n], 1) for n in zeros}, zeros, numel)

    @torch.no_grad()
    def verify(self, model: nn.Module | Mapping[str, Tensor]) -> None:
        """Check that every pruned weight is exactly zero and every mask obeys its pattern.

        The stored mask is the truth: a kept weight may be exactly zero (a kept row of a
        channel mask, a kept tile of a block mask), so the pattern is checked on the mask
        only. Since every non-zero weight lies inside the mask, the weights then obey the
        pattern too (all patterns are closed under removing kept entries, as sparse kernels
        need). ``model`` may also be a ``{name: tensor}`` mapping (a loaded state dict), so a
        saved folder is verified without rebuilding a module from its key names.
        Raises :class:`MaskError` naming the first offending tensor and position.
        """
        for name, p in self._params(model).items():
            p, m = _whole(p), _whole(self.masks[name])  # sharded (FSDP2): check the whole tensor
            m = m.to(p.device)
            bad = (p != 0) & ~m
            if bool(bad.any()):
                pos = tuple(torch.nonzero(bad)[0].tolist())
                raise MaskError(
                    f"{name}: weight at position {pos} is {float(p[pos]):.6g} but its mask says pruned "
                    f"({int(bad.sum())} such weights). Something changed pruned weights after masking: "
                    "call masks.apply(model), or masks.enforce(model, optimizer) while training."
                )
            problem = self.patterns[name].violation(m)
            if problem:
                raise MaskError(f"{name}: mask breaks pattern {self.patterns[name]}: {problem}.")

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """Masks (bool tensors on CPU) and pattern names; plain data, no pickled objects."""
        return {
            "version": FORMAT_VERSION,
            "masks": {n: _whole(m).cpu().clone() for n, m in self.masks.items()},
            "patterns": {n: str(p) for n, p in self.patterns.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace the masks with those of :meth:`state_dict` output."""
        try:
            masks = state["masks"]
            patterns = state.get("patterns", {})  # type: ignore[union-attr]
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError("mask state is missing 'masks'; was it made by MaskSet.state_dict()?") from exc
        fresh = MaskSet(masks, patterns)  # type: ignore[arg-type]
        self.release()
        self.masks, self.patterns = fresh.masks, fresh.patterns

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write masks to a safetensors file atomically (bool tensors + JSON metadata)."""
        from safetensors.torch import save_file

        meta = {"sparsetorch_masks": json.dumps({"version": FORMAT_VERSION, "patterns": {n: str(p) for n, p in self.patterns.items()}})}
        tensors = {n: _whole(m).cpu().contiguous() for n, m in self.masks.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskSet:
        """Read masks written by :meth:`save`; corrupt files raise :class:`CheckpointError`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sparsetorch_masks"])
                masks = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise CheckpointError(f"mask file {path} does not exist.") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
            raise CheckpointError(f"mask file {path} is corrupt or not a sparsetorch mask file: {exc}") from exc
        patterns = _check_mask_metadata(meta, path)
        for n, m in masks.items():
            if m.dtype != torch.bool:
                raise CheckpointError(f"mask {n!r} in {path} has dtype {m.dtype}, expected bool.")
        unknown = sorted(set(patterns) - set(masks))
        if unknown:
            raise CheckpointError(f"mask file {path} names patterns for tensors it does not hold: {unknown[:3]}.")
        try:
            return cls(masks, patterns)
        except PatternError as exc:
            raise CheckpointError(f"mask file {path} has an invalid pattern: {exc}") from None

    def __repr__(self) -> str:
        st = self.sparsity()
        return f"MaskSet({len(self)} tensors, sparsity={st.overall:.4f})"


def _check_mask_metadata(meta: object, path: str | os.PathLike[str]) -> dict[str, str]:
    """Validate the JSON metadata of a mask file; return its ``{name: pattern}`` map.

    Every malformed field (not an object, a non-integer or future version, patterns that are
    not a name -> string map) is a :class:`CheckpointError` that names the file.
    """
    where = f"mask file {path}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata 'sparsetorch_masks' must be a JSON object, got {type(meta).__name__}; re-save it with MaskSet.save.")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{where}: 'version' must be a non-negative integer, got {version!r}; re-save it with MaskSet.save.")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} has version {version}, newer than this sparsetorch reads ({FORMAT_VERSION}); upgrade sparsetorch.")
    patterns = meta.get("patterns", {})
    if not isinstance(patterns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in patterns.items()):
        raise CheckpointError(f"{where}: 'patterns' must map tensor names to pattern strings; re-save it with MaskSet.save.")
    return patterns
