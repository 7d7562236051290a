"""Sparse backpropagation (TinyTL -> 256KB on-device training -> PockEngine): train only a chosen
part of a model, so that the rest costs no gradient, no optimizer state and no backward pass.

A :class:`SparseUpdate` says what trains. Its string form (``--update SPEC`` on the CLI)::

    spec     := term (("," | "+") term)*
    term     := "last:" K            scope: only the last K blocks (at most one scope term)
              | "all"                every parameter in scope
              | "bias"               biases (parameters named *.bias) in scope
              | "norm"               weights and biases of normalisation layers in scope
              | "head"               the output head and the final norm (LMs), never cut by last:K
              | NAME                 the parameters of the modules whose dotted name is NAME or ends
                                     with ".NAME" (q_proj, mlp.up_proj, model.layers.3.mlp ...);
                                     components may be numbers, as nn.Sequential names its children
                                     ("0", "features.0", "2.weight")
              | AXIS ":" F [":" CRIT] "@" NAME ("|" NAME)*
                                     a fraction F in (0, 1] (0.125 or 1/8) of the input channels (AXIS=channels,
                                     the 256KB work's choice) or output rows (AXIS=rows) of each
                                     named nn.Linear, picked by CRIT = magnitude (default; largest
                                     L2 norm, tiny-training's "magnitude+"), gradient (largest
                                     gradient norm on one batch) or random (seeded)

Selectors (everything but ``last:K``) combine as a union; ``last:K`` restricts every selector
except ``head`` to the last K blocks, and alone means ``last:K,all``. Blocks are the decoder
blocks of a causal LM (:func:`~sparsetorch.oneshot.blocks.find_decoder_blocks`); for another
model, its leaf modules that hold parameters, in definition order (``last:1`` of the
Fashion-MNIST CNN is ``fc2``). Examples: ``last:4`` (the last four blocks; the head stays
frozen unless ``head`` is named), ``bias,norm`` (TinyTL without lite residuals),
``last:4+q_proj,k_proj,v_proj,o_proj,up_proj,norm`` (PockEngine's transformer scheme),
``channels:0.125@mlp.up_proj``.

How frozen parts cost nothing:

* every parameter that does not train gets ``requires_grad=False``, so autograd builds no
  backward below the earliest trainable tensor and saves no activation for it;
* a channel subset is a small trainable slice, not a full-size parameter with a masked
  gradient: :class:`ChannelSlice` replaces the ``nn.Linear`` with ``y = x W0ᵀ + x[:, idx] Sᵀ``
  (``W0`` = the frozen weight with the chosen columns zeroed, ``S`` = those columns, trainable;
  rows likewise with an ``index_add``), so AdamW's state is ``out x k`` and, for input
  channels, the activation saved for backward is only ``x[:, idx]``. :meth:`UpdateHandle.merge`
  writes ``S`` back and returns plain ``nn.Linear`` modules;
* with a :class:`~sparsetorch.MaskSet` the slice is masked like the weight it came from
  (:meth:`UpdateHandle.masks`), so a pruned model stays exactly sparse.

Measurements (not estimates): :class:`SavedTensorsMeter` (bytes saved for backward, through
``torch.autograd.graph.saved_tensors_hooks``), :func:`measure_step` (forward / backward seconds,
saved bytes, gradient and optimizer-state bytes of one real AdamW step), :func:`peak_rss_mb`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import close_matches
from ..masks import MaskSet
from ..memory import peak_rss_mb  # re-exported: the measurement helpers live here
from .loop import FinetuneError

__all__ = ["UpdateError", "SparseUpdate", "ChannelTerm", "UpdatePlan", "ChannelSlice", "UpdateHandle",
           "apply_update", "resolve", "SavedTensorsMeter", "StepCost", "measure_step", "grad_bytes",
           "optimizer_state_bytes", "peak_rss_mb", "CRITERIA", "GRAMMAR"]

CRITERIA = ("magnitude", "gradient", "random")
_KEYWORDS = ("all", "bias", "norm", "head")
GRAMMAR = ("last:K | all | bias | norm | head | NAME | channels:F[:CRIT]@NAME[|NAME...] | "
           "rows:F[:CRIT]@NAME[|NAME...], joined by ',' or '+'; CRIT = magnitude|gradient|random")
#: a dotted module (or parameter) name; a component may be all digits (the children of nn.Sequential).
#: Unambiguous: every other term has a ":" (last:K, channels:F@L, rows:F@L) or is a keyword.
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class UpdateError(FinetuneError):
    """A sparse-update spec that does not parse, names no module of the model, or trains nothing."""


# ------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class ChannelTerm:
    """``channels:F[:CRIT]@NAMES``: a fraction of the input channels (``axis="in"``) or output rows
    (``axis="out"``) of the named linear layers."""

    fraction: float
    layers: tuple[str, ...]
    criterion: str = "magnitude"
    axis: str = "in"

    def __str__(self) -> str:
        word = "channels" if self.axis == "in" else "rows"
        crit = "" if self.criterion == "magnitude" else f":{self.criterion}"
        return f"{word}:{self.fraction:g}{crit}@{'|'.join(self.layers)}"


@dataclass(frozen=True)
class SparseUpdate:
    """What trains (see the module docstring for the grammar). Build with :meth:`parse`."""

    last: int | None = None
    all: bool = False
    bias: bool = False
    norm: bool = False
    head: bool = False
    names: tuple[str, ...] = ()
    channels: tuple[ChannelTerm, ...] = ()

    @property
    def selects_everything_in_scope(self) -> bool:
        """``all``, or no selector but a scope: ``last:K`` alone (or with ``head``) trains the K
        blocks in full; ``head`` alone trains only the head."""
        if self.all:
            return True
        if self.bias or self.norm or self.names or self.channels:
            return False
        return not (self.head and self.last is None)

    def __str__(self) -> str:
        parts = [f"last:{self.last}"] if self.last is not None else []
        parts += [k for k in _KEYWORDS if getattr(self, k)]
        parts += list(self.names) + [str(c) for c in self.channels]
        return ",".join(parts)

    @classmethod
    def parse(cls, spec: str | SparseUpdate) -> SparseUpdate:
        """Parse a spec string (``"last:4"``, ``"bias,norm"``, ``"channels:0.125@mlp.up_proj"`` ...);
        :class:`UpdateError` on anything malformed. A SparseUpdate is returned as is."""
        if isinstance(spec, SparseUpdate):
            return spec
        if not isinstance(spec, str):
            raise UpdateError(f"update must be a spec string such as 'last:4' or a SparseUpdate, got "
                              f"{type(spec).__name__}")
        terms = [t.strip() for t in re.split(r"[,+]", spec)]
        if not spec.strip() or any(not t for t in terms):
            raise UpdateError(f"update spec {spec!r} has an empty term; grammar: {GRAMMAR}")
        last: int | None = None
        flags = dict.fromkeys(_KEYWORDS, False)
        names: list[str] = []
        channels: list[ChannelTerm] = []
        for t in terms:
            low = t.lower()
            if low.startswith("last:"):
                if last is not None:
                    raise UpdateError(f"update spec {spec!r} has two last:K terms; give one scope")
                k = low[5:]
                if not k.isdigit() or int(k) < 1:
                    raise UpdateError(f"{t!r}: K must be a positive integer (the number of last blocks to train), "
                                      "e.g. last:4")
                last = int(k)
            elif low in _KEYWORDS:
                flags[low] = True
            elif low.startswith(("channels:", "rows:", "channel:", "row:")):
                channels.append(_parse_channels(t))
            elif ":" in t or "@" in t:
                head = t.split(":", 1)[0].split("@", 1)[0]
                raise UpdateError(f"unknown update term {t!r}." + close_matches(head, ["last", "channels", "rows"])
                                  + f" Grammar: {GRAMMAR}")
            elif _NAME.match(t):
                names.append(t)
            else:
                raise UpdateError(f"{t!r} is not a module name or keyword; grammar: {GRAMMAR}")
        seen = [c for ch in channels for c in ch.layers]
        dup = next((n for n in seen if seen.count(n) > 1), None)
        if dup is not None:
            raise UpdateError(f"{dup!r} appears in two channel terms; give each layer one fraction")
        return cls(last=last, names=tuple(dict.fromkeys(names)), channels=tuple(channels), **flags)

    def to_dict(self) -> dict[str, Any]:
        return {"update": str(self)}


def _parse_channels(t: str) -> ChannelTerm:
    if "@" not in t:
        raise UpdateError(f"{t!r}: a channel term needs the layers after '@', e.g. channels:0.125@mlp.up_proj")
    left, right = t.split("@", 1)
    parts = left.split(":")
    axis = "in" if parts[0].lower().startswith("channel") else "out"
    if len(parts) not in (2, 3):
        raise UpdateError(f"{t!r}: expected {parts[0]}:FRACTION[:CRITERION]@LAYERS, e.g. channels:0.125@up_proj")
    try:
        num, _, den = parts[1].partition("/")
        frac = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise UpdateError(f"{t!r}: fraction {parts[1]!r} is not a number; use e.g. 0.125 or 1/8") from None
    if not 0.0 < frac <= 1.0:
        raise UpdateError(f"{t!r}: the fraction must be in (0, 1], got {frac:g}")
    crit = parts[2].lower() if len(parts) == 3 else "magnitude"
    if crit not in CRITERIA:
        raise UpdateError(f"{t!r}: unknown criterion {parts[2]!r}; use one of {', '.join(CRITERIA)}."
                          + close_matches(crit, CRITERIA))
    layers = tuple(x.strip() for x in right.split("|"))
    bad = next((x for x in layers if not _NAME.match(x)), None)
    if bad is not None:
        raise UpdateError(f"{t!r}: {bad!r} is not a module name (separate several layers with '|')")
    return ChannelTerm(frac, layers, crit, axis)


# ---------------------------------------------------------------------------------------- resolve
@dataclass
class UpdatePlan:
    """A spec resolved against one model: parameter names trained in full, and the channel terms
    by module name. Computing it changes nothing."""

    spec: SparseUpdate
    full: list[str]
    channels: dict[str, ChannelTerm]
    blocks: list[str]

    def slice_size(self, model: nn.Module) -> dict[str, int]:
        mods = dict(model.named_modules())
        out = {}
        for name, term in self.channels.items():
            w = mods[name].weight
            n = w.shape[1] if term.axis == "in" else w.shape[0]
            out[name] = max(1, round(term.fraction * n))
        return out

    def trainable_params(self, model: nn.Module) -> int:
        params = dict(model.named_parameters())
        mods = dict(model.named_modules())
        k = self.slice_size(model)
        n = sum(params[p].numel() for p in self.full)
        for name, term in self.channels.items():
            w = mods[name].weight
            n += k[name] * (w.shape[0] if term.axis == "in" else w.shape[1])
        return n


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower()


def _blocks(model: nn.Module) -> list[str]:
    """Prefixes of the model's blocks, first to last: ``model.layers.0`` ... for an LM, else the
    leaf modules that hold parameters."""
    from ..errors import ModelError
    from ..oneshot.blocks import find_decoder_blocks

    try:
        name, blocks = find_decoder_blocks(model)
        return [f"{name}.{i}" for i in range(len(blocks))]
    except ModelError:
        return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def _matches(name: str, term: str) -> bool:
    return name == term or name.endswith("." + term)


def _head_params(model: nn.Module, params: dict[str, nn.Parameter]) -> list[str]:
    ids = {id(p): n for n, p in params.items()}
    out: list[str] = []
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None:
        out += [ids[id(p)] for p in emb.parameters() if id(p) in ids]
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None) or getattr(base, "ln_f", None)
    if isinstance(norm, nn.Module):
        out += [ids[id(p)] for p in norm.parameters() if id(p) in ids]
    return out


def resolve(model: nn.Module, update: str | SparseUpdate) -> UpdatePlan:
    """Resolve ``update`` against ``model`` without changing it; :class:`UpdateError` when a name
    matches no module (with close matches), a channel layer is not an ``nn.Linear``, a layer is
    chosen both in full and by channels, or nothing would train."""
    spec = SparseUpdate.parse(update)
    params = dict(model.named_parameters())  # deduplicated: a tied embedding appears once
    modules = dict(model.named_modules())
    blocks = _blocks(model)
    if spec.last is not None:
        if spec.last > len(blocks):
            raise UpdateError(f"last:{spec.last} asks for more blocks than {type(model).__name__} has "
                              f"({len(blocks)}); use last:{len(blocks)} or 'all'")
        scope = blocks[len(blocks) - spec.last:]

        def in_scope(name: str) -> bool:
            return any(name == b or name.startswith(b + ".") for b in scope)
    else:
        def in_scope(name: str) -> bool:
            return True

    suffixes = sorted({".".join(n.split(".")[-k:]) for n in modules if n for k in (1, 2)})

    def named(term: str) -> list[str]:
        mods = [n for n in modules if n and _matches(n, term)]
        if not mods:
            pn = [n for n in params if _matches(n, term)]
            if pn:
                return pn
            hint = f" For the last {term} blocks write last:{term}." if term.isdigit() else ""
            raise UpdateError(f"update term {term!r} matches no module of {type(model).__name__}."
                              + close_matches(term, suffixes) + hint + f" Grammar: {GRAMMAR}")
        out = [f"{m}.{p}" for m in mods for p, _ in modules[m].named_parameters()]
        return [n for n in out if n in params]

    chosen: list[str] = []
    if spec.selects_everything_in_scope:
        chosen += [n for n in params if in_scope(n)]
    if spec.bias:
        chosen += [n for n in params if n.endswith(".bias") and in_scope(n)]
    if spec.norm:
        chosen += [f"{m}.{p}" for m, mod in modules.items() if m and _is_norm(mod)
                   for p, _ in mod.named_parameters(recurse=False) if in_scope(m)]
    for term in spec.names:
        hits = named(term)
        kept = [n for n in hits if in_scope(n)]
        if hits and not kept:
            raise UpdateError(f"update term {term!r} matches {hits[0]} ... but nothing inside last:{spec.last}; "
                              "widen the scope or drop the term")
        chosen += kept
    if spec.head:
        head = _head_params(model, params)
        if not head:
            raise UpdateError(f"'head': {type(model).__name__} has no output embeddings or final norm; name its "
                              "last layer instead (or use last:1)")
        chosen += head
    full = [n for n in dict.fromkeys(chosen) if n in params]

    channels: dict[str, ChannelTerm] = {}
    for term in spec.channels:
        for layer in term.layers:
            mods = [n for n in modules if n and _matches(n, layer)]
            if not mods:
                raise UpdateError(f"channel layer {layer!r} matches no module of {type(model).__name__}."
                                  + close_matches(layer, suffixes))
            kept = [m for m in mods if in_scope(m)]
            if not kept:
                raise UpdateError(f"channel layer {layer!r} matches {mods[0]} ... but nothing inside "
                                  f"last:{spec.last}")
            for m in kept:
                if not isinstance(modules[m], nn.Linear):
                    raise UpdateError(f"channels of {m}: only nn.Linear layers can train a channel slice, it is a "
                                      f"{type(modules[m]).__name__}; train it in full ({layer}) instead")
                if f"{m}.weight" in full:
                    raise UpdateError(f"{m}.weight is chosen both in full and by '{term}'; drop one of the two")
                if m in channels:
                    raise UpdateError(f"{m} is chosen by two channel terms ('{channels[m]}' and '{term}')")
                channels[m] = term
    if not full and not channels:
        whole = f"last:{spec.last}" if spec.last is not None else "last:2"
        raise UpdateError(f"update {str(spec)!r} selects no parameter of {type(model).__name__} (e.g. it has no "
                          f"biases or norms there); name layers that exist, or train whole blocks with {whole}")
    return UpdatePlan(spec, full, channels, blocks)


# ---------------------------------------------------------------------------------- channel slice
class ChannelSlice(nn.Module):
    """An ``nn.Linear`` whose chosen input channels (``axis="in"``) or output rows (``"out"``)
    train as a small parameter ``slice`` while the rest stays frozen in ``base``.

    ``base.weight`` holds zeros at the chosen positions (they live in ``slice``), so
    ``base(x) + x[..., idx] @ sliceᵀ`` (or ``base(x)`` with ``x @ sliceᵀ`` added at the chosen
    outputs) computes the original layer. Autograd saves ``x[..., idx]`` for the input-channel
    slice -- k of ``in`` features -- and nothing for the frozen path when ``x`` needs no grad.
    """

    def __init__(self, base: nn.Linear, index: Tensor, axis: str = "in") -> None:
        super().__init__()
        if axis not in ("in", "out"):
            raise UpdateError(f"axis must be 'in' or 'out', got {axis!r}")
        self.base, self.axis = base, axis
        index = index.to(device=base.weight.device, dtype=torch.long).sort().values
        self.register_buffer("index", index)
        with torch.no_grad():
            w = base.weight
            part = w[:, index] if axis == "in" else w[index, :]
            self.slice = nn.Parameter(part.clone())
            if axis == "in":
                w[:, index] = 0
            else:
                w[index, :] = 0
        base.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.axis == "in":
            return y + F.linear(x.index_select(-1, self.index), self.slice)
        return y.index_add(-1, self.index, F.linear(x, self.slice))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base ``nn.Linear`` with the slice written back (this wrapper is spent afterwards)."""
        w = self.base.weight
        if self.axis == "in":
            w[:, self.index] = self.slice.to(w.dtype)
        else:
            w[self.index, :] = self.slice.to(w.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"axis={self.axis}, k={self.index.numel()}"


def _select(weight: Tensor, k: int, axis: str, criterion: str, mask: Tensor | None, grad: Tensor | None,
            generator: torch.Generator) -> Tensor:
    dim = 0 if axis == "in" else 1  # norm over the other dimension
    if criterion == "random":
        n = weight.shape[1] if axis == "in" else weight.shape[0]
        return torch.randperm(n, generator=generator)[:k]
    src = weight.detach().float() if criterion == "magnitude" else grad.float()
    if mask is not None:
        src = src * mask.to(src.device)
    score = src.norm(dim=dim)
    return torch.topk(score, k).indices


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@dataclass
class UpdateHandle:
    """A model prepared by :func:`apply_update`: what trains, the slices, and the way back."""

    model: nn.Module
    plan: UpdatePlan
    slices: dict[str, ChannelSlice]
    requires_grad: dict[str, bool]
    originals: dict[str, Tensor] = field(default_factory=dict)
    merged_: bool = False

    def masks(self, masks: MaskSet | None) -> MaskSet:
        """``masks`` under the prepared model's names: ``L.weight`` becomes ``L.base.weight`` and
        ``L.slice`` gets the matching columns (rows) of its mask, unstructured. None: all-kept
        masks over the trained matrices (nothing pruned; :func:`train_masked` needs a MaskSet)."""
        if masks is None:
            return MaskSet({n: torch.ones_like(p, dtype=torch.bool) for n, p in self.model.named_parameters()
                            if p.requires_grad and p.dim() >= 2})
        out: dict[str, Tensor] = {}
        pats: dict[str, Any] = {}
        for name, m in masks.masks.items():
            mod = name.removesuffix(".weight")
            if name.endswith(".weight") and mod in self.slices:
                s = self.slices[mod]
                idx = s.index.to(m.device)
                out[f"{mod}.base.weight"], pats[f"{mod}.base.weight"] = m, masks.patterns[name]
                out[f"{mod}.slice"] = m[:, idx] if s.axis == "in" else m[idx, :]
                pats[f"{mod}.slice"] = "unstructured"
            else:
                out[name], pats[name] = m, masks.patterns[name]
        return MaskSet(out, pats)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def merge(self, restore: bool = False) -> nn.Module:
        """Write every slice back into a plain ``nn.Linear`` and give every parameter back the
        ``requires_grad`` it had. ``restore=True`` (a failed run) puts the original columns back
        instead of the trained ones."""
        if self.merged_:
            return self.model
        for name, s in self.slices.items():
            if restore:
                with torch.no_grad():
                    s.slice.copy_(self.originals[name])
            _set_module(self.model, name, s.merged())
        for n, p in self.model.named_parameters():
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])
        self.merged_ = True
        return self.model


