"""Sparse LoRA: ``peft`` LoRA adapters on a pruned model, merged without losing sparsity.

A plain LoRA merge ``W + s·BA`` is dense: it refills every pruned weight. Masking the delta only
at merge time changes the function the adapter was trained as. So, as SQFT's SparsePEFT, the
adapter trains with the *masked* delta in the forward,

    y = x (W + M ⊙ s·BA)ᵀ + b,

where ``M`` is the stored mask of ``W`` (the :class:`~sparsetorch.MaskSet`, never ``W != 0``
re-derived). The merge ``W' = W + M ⊙ s·BA`` is then exactly the trained function and has
exactly the parent's zeros (2:4 stays 2:4).

The mechanism is peft's own: :class:`SparseLoraLinear` is a subclass of peft's LoRA ``Linear``
whose :meth:`~SparseLoraLinear.get_delta_weight` returns the masked delta and whose forward
computes with it; it is registered through ``LoraConfig._register_custom_module`` (peft's
documented hook for custom LoRA layers), so peft's ``merge_and_unload`` performs the masked
merge. The mask rides on each layer as a non-persistent buffer: it is in no ``state_dict`` and
is gone with the adapter layer after the merge.

* :func:`add_sparse_lora` -- wrap a pruned model (``get_peft_model``); only adapters train.
* :func:`peft_masks` -- the MaskSet under the peft model's parameter names (for
  :func:`~sparsetorch.finetune.train_masked`); the one place where names are mapped.
* :func:`merge_masked` -- merge, unload and verify: a plain model with the parent's masks.
* :func:`merge_naive` -- the route masking avoids, for comparison: dense merge, then re-prune
  each tensor to its pattern and sparsity by magnitude (a new MaskSet, a changed function).

Cost: one dense ``out x in`` delta per adapted layer per step (SQFT's cost too); in eval mode
and without dropout the layer runs a single matmul with ``W + M ⊙ s·BA``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MaskError, require
from ..masks import MaskSet
from .loop import FinetuneError

# ``SparseLoraLinear`` is also importable from here; it is built on first use, since importing
# peft takes seconds and LoraSettings alone must not need it
__all__ = ["LoraError", "LoraSettings", "add_sparse_lora", "merge_masked",
           "merge_naive", "peft_masks", "lora_layers", "base_name", "resolve_targets", "unload_unmerged",
           "lora_masks_from_checkpoint"]

#: the prefix peft puts before the wrapped model's parameter names (``PeftModel.base_model.model``)
_PEFT_PREFIX = "base_model.model."
#: the attribute of the PeftModel that holds this module's bookkeeping (not a module, not a tensor)
_STATE_ATTR = "_sparsetorch_lora"


class LoraError(FinetuneError):
    """Sparse-LoRA settings or a model/masks combination that cannot work (the message says what
    to do)."""


def _peft() -> Any:
    require("peft", "llm")
    import peft

    return peft


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LoraSettings:
    """What adapters :func:`add_sparse_lora` adds; ``finetune(lora=...)`` takes one of these, a
    rank (``int``) or a dict of these fields.

    ``alpha=None`` means ``2 * r`` (SQFT's default, scaling ``s = alpha / r = 2``).
    ``target_modules=None`` adapts every ``nn.Linear`` whose weight has a mask; a sequence names
    modules by exact name or suffix (``["q_proj", "v_proj"]``, peft's rule); a string is a regular
    expression that must match the whole module name (peft's rule too). ``dropout`` acts on the
    adapter path only (peft's semantics; SQFT drops the input of the merged matmul instead).
    """

    r: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraError(f"the LoRA rank r must be a positive integer, got {self.r!r} (e.g. r=16; "
                            "use lora=None for full fine-tuning)")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0 or self.alpha != self.alpha
                                       or self.alpha == float("inf")):
            raise LoraError(f"LoRA alpha must be a finite number > 0 (or None for 2*r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        t = self.target_modules
        if isinstance(t, str):
            if not t:
                raise LoraError("target_modules is an empty string; pass None (every masked nn.Linear), a list "
                                "of module names or suffixes, or a regular expression")
            try:
                re.compile(t)
            except re.error as exc:
                raise LoraError(f"target_modules {t!r} is not a valid regular expression ({exc})") from None
        elif t is not None:
            if not isinstance(t, Sequence) or not t or not all(isinstance(x, str) and x for x in t):
                raise LoraError(f"target_modules must be None, a regular expression or a non-empty list of module "
                                f"names, got {t!r}")
            object.__setattr__(self, "target_modules", tuple(t))

    @property
    def lora_alpha(self) -> float:
        """The effective alpha (``2 * r`` when ``alpha`` is None)."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    @property
    def scaling(self) -> float:
        """``s = alpha / r``, the factor of ``BA`` in the delta."""
        return self.lora_alpha / self.r

    @classmethod
    def parse(cls, lora: LoraSettings | int | Mapping[str, Any] | None) -> LoraSettings | None:
        """``None`` -> None (full fine-tuning); an int -> that rank; a dict -> these fields."""
        if lora is None or isinstance(lora, LoraSettings):
            return lora
        if isinstance(lora, bool):
            raise LoraError(f"lora must be None, a rank (int), a dict or a LoraSettings, got {lora!r}")
        if isinstance(lora, int):
            return cls(r=lora)
        if isinstance(lora, Mapping):
            unknown = sorted(set(lora) - {"r", "alpha", "dropout", "target_modules"})
            if unknown:
                raise LoraError(f"unknown LoRA setting(s) {unknown}; known: r, alpha, dropout, target_modules")
            return cls(**lora)
        raise LoraError(f"lora must be None, a rank (int), a dict or a LoraSettings, got {type(lora).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: the settings with alpha resolved (what a run record or checkpoint keeps)."""
        t = self.target_modules
        return {"kind": "sparse-lora", "r": self.r, "alpha": self.lora_alpha, "dropout": float(self.dropout),
                "target_modules": list(t) if isinstance(t, tuple) else t}


# ---------------------------------------------------------------------------------------- the layer
def _lora_linear_cls() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _make_layer_cls() -> type:
    base: type = _lora_linear_cls()

    class SparseLoraLinear(base):  # type: ignore[misc, valid-type]
        """peft's LoRA ``Linear`` with the delta masked by the base weight's stored mask.

        ``get_delta_weight`` returns ``M ⊙ s·BA`` (so peft's ``merge``/``unmerge`` are masked) and
        the forward computes ``x (W + M ⊙ s·BA)ᵀ + b`` -- exactly what the merged layer computes.
        ``sparse_mask`` is a non-persistent bool buffer in the base weight's layout (``None``:
        the layer has no mask, the delta is dense).
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
            self.register_buffer("sparse_mask", None, persistent=False)

        def set_sparse_mask(self, mask: Tensor | None) -> None:
            """Attach the stored mask of the base weight (True = kept), or None for a dense delta."""
            w = self.get_base_layer().weight
            if mask is not None:
                if tuple(mask.shape) != tuple(w.shape):
                    raise MaskError(f"mask of shape {tuple(mask.shape)} does not fit a weight of shape "
                                    f"{tuple(w.shape)}; the masks were made for a different model")
                mask = mask.detach().to(device=w.device, dtype=torch.bool)
            self.sparse_mask = mask

        def get_delta_weight(self, adapter: str) -> Tensor:
            """``M ⊙ s·BA`` for ``adapter`` (peft's dense delta with pruned entries set to 0)."""
            delta = super().get_delta_weight(adapter)
            m = self.sparse_mask
            if m is None:
                return delta
            return torch.where(m.to(delta.device), delta, delta.new_zeros(()))

        def _active(self) -> list[str]:
            return [a for a in self.active_adapters if a in self.lora_A]

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if kwargs.get("adapter_names") is not None:
                raise LoraError("sparse LoRA layers do not support adapter_names= (mixed-adapter batches); "
                                "set the adapter with set_adapter() instead")
            kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            active = self._active()
            if self.merged or not active:
                return self.base_layer(x, *args, **kwargs)
            base = self.get_base_layer()
            w = base.weight
            split = self.training and any(not isinstance(self.lora_dropout[a], nn.Identity) for a in active)
            if split:
                # dropout acts on the adapter path only (peft's semantics): base(x) + drop(x) Δᵀ
                result = self.base_layer(x, *args, **kwargs)
                out_dtype = result.dtype
                for a in active:
                    d = self.get_delta_weight(a)
                    xa = self._cast_input_dtype(self.lora_dropout[a](x), d.dtype)
                    result = result + F.linear(xa, d)
                return result.to(out_dtype)
            # one matmul with the weight the merge will produce, added in the order merge() adds
            weight = w
            for a in active:
                d = self.get_delta_weight(a)
                weight = (weight.to(d.dtype) + d).to(w.dtype)
            return F.linear(self._cast_input_dtype(x, w.dtype), weight, base.bias)

        def __repr__(self) -> str:
            return "sparse_" + super().__repr__()

    SparseLoraLinear.__module__ = __name__
    SparseLoraLinear.__qualname__ = "SparseLoraLinear"
    return SparseLoraLinear


_LAYER_CLS: type | None = None


def _layer_cls() -> type:
    global _LAYER_CLS
    if _LAYER_CLS is None:
        _LAYER_CLS = _make_layer_cls()
    return _LAYER_CLS


def __getattr__(name: str) -> Any:  # SparseLoraLinear is built on first use (peft is optional)
    if name == "SparseLoraLinear":
        return _layer_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------- names
def base_name(peft_name: str) -> str:
    """The wrapped model's name of a peft model's parameter: ``base_model.model.X.base_layer.weight``
    -> ``X.weight`` (the only place the renaming rule is written down)."""
    n = peft_name.removeprefix(_PEFT_PREFIX)
    while ".base_layer." in n:
        n = n.replace(".base_layer.", ".", 1)
    return n


def peft_masks(peft_model: nn.Module, masks: MaskSet | None = None) -> MaskSet:
    """``masks`` (default: the ones given to :func:`add_sparse_lora`) under the peft model's
    parameter names, patterns kept -- what :func:`~sparsetorch.finetune.train_masked` needs to
    enforce and verify them on the wrapped model."""
    if masks is None:
        masks = _state(peft_model).masks
    names = {}
    for pn, _ in peft_model.named_parameters():
        names.setdefault(base_name(pn), pn)
    missing = [n for n in masks.masks if n not in names]
    if missing:
        raise MaskError(f"mask {missing[0]!r} names no parameter of the adapted model ({len(missing)} such); "
                        "the masks were made for a different model")
    return MaskSet({names[n]: m for n, m in masks.masks.items()}, {names[n]: p for n, p in masks.patterns.items()})


# ---------------------------------------------------------------------------------------- wrapping
@dataclass
class _State:
    masks: MaskSet
    settings: LoraSettings
    targets: list[str]
    requires_grad: dict[str, bool] = field(default_factory=dict)


def _state(peft_model: nn.Module) -> _State:
    st = peft_model.__dict__.get(_STATE_ATTR)
    if st is None:
        raise LoraError("this model was not made by add_sparse_lora (no sparse LoRA state); for a model with "
                        "ordinary peft LoRA adapters use merge_naive(model, masks) or model.merge_and_unload()")
    return st


def _has_adapters(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def resolve_targets(model: nn.Module, masks: MaskSet, spec: tuple[str, ...] | str | None) -> list[str]:
    """Full names of the modules to adapt; every one must be a plain ``nn.Linear``."""
    modules = dict(model.named_modules())
    if spec is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and f"{n}.weight" in masks.masks]
        if not names:
            raise LoraError("no nn.Linear of the model has a mask, so there is nothing to adapt; pass the masks of "
                            "the pruned linear layers, or name the modules with target_modules=")
    elif isinstance(spec, str):
        names = [n for n in modules if n and re.fullmatch(spec, n)]
        if not names:
            raise LoraError(f"target_modules regular expression {spec!r} matches no module name (it must match "
                            f"the whole name, e.g. r'.*\\.(q|v)_proj')")
    else:
        names = []
        for t in spec:
            hit = [n for n in modules if n and (n == t or n.endswith("." + t))]
            if not hit:
                from ..errors import close_matches

                raise LoraError(f"target module {t!r} matches no module of {type(model).__name__}."
                                + close_matches(t, [n.rsplit('.', 1)[-1] for n in modules if n])
                                + " Name modules by full name or suffix (e.g. 'q_proj').")
            names += [n for n in hit if n not in names]
    for n in names:
        m = modules[n]
        if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
            raise LoraError(f"target module {n!r} ({type(m).__name__}) is not a plain nn.Linear; sparse LoRA "
                            "adapts nn.Linear layers only: leave it out of target_modules")
    return names


def add_sparse_lora(
    model: nn.Module,
    masks: MaskSet,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    *,
    seed: int | None = 0,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap the pruned ``model`` with sparse LoRA adapters; returns the ``peft.PeftModel``.

    ``masks`` (the pruned model's :class:`~sparsetorch.MaskSet`, names of ``model``) is the source
    of truth for every adapted layer's delta mask; the model must already obey it. Only the
    adapters train (peft freezes the rest). ``seed`` fixes the initialisation of ``A`` (``B``
    starts at 0, so the wrapped model computes exactly what ``model`` did); None uses the global
    RNG. As with peft, ``model`` is modified in place: its adapted ``nn.Linear`` modules become
    LoRA layers until :func:`merge_masked` (or peft's ``unload()``) puts them back.
    """
    settings = LoraSettings(r=r, alpha=alpha, dropout=dropout,
                            target_modules=target_modules if isinstance(target_modules, (str, type(None)))
                            else tuple(target_modules))
    if not isinstance(model, nn.Module):
        raise LoraError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, MaskSet):
        raise LoraError(f"masks must be a sparsetorch.MaskSet (the pruned model's masks), got {type(masks).__name__}")
    peft = _peft()
    if _has_adapters(model):
        raise LoraError("the model already has peft adapters; merge them first (merge_masked(model) or "
                        "model.merge_and_unload()) or remove them with unload(), then add sparse LoRA")
    masks.verify(model)  # names and shapes match, pruned weights are zero, patterns hold (MaskError)
    targets = resolve_targets(model, masks, settings.target_modules)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    mask_of = {id(p): masks.masks[n] for n, p in model.named_parameters() if n in masks.masks}

    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=float(settings.dropout),
                             target_modules=list(targets), bias="none")
    config._register_custom_module({nn.Linear: _layer_cls()})
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, warnings.catch_warnings():
        # peft reads this deprecated transformers attribute itself; the warning is not about this call
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        if seed is not None:
            torch.manual_seed(seed)
        pm = peft.get_peft_model(model, config, adapter_name=adapter_name)
    cls = _layer_cls()
    lora_cls = _lora_linear_cls()
    for name, mod in pm.named_modules():
        if isinstance(mod, lora_cls):
            if not isinstance(mod, cls):  # pragma: no cover - our custom mapping covers nn.Linear
                raise LoraError(f"{name} got a {type(mod).__name__}, not a sparse LoRA layer")
            mod.set_sparse_mask(mask_of.get(id(mod.get_base_layer().weight)))
    pm.__dict__[_STATE_ATTR] = _State(masks=masks, settings=settings, targets=targets,
                                      requires_grad=requires_grad)
    return pm


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` of every peft LoRA ``Linear`` (sparse or not) in ``model``."""
    try:
        cls = _lora_linear_cls()
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _restore_requires_grad(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


# ---------------------------------------------------------------------------------------- merging
def merge_masked(peft_model: nn.Module, masks: MaskSet | None = None) -> nn.Module:
    """Merge the sparse LoRA adapters (``W' = W + M ⊙ s·BA``) and unload them: returns the plain
    wrapped model (the object given to :func:`add_sparse_lora`) with the parent's masks.

    The result is verified against ``masks`` (default: those given to :func:`add_sparse_lora`):
    every pruned weight is exactly zero and every pattern holds (raises
    :class:`~sparsetorch.errors.MaskError` otherwise). Parameters get back the ``requires_grad``
    they had before the adapters were added. The merged model computes what the adapted model
    computed (same weights, added in the same order).
    """
    st = _state(peft_model)
    cls = _layer_cls()
    layers = lora_layers(peft_model)
    plain = [n for n, m in layers.items() if not isinstance(m, cls)]
    if plain:
        raise LoraError(f"{plain[0]} is an ordinary (unmasked) LoRA layer; its dense delta would fill pruned "
                        "weights. Merge only sparse LoRA layers (or use merge_naive to re-prune after a dense merge)")
    check = st.masks if masks is None else masks
    if not isinstance(check, MaskSet):
        raise LoraError(f"masks must be a sparsetorch.MaskSet, got {type(check).__name__}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        merged = peft_model.merge_and_unload()
    _restore_requires_grad(merged, st.requires_grad)
    peft_model.__dict__.pop(_STATE_ATTR, None)
    if masks is not None:
        st.masks.verify(merged)
    check.verify(merged)
    return merged


@torch.no_grad()
def merge_naive(peft_model: nn.Module, masks: MaskSet) -> tuple[nn.Module, MaskSet]:
    """The route masking avoids, for comparison: merge every LoRA delta *densely*
    (``W + s·BA``, masks ignored, even in sparse LoRA layers), unload, then re-prune each masked
    tensor by magnitude to its own pattern and sparsity. Returns ``(model, new masks)``.

    The re-pruned model keeps the parent's sparsity and pattern but not its mask, and no longer
    computes what the adapted model computed: that gap is what training with the masked delta
    removes. ``masks`` are the parent's (names of the wrapped model).
    """
    if not isinstance(masks, MaskSet):
        raise LoraError(f"masks must be a sparsetorch.MaskSet (the parent's masks), got {type(masks).__name__}")
    layers = lora_layers(peft_model)
    if not layers:
        raise LoraError("the model has no LoRA layers; merge_naive takes a peft model with LoRA adapters")
    lora_cls = _lora_linear_cls()
    deltas: dict[int, Tensor] = {}
    for layer in layers.values():
        if layer.merged:
            raise LoraError("the adapters are already merged into the weights; call unmerge_adapter() first")
        w = layer.get_base_layer().weight
        for a in layer.active_adapters:
            if a in layer.lora_A:
                d = lora_cls.get_delta_weight(layer, a)  # peft's dense delta, the mask ignored
                deltas[id(w)] = deltas.get(id(w), torch.zeros_like(w, dtype=d.dtype)) + d
    st = peft_model.__dict__.get(_STATE_ATTR)
    model = peft_model.unload()
    if st is not None:
        _restore_requires_grad(model, st.requires_grad)
        peft_model.__dict__.pop(_STATE_ATTR, None)
    params = dict(model.named_parameters())
    for p in params.values():
        if id(p) in deltas:
            p.copy_((p.to(deltas[id(p)].dtype) + deltas[id(p)]).to(p.dtype))
    new: dict[str, Tensor] = {}
    for n, m in masks.masks.items():
        p = params.get(n)
        if p is None:
            raise MaskError(f"mask {n!r} names no parameter of the merged model; pass the parent's masks")
        pattern = masks.patterns[n]
        sparsity = float((~m).sum()) / max(m.numel(), 1)
        keep = pattern.mask(p.detach().abs().float(),
                            None if pattern.fixed_sparsity is not None else sparsity).to(p.device)
        p.masked_fill_(~keep, 0)
        new[n] = keep
    out = MaskSet(new, dict(masks.patterns))
    out.verify(model)
    return model, out


def unload_unmerged(peft_model: nn.Module) -> nn.Module:
    """Drop the adapters without merging (peft's ``unload()``) and restore ``requires_grad``:
    the wrapped model is back as it was before :func:`add_sparse_lora`."""
    st = peft_model.__dict__.pop(_STATE_ATTR, None)
    model = peft_model.unload()
    if st is not None:
        _restore_requires_grad(model, st.requires_grad)
    return model


def lora_masks_from_checkpoint(path: Any) -> MaskSet:
    """The masks of a LoRA fine-tuning checkpoint under the wrapped model's names (the checkpoint
    stores them under the peft model's names)."""
    from .loop import _MASK_FILE, checkpoint_path, load_checkpoint

    f = checkpoint_path(path) / _MASK_FILE
    if not f.is_file():
        load_checkpoint(path)  # raises the CheckpointError that names what is missing
    saved = MaskSet.load(f)
    return MaskSet({base_name(n): m for n, m in saved.masks.items()},
                   {base_name(n): p for n, p in saved.patterns.items()})