def apply_update(model: nn.Module, update: str | SparseUpdate | UpdatePlan, masks: MaskSet | None = None, *,
                 grad_fn: Callable[[nn.Module], Tensor] | None = None, seed: int = 0) -> UpdateHandle:
    """Prepare ``model`` in place so that only what ``update`` names trains; returns the handle
    whose :meth:`~UpdateHandle.merge` undoes the wrapping. Every check (:func:`resolve`) runs
    before the model is touched.

    ``grad_fn(model)`` returns a loss on one batch: needed (and only called) for the
    ``gradient`` criterion, with only the chosen layers' weights requiring grad. The ``random``
    criterion draws from a generator seeded with ``seed``. ``masks`` (optional) weight the
    magnitude / gradient scores, so pruned weights never make a channel look important.
    """
    plan = update if isinstance(update, UpdatePlan) else resolve(model, update)
    if any(t.criterion == "gradient" for t in plan.channels.values()) and grad_fn is None:
        raise UpdateError("the 'gradient' channel criterion needs grad_fn= (a loss on one batch); finetune() "
                          "passes its first training batch")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    sizes = plan.slice_size(model)
    grads: dict[str, Tensor] = {}
    if any(t.criterion == "gradient" for t in plan.channels.values()):
        want = {modules[m].weight for m, t in plan.channels.items() if t.criterion == "gradient"}
        try:
            for p in model.parameters():
                p.requires_grad_(any(p is w for w in want))
                p.grad = None
            grad_fn(model).backward()
            grads = {m: modules[m].weight.grad.detach().clone() for m, t in plan.channels.items()
                     if t.criterion == "gradient"}
        finally:
            for n, p in model.named_parameters():
                p.grad = None
                p.requires_grad_(flags[n])
    g = torch.Generator().manual_seed(seed)
    indices = {}
    for m, t in plan.channels.items():
        mk = masks.masks.get(f"{m}.weight") if masks is not None else None
        indices[m] = _select(modules[m].weight, sizes[m], t.axis, t.criterion, mk, grads.get(m), g)
    # mutate only now
    keep = set(plan.full)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    slices: dict[str, ChannelSlice] = {}
    originals: dict[str, Tensor] = {}
    for m, t in plan.channels.items():
        s = ChannelSlice(modules[m], indices[m], t.axis)
        _set_module(model, m, s)
        slices[m] = s
        originals[m] = s.slice.detach().clone()
    return UpdateHandle(model, plan, slices, flags, originals)


# ------------------------------------------------------------------------------------ measurement
class SavedTensorsMeter:
    """Counts the bytes autograd saves for backward inside the ``with`` block.

    Storages are counted once (several views of one tensor cost one storage). Saved tensors
    that are parameters of ``model`` (or views of them) are counted apart in ``param_bytes``:
    they exist anyway; ``activation_bytes`` is what the backward pass costs in memory.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self._seen: set[int] = set()
        self.activation_bytes = 0
        self.param_bytes = 0
        self.count = 0
        self._ctx: Any = None

    def _pack(self, t: Tensor) -> Tensor:
        self.count += 1
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensor subclasses without storage
            return t
        if ptr not in self._seen:
            self._seen.add(ptr)
            if ptr in self._params:
                self.param_bytes += nbytes
            else:
                self.activation_bytes += nbytes
        return t

    def __enter__(self) -> SavedTensorsMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def grad_bytes(params: Iterable[Tensor]) -> int:
    """Bytes held by the ``.grad`` of ``params`` now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor))


@dataclass
class StepCost:
    """One measured training step (seconds, bytes)."""

    forward_s: float
    backward_s: float
    optimizer_s: float
    saved_activation_bytes: int
    saved_param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    trainable_params: int

    @property
    def grad_optimizer_bytes(self) -> int:
        return self.grad_bytes + self.optimizer_state_bytes

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "grad_optimizer_bytes": self.grad_optimizer_bytes}


def measure_step(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor],
                 optimizer: torch.optim.Optimizer | None = None, *, repeats: int = 1) -> StepCost:
    """Run ``repeats`` real training steps (forward, backward, AdamW step) of ``model`` on
    ``loss_fn(model)`` and measure the last one. The weights change (it is a real step): measure
    on a copy, or restore afterwards. ``optimizer`` defaults to AdamW over the parameters that
    require grad (the fine-tuning loop's choice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UpdateError("nothing to measure: no parameter requires grad")
    opt = optimizer if optimizer is not None else torch.optim.AdamW(params, lr=1e-12)
    cost = None
    was = model.training
    model.train()
    try:
        for _ in range(max(1, repeats)):
            opt.zero_grad(set_to_none=True)
            meter = SavedTensorsMeter(model)
            t0 = time.perf_counter()
            with meter:
                loss = loss_fn(model)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            gb = grad_bytes(params)
            opt.step()
            t3 = time.perf_counter()
            cost = StepCost(t1 - t0, t2 - t1, t3 - t2, meter.activation_bytes, meter.param_bytes, gb,
                            optimizer_state_bytes(opt), sum(p.numel() for p in params))
            del loss
        opt.zero_grad(set_to_none=True)
    finally:
        model.train(was)
    return cost

