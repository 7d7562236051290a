"""Low-overhead CPU text generation: one compiled call per token, sparse and low-bit weights.

Why: decoding one token of a small LLM with eager PyTorch and Hugging Face ``generate`` spends
most of its time in framework overhead (hundreds of Python-dispatched ops per token), not in
reading the weights. :class:`DecodeEngine` copies a Llama-family model's weights into a compact
C++ decoder (:mod:`._decode_csrc`): q/k/v and gate/up fused into one matrix each, every matrix
in the layout that reads the fewest bytes (``dense``, ``bitmask`` or ``csr``, see
:func:`~.lowbit.choose_layout`) with fp32, fp16, bf16 or int8 values and fp32 accumulation, a
static fp32 KV cache, and the prompt processed in one batched call. Generation is then one
Python-to-C++ call per token.

    >>> from sparsetorch.inference import generate
    >>> out = generate(model, input_ids, max_new_tokens=32, dtype="fp16")   # [1, T + 32]

Models the engine cannot run exactly (not Llama/Mistral/Qwen2-shaped, forward hooks such as
activation thresholds, batch > 1, padding, dynamic RoPE, no compiler ...) are handed to
Hugging Face ``generate`` with a one-line notice on stderr: never a wrong answer.

Greedy decoding in fp32 gives the same tokens as Hugging Face ``generate`` (fp32 round-off
differs in summation order only; the tests check token equality).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError, ModelError
from .lowbit import LowbitWeight, check_value_dtype, choose_layout, pack_lowbit

__all__ = [
    "ACTIVATION_KERNELS",
    "DecodeEngine",
    "DecodeStats",
    "EngineLM",
    "decode_support",
    "generate",
    "SUPPORTED_MODEL_TYPES",
    "choose_activation_kernels",
]

#: ``config.model_type`` values whose decoder layers the engine reproduces exactly
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _notice_default(msg: str) -> None:
    print(f"sparsetorch: {msg}", file=sys.stderr)


def _hooked(model: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"module {name or '<root>'} has forward hooks (e.g. activation thresholds) the fast path would skip"
    return None


def _linear_ok(name: str, mod: nn.Module) -> str | None:
    from .linear import SparseLinear

    if isinstance(mod, nn.Linear):
        return None
    if isinstance(mod, SparseLinear):
        if "threshold" in mod._parts or "scale" in mod._parts:
            return f"{name} applies activation thresholds inside its kernel"
        return None
    return f"{name} is a {type(mod).__name__}, not nn.Linear or SparseLinear"


def decode_support(model: nn.Module) -> str | None:
    """``None`` if :class:`DecodeEngine` can run ``model`` exactly, else the reason it cannot."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        return f"model type {mtype!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or any(not hasattr(base, a) for a in needed) or not hasattr(model, "lm_head"):
        return "model is not laid out as <model>.model.{embed_tokens,layers,norm,rotary_emb} + lm_head"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "use_sliding_window", False) or (mtype == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention is not supported"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1 is not supported"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"RoPE type {rope_type!r} changes with the sequence length"
    reason = _hooked(model)
    if reason:
        return reason
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} has no self_attn/mlp"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "q/k norms are not supported"
        hd = getattr(attn, "head_dim", None)
        if hd is None or abs(float(getattr(attn, "scaling", 0.0)) - hd**-0.5) > 1e-12:
            return "attention scaling is not head_dim ** -0.5"
        for p in _PROJ:
            mod = getattr(attn if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp, p, None)
            if mod is None:
                return f"layer {i} has no {p}"
            reason = _linear_ok(f"layers.{i}.{p}", mod)
            if reason:
                return reason
        for norm in ("input_layernorm", "post_attention_layernorm"):
            n = getattr(layer, norm, None)
            if n is None or not hasattr(n, "weight") or getattr(n, "bias", None) is not None:
                return f"layer {i} {norm} is not an RMSNorm"
    if not isinstance(model.lm_head, nn.Linear) or model.lm_head.bias is not None:
        return "lm_head is not a bias-free nn.Linear"
    return None


def _weight(mod: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Dense fp32 weight and bias of an ``nn.Linear`` or :class:`SparseLinear`."""
    from .linear import SparseLinear

    with torch.no_grad():
        if isinstance(mod, SparseLinear):
            w = mod.to_dense_weight().float()
            b = None if mod.bias is None else mod.bias.detach().float()
        else:
            w = mod.weight.detach().float()
            b = None if mod.bias is None else mod.bias.detach().float()
    # SparseLinear reconstructs by multiplying the identity: -0.0 and +0.0 both mean pruned
    return w.cpu().contiguous(), None if b is None else b.cpu().contiguous()


#: the engine's fused matrices and the projections that share each one's input
_FUSED = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


def _fused_thresholds(model: nn.Module, layers: list[nn.Module], activation: Any) -> dict[str, float]:
    """``{"layers.i.qkv": t, ...}``: the one TEAL threshold of each fused matrix's input (see
    :func:`_fused_levels` for the fraction of that input below it).

    Raises :class:`ModelError` for WINA thresholds (one mask per projection, not per input), for
    thresholds that differ within q/k/v or gate/up, cover only some of them, or name a module
    that is not a decoder projection; :class:`DataError` for a name the model does not have."""
    from ..activation.thresholds import ActivationThresholds

    if not isinstance(activation, ActivationThresholds):
        raise ModelError(f"activation must be ActivationThresholds (calibrate_thresholds), got {type(activation).__name__}.")
    if activation.criterion != "teal":
        raise ModelError(f"the decode engine applies TEAL thresholds (|x| against one threshold per input); "
                         f"{activation.criterion!r} weighs each input by its weight column, which differs between "
                         "the fused q/k/v (and gate/up). Use apply_thresholds with the PyTorch path for it.")
    names = {id(m): n for n, m in model.named_modules()}
    remaining = dict(activation.thresholds)
    for n in remaining:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise DataError(f"the thresholds name {n!r}, which this model does not have: they were calibrated "
                            "on another architecture.") from None
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        for key, (parent, projs) in _FUSED.items():
            members = [names[id(getattr(getattr(layer, parent), p))] for p in projs]
            got = {m: remaining.pop(m) for m in members if m in remaining}
            if not got:
                continue
            if len(got) != len(members) or len(set(got.values())) != 1:
                raise ModelError(f"layer {i}: {', '.join(members)} share one input, so the engine needs one "
                                 f"threshold for all of them; got {got or 'none'} (calibrate them together).")
            out[f"layers.{i}.{key}"] = float(next(iter(got.values())))
    if remaining:
        raise ModelError(f"thresholds on {', '.join(sorted(remaining)[:3])} are not on decoder projections; the "
                         "engine applies thresholds to q/k/v, o, gate/up and down only.")
    return out


def _fused_levels(model: nn.Module, layers: list[nn.Module], activation: Any, names: list[str]) -> dict[str, float]:
    """The calibrated fraction of each fused matrix's input below its threshold (its first
    member's level; TEAL's greedy allocation gives one level per input), else the target."""
    mods = {id(m): n for n, m in model.named_modules()}
    out: dict[str, float] = {}
    for name in names:
        _, i, key = name.split(".")
        parent, projs = _FUSED[key]
        first = mods[id(getattr(getattr(layers[int(i)], parent), projs[0]))]
        out[name] = float(activation.levels.get(first, activation.sparsity))
    return out


#: how a matrix with an activation threshold is computed: ``transposed`` (stored ``W^T``, only the
#: rows of live inputs read), ``plain`` (the input thresholded, then the ordinary kernel, which
#: reads every stored weight), or ``auto`` (per kind of fused matrix, the faster one measured)
ACTIVATION_KERNELS = ("auto", "transposed", "plain")


def _live_input(n: int, live: float, threshold: float, gen: torch.Generator) -> Tensor:
    """A ``[1, n]`` input whose ``round(live * n)`` entries (random places) are at or above
    ``threshold`` in magnitude and the rest zero: the density a calibrated threshold leaves."""
    x = torch.zeros(1, n)
    k = int(round(min(max(live, 0.0), 1.0) * n))
    idx = torch.randperm(n, generator=gen)[:k]
    mag = threshold + torch.rand(k, generator=gen) + 1e-3
    x[0, idx] = torch.where(torch.rand(k, generator=gen) < 0.5, -mag, mag)
    return x


def choose_activation_kernels(
    options: dict[str, dict[bool, LowbitWeight]],
    levels: dict[str, float],
    timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None,
) -> dict[str, bool]:
    """For each matrix with an activation threshold: ``True`` to store it transposed, ``False``
    for the plain kernel on the thresholded input -- whichever computed the engine's one-token
    product faster, measured per kind of fused matrix (``qkv``, ``o``, ``gate_up``, ``down``).

    ``options[name]`` holds both packings of one matrix (``{True: transposed, False: plain}``);
    ``levels[name]`` the fraction of its input below the threshold. Each kind is timed over all
    of its layers in turn (their weights together exceed the caches, as in decoding), on inputs
    with exactly that fraction of zeros, at torch's current thread count; ``timer`` maps
    ``{"transposed": fn, "plain": fn}`` to seconds per call (default
    :func:`~.bench.interleaved_medians`; tests pass a fake). A tie keeps the plain kernel.
    """
    from .bench import interleaved_medians
    from .lowbit import lowbit_matmul

    timer = timer or (lambda fns: interleaved_medians(fns, repeats=3, rounds=3))
    kinds: dict[str, list[str]] = {}
    for name in options:
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, bool] = {}
    for names in kinds.values():
        xs = {n: _live_input(options[n][False].in_features, 1.0 - levels[n], float(options[n][False].threshold or 0.0),
                             gen) for n in names}

        def run(trans: bool, names: list[str] = names, xs: dict[str, Tensor] = xs) -> None:
            for n in names:
                lowbit_matmul(xs[n], options[n][trans], check=False)

        secs = timer({"transposed": lambda: run(True), "plain": lambda: run(False)})
        pick = secs["transposed"] < secs["plain"]
        out.update(dict.fromkeys(names, pick))
    return out


def _check_activation_kernel(kernel: str) -> tuple[bool, ...]:
    """The orientations to pack for ``activation_kernel`` (transposed first); a typed error otherwise."""
    if kernel not in ACTIVATION_KERNELS:
        raise ModelError(f"activation_kernel must be one of {', '.join(ACTIVATION_KERNELS)}; got {kernel!r}.")
    return {"auto": (True, False), "transposed": (True,), "plain": (False,)}[kernel]


def _activation_config(activation: Any, matrices: int, kernel: str) -> dict[str, Any]:
    """The engine config's record of the thresholds it applies."""
    return {"criterion": activation.criterion, "sparsity": float(activation.sparsity), "matrices": matrices,
            "kernel": kernel}


def _settle_activation(options: dict[str, dict[bool, LowbitWeight]], kernel: str, levels: Callable[[], dict[str, float]],
                       timer: Any, packs: dict[str, LowbitWeight], layouts: dict[str, str]) -> dict[str, bool]:
    """Put each thresholded matrix's chosen packing into ``packs`` and mark its layout (``-t``
    transposed, ``+thr`` plain); ``auto`` measures (:func:`choose_activation_kernels`). Returns
    ``{name: transposed}``."""
    if kernel == "auto":
        trans = choose_activation_kernels(options, levels(), timer)
    else:
        trans = dict.fromkeys(options, kernel == "transposed")
    for name, both in options.items():
        packs[name] = both[trans[name]]
        layouts[name] += "-t" if trans[name] else "+thr"
    return trans


def _cat_bias(mods: list[tuple[Tensor, Tensor | None]]) -> Tensor | None:
    if all(b is None for _, b in mods):
        return None
    return torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in mods]).contiguous()


def _check_options(dtype: str, head_dtype: str | None, layout: str) -> str:
    """Validate the engine's value dtypes and layout; return the head dtype."""
    check_value_dtype(dtype)
    head = check_value_dtype(head_dtype or dtype)
    if layout not in ("auto", "dense", "bitmask", "csr"):
        raise ModelError(f"unknown layout {layout!r}; choose auto, dense, bitmask or csr.")
    return head


def _require_engine(model: nn.Module) -> Any:
    """The compiled extension, after checking that the engine can run ``model``."""
    from ..errors import DependencyError
    from ._decode_ext import decode_extension_error, get_decode_extension

    reason = decode_support(model)
    if reason is not None:
        raise ModelError(f"the fast decode path cannot run this model: {reason}; use transformers' generate.")
    ext = get_decode_extension()
    if ext is None:
        raise DependencyError(
            f"the compiled decode engine is unavailable ({decode_extension_error()}); install a C++ compiler (g++)."
        )
    return ext


def _geometry(cfg: Any, base: nn.Module) -> tuple[list[nn.Module], dict[str, int], float]:
    """The decoder layers, their dimensions and the RMSNorm epsilon of a Llama-family body."""
    layers = list(base.layers)
    dims = _dims(cfg, layers[0], int(base.embed_tokens.weight.shape[0]), len(layers))
    eps = float(getattr(layers[0].input_layernorm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6)))
    return layers, dims, eps


def _dims(cfg: Any, layer0: nn.Module, vocab: int, n_layers: int) -> dict[str, int]:
    """The engine's sizes from a model config and its first decoder layer."""
    n_heads = int(cfg.num_attention_heads)
    return {"layers": n_layers, "hidden": int(cfg.hidden_size), "heads": n_heads,
            "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
            "head_dim": int(layer0.self_attn.head_dim), "vocab": vocab, "intermediate": int(cfg.intermediate_size)}


def _rope_fn(rotary: nn.Module) -> Callable[[int], tuple[Tensor, Tensor]]:
    """RoPE tables ``(cos, sin) [n, head_dim]`` computed by the model's own rotary module."""

    def rope(n: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(n, dtype=torch.int64)[None]
        x = torch.zeros(1, dtype=torch.float32, device=pos.device)
        with torch.no_grad():
            dev = next(iter(rotary.buffers()), x).device
            cos, sin = rotary(x.to(dev), pos.to(dev))
        return cos[0].float().cpu().contiguous(), sin[0].float().cpu().contiguous()

    return rope


@dataclass
class DecodeStats:
    """Where the time of the engine's forward calls went (``profile=True`` runs only)."""

    calls: int
    seconds: float
    linear_seconds: float
    attention_seconds: float
    #: wall time of each generated token measured in Python (includes the Python loop and sampling)
    token_seconds: list[float] = field(default_factory=list)

    @property
    def overhead_seconds_per_call(self) -> float:
        """Time per call outside the matrix products and attention (norms, RoPE, activations, glue)."""
        return (self.seconds - self.linear_seconds - self.attention_seconds) / max(1, self.calls)


class DecodeEngine:
    """A Llama-family causal LM in the compiled decoder, weights packed once.

    Build with :meth:`from_model`. ``dtype`` sets the value type of every decoder matrix
    (``fp32``, ``fp16``, ``bf16``, ``int8``); ``head_dtype`` that of the LM head and the
    embedding (default: ``dtype``). ``layout`` is ``"auto"`` (per fused matrix, the layout
    reading the fewest bytes, see :func:`~.lowbit.choose_layout`) or one of ``dense``,
    ``bitmask``, ``csr`` for every decoder matrix.
    """

    def __init__(self, ext: Any, handle: Any, config: dict[str, Any], layouts: dict[str, str],
                 packed: dict[str, LowbitWeight] | None = None, sources: dict[str, str] | None = None) -> None:
        self._ext = ext
        self._h = handle
        self.config = config
        #: fused matrix name ("layers.0.qkv" ...) -> layout used
        self.layouts = layouts
        #: matrix name ("embed", "lm_head" unless tied, "layers.0.qkv" ...) -> the packed weight the engine reads
        self.packed: dict[str, LowbitWeight] = packed or {}
        #: matrix name -> how it got there: "packed" (from a model), "direct" (a checkpoint's stored
        #: parts read as they are) or "repacked" (a checkpoint's tensors decoded, then packed)
        self.sources: dict[str, str] = sources or {}
        #: end-of-sequence token id(s) of the model's generation config (None if unknown)
        self.eos_token_id: int | list[int] | None = None
        self._rope: tuple[Tensor, Tensor] | None = None
        self._rope_fn: Callable[[int], tuple[Tensor, Tensor]] | None = None
        self.last_stats: DecodeStats | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        dtype: str = "fp32",
        *,
        head_dtype: str | None = None,
        layout: str = "auto",
        activation: Any = None,
        activation_kernel: str = "auto",
        timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None,
    ) -> DecodeEngine:
        """Pack ``model``'s weights (``nn.Linear`` or :class:`SparseLinear` layers) into an engine.

        ``activation``: TEAL thresholds (:class:`~sparsetorch.activation.ActivationThresholds`,
        criterion ``teal``, from ``calibrate_thresholds`` on this model, *not* installed as hooks):
        every matrix whose input has a threshold sees only the inputs at or above it (prefill
        too, as the hooks of :func:`~sparsetorch.activation.apply_thresholds` do). q/k/v and
        gate/up share an input, so their thresholds must be equal (TEAL's are: one quantile of
        one tensor). ``activation_kernel`` says how such a matrix is computed (layout names in
        :attr:`layouts`): ``"transposed"`` stores ``W^T`` and at one token reads only the
        weights of live inputs (``dense-t``, ``bitmask-t``, ``csr-t``); ``"plain"`` zeroes the
        input below the threshold and runs the ordinary kernel (``dense+thr`` ...); ``"auto"``
        (default) measures both per kind of fused matrix at the build's thread count and keeps
        the faster (:func:`choose_activation_kernels`; ``timer`` replaces its clock in tests):
        a transposed bitmask can be slower than the plain one on a wide-input matrix.

        Raises :class:`~sparsetorch.errors.ModelError` naming the reason when the model is not
        supported (see :func:`decode_support`) and
        :class:`~sparsetorch.errors.DependencyError` when the extension cannot be built.
        """
        head_dtype = _check_options(dtype, head_dtype, layout)
        ext = _require_engine(model)
        cfg = model.config
        base = model.model
        layers, dims, eps = _geometry(cfg, base)
        packs: dict[str, LowbitWeight] = {}
        biases: dict[str, Tensor | None] = {}
        layouts: dict[str, str] = {}
        orientations = _check_activation_kernel(activation_kernel)
        thr = _fused_thresholds(model, layers, activation) if activation is not None else {}
        options: dict[str, dict[bool, LowbitWeight]] = {}

        def packed(name: str, w: Tensor, dt: str, lay: str | None = None) -> None:
            chosen = lay or (choose_layout(w, dt) if layout == "auto" else layout)
            layouts[name] = chosen
            t = thr.get(name)
            if t is None:
                packs[name] = pack_lowbit(w, chosen, dt)
            else:
                options[name] = {tr: pack_lowbit(w, chosen, dt, transposed=tr, threshold=t) for tr in orientations}

        def f32(t: Tensor) -> Tensor:
            return t.detach().float().cpu().contiguous()

        with torch.no_grad():
            emb_w = f32(base.embed_tokens.weight)
            head_w = f32(model.lm_head.weight)
            tied = model.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr() or torch.equal(emb_w, head_w)
            packed("embed", emb_w, head_dtype, "dense")
            layouts["lm_head"] = "dense"
            if not tied:
                packed("lm_head", head_w, head_dtype, "dense")
            norms = [f32(base.norm.weight)]
            for i, layer in enumerate(layers):
                a, m = layer.self_attn, layer.mlp
                norms += [f32(layer.input_layernorm.weight), f32(layer.post_attention_layernorm.weight)]
                q, k, v, o = (_weight(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                g, u, d = (_weight(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj"))
                for key, mats in (("qkv", [q, k, v]), ("o", [o]), ("gate_up", [g, u]), ("down", [d])):
                    packed(f"layers.{i}.{key}", torch.cat([w for w, _ in mats]) if len(mats) > 1 else mats[0][0], dtype)
                    biases[f"layers.{i}.{key}"] = _cat_bias(mats)
        if options:
            _settle_activation(options, activation_kernel,
                               lambda: _fused_levels(model, layers, activation, list(options)), timer, packs, layouts)
            del options
        config = {"model_type": cfg.model_type, **dims, "dtype": dtype, "head_dtype": head_dtype, "layout": layout,
                  "tied_embeddings": bool(tied)}
        if activation is not None:
            config["activation"] = _activation_config(activation, len(thr), activation_kernel)
        eng = cls._assemble(ext, config, eps, packs, biases, norms, layouts, dict.fromkeys(packs, "packed"))
        eng._rope_fn = _rope_fn(base.rotary_emb)
        gc = getattr(model, "generation_config", None)
        eng.eos_token_id = getattr(gc, "eos_token_id", None)
        return eng

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Any,
        dtype: str = "fp32",
        *,
        head_dtype: str | None = None,
        layout: str = "auto",
        direct: bool = True,
        max_bytes: int | None = None,
        notice: Callable[[str], None] | None = _notice_default,
        activation: Any = None,
        activation_kernel: str = "auto",
        timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None,
    ) -> DecodeEngine:
        """An engine straight from a compressed checkpoint (:func:`sparsetorch.save`, ``sparsetorch
        export``; a file or a folder holding one), without building the float model.

        Each fused matrix is read from the stored parts as they are when their layout and value
        type are the engine's (an int8 checkpoint into ``dtype="int8"``, a float16 one into
        ``"fp16"``, see :mod:`.ckpt_pack`); the others are decoded and packed (``direct=False``:
        all of them). The layouts are those :meth:`from_model` would choose over the stored
        positions, so the engine runs the same matrices either way; a kept weight whose int8
        value is 0 stays a stored position. ``repr`` and :attr:`sources` say which matrices were
        read directly; ``notice`` (stderr by default, None for silence) gets one line about it.
        ``activation`` / ``activation_kernel`` / ``timer``: TEAL thresholds (e.g.
        :meth:`ActivationThresholds.load <sparsetorch.activation.ActivationThresholds.load>` of a
        file calibrated on the float model), as in :meth:`from_model`; the plain kernel keeps a
        directly read matrix as it is, the transposed one repacks it.

        Raises :class:`~sparsetorch.errors.CheckpointError` for a damaged file or one without a
        model config, :class:`~sparsetorch.errors.ModelError` for a model the engine cannot run
        and :class:`~sparsetorch.errors.DependencyError` without the compiled extension.
        """
        from ..errors import CheckpointError, DependencyError
        from ..export import reader

        try:
            import transformers
        except ImportError as exc:  # pragma: no cover - transformers is installed with sparsetorch[llm]
            raise DependencyError("building the decode engine from a checkpoint needs transformers (for the model "
                                  "config and RoPE): pip install 'sparsetorch[llm]'") from exc
        from ..export.checkpoint import _check_matches, _open, hf_config_of
        from .ckpt_pack import _decoded, read_matrix

        head_dtype = _check_options(dtype, head_dtype, layout)
        orientations = _check_activation_kernel(activation_kernel)
        ck = _open(path, max_bytes)
        cfg_dict = dict(hf_config_of(ck))
        model_type = cfg_dict.pop("model_type", None)
        try:
            hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
            with torch.device("meta"):
                skeleton = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        except Exception as exc:  # noqa: BLE001 - any failure means the stored config is unusable
            raise CheckpointError(f"{ck.path}: cannot rebuild the model from its stored config: "
                                  f"{type(exc).__name__}: {exc}") from None
        ext = _require_engine(skeleton)
        _check_matches(skeleton.state_dict(), ck, str(ck.path))
        base = skeleton.model
        layers, dims, eps = _geometry(hf_cfg, base)
        packs: dict[str, LowbitWeight] = {}
        biases: dict[str, Tensor | None] = {}
        layouts: dict[str, str] = {}
        sources: dict[str, str] = {}
        why: dict[str, str] = {}
        thr = _fused_thresholds(skeleton, layers, activation) if activation is not None else {}
        options: dict[str, dict[bool, LowbitWeight]] = {}

        def put(name: str, members: list[str], dt: str, lay: str) -> None:
            p, chosen, src = read_matrix(ck, members, dt, lay, direct=direct)
            packs[name], layouts[name], sources[name] = p, chosen, src.how
            if src.reason:
                why[name] = src.reason
            t = thr.get(name)
            if t is not None:
                import dataclasses

                options[name] = {}
                if True in orientations:  # W^T: decoded and packed again, stored positions kept
                    mats = [_decoded(ck, m) for m in members]
                    w = torch.cat([m[0] for m in mats]) if len(mats) > 1 else mats[0][0]
                    mask = torch.cat([m[1] for m in mats]) if len(mats) > 1 else mats[0][1]
                    options[name][True] = pack_lowbit(w, chosen, dt, mask=mask, transposed=True, threshold=t)
                if False in orientations:
                    options[name][False] = dataclasses.replace(p, threshold=t)

        def dense_f32(name: str) -> Tensor:
            return _decoded(ck, name)[0].contiguous()

        try:
            emb, head = "model.embed_tokens.weight", "lm_head.weight"
            put("embed", [emb], head_dtype, "dense")
            layouts["lm_head"] = "dense"
            tied = ck.infos[head].tied_to == emb or ck.infos[emb].tied_to == head
            if not tied:  # tied by value, as from_model sees it
                tied = torch.equal(dense_f32(emb), dense_f32(head))
            if not tied:
                put("lm_head", [head], head_dtype, "dense")
            norms = [dense_f32("model.norm.weight")]
            for i in range(len(layers)):
                pre = f"model.layers.{i}."
                norms += [dense_f32(pre + "input_layernorm.weight"), dense_f32(pre + "post_attention_layernorm.weight")]
                for key, members in (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                     ("o", ("self_attn.o_proj",)), ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                                     ("down", ("mlp.down_proj",))):
                    put(f"layers.{i}.{key}", [pre + m + ".weight" for m in members], dtype, layout)
                    bs = [pre + m + ".bias" for m in members]
                    if any(b in ck.infos for b in bs):
                        biases[f"layers.{i}.{key}"] = torch.cat([
                            dense_f32(b) if b in ck.infos else torch.zeros(ck.info(pre + m + ".weight").shape[0])
                            for b, m in zip(bs, members, strict=True)]).contiguous()
        except reader.ReadError as exc:
            raise CheckpointError(f"{exc}. The file is corrupt; re-export it.") from None
        if options:
            trans = _settle_activation(options, activation_kernel,
                                       lambda: _fused_levels(skeleton, layers, activation, list(options)), timer,
                                       packs, layouts)
            for name, t in trans.items():
                if t:
                    sources[name] = "repacked"
                    why[name] = "stored transposed for the activation thresholds"
            del options
        config = {"model_type": model_type, **dims, "dtype": dtype, "head_dtype": head_dtype, "layout": layout,
                  "tied_embeddings": bool(tied), "checkpoint": str(ck.path)}
        if activation is not None:
            config["activation"] = _activation_config(activation, len(thr), activation_kernel)
        eng = cls._assemble(ext, config, eps, packs, biases, norms, layouts, sources)
        eng._rope_fn = _rope_fn(type(base.rotary_emb)(config=hf_cfg))
        eng.eos_token_id = transformers.GenerationConfig.from_model_config(hf_cfg).eos_token_id
        if notice is not None:
            n_direct = sum(v == "direct" for v in sources.values())
            line = f"{n_direct} of {len(sources)} weight matrices of {ck.path} read straight into the {dtype} engine"
            if why:
                groups: dict[str, list[str]] = {}
                for name, r in why.items():
                    groups.setdefault(r, []).append(name)
                line += "; decoded and repacked: " + "; ".join(
                    f"{len(ns)} ({', '.join(ns[:2])}{', ...' if len(ns) > 2 else ''}): {r}" for r, ns in groups.items())
            notice(line)
        return eng

    @classmethod
    def _assemble(cls, ext: Any, config: dict[str, Any], eps: float, packs: dict[str, LowbitWeight],
                  biases: dict[str, Tensor | None], norms: list[Tensor], layouts: dict[str, str],
                  sources: dict[str, str]) -> DecodeEngine:
        """Hand the packed weights to the C++ engine in its order: embedding, head (the embedding's
        tensors again when tied: no second copy), final norm, then per layer its two norms and
        q/k/v, o, gate/up, down. ``norms`` = [final, ln1_0, ln2_0, ln1_1, ...]."""
        tensors: list[Tensor] = []
        meta: list[int] = [config["layers"], config["hidden"], config["heads"], config["kv_heads"],
                           config["head_dim"], config["vocab"], config["intermediate"]]
        empty = torch.empty(0)

        def add(p: LowbitWeight, bias: Tensor | None) -> None:
            fmt, dt = p.codes()
            meta.extend([fmt, dt, p.out_features, p.in_features, int(p.transposed)])
            thr = empty if p.threshold is None else torch.tensor([p.threshold], dtype=torch.float32)
            tensors.extend(p.tensors() + [bias if bias is not None else empty, thr])

        add(packs["embed"], None)
        add(packs.get("lm_head", packs["embed"]), None)
        tensors.append(norms[0])
        for i in range(config["layers"]):
            tensors += [norms[1 + 2 * i], norms[2 + 2 * i]]
            for key in ("qkv", "o", "gate_up", "down"):
                add(packs[f"layers.{i}.{key}"], biases.get(f"layers.{i}.{key}"))
        handle = ext.Engine(tensors, meta, eps)
        return cls(ext, handle, config, layouts, packs, sources)

    # ------------------------------------------------------------------ running
    def _reset(self, n: int) -> None:
        """Size the KV cache for ``n`` positions (RoPE tables grow in steps of 256, kept between calls)."""
        if n < 1:
            raise DataError("the decode engine needs at least one position.")
        if self._rope is None or self._rope[0].shape[0] < n:
            assert self._rope_fn is not None
            self._rope = self._rope_fn((n + 255) // 256 * 256)
        cos, sin = self._rope
        self._h.reset(cos[:n].contiguous(), sin[:n].contiguous())

    def logits(self, ids: Tensor, dense_prefix: int = 0) -> Tensor:
        """fp32 logits ``[T, vocab]`` of every position of one sequence ``ids [T]`` (no cache carried).

        ``dense_prefix``: the first that many positions run without the activation thresholds
        (a dense prompt, as ``generate(dense_prompt=True)`` runs it), the rest with them."""
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        p = _check_dense_prefix(dense_prefix)
        self._reset(ids.numel())
        if p == 0:
            return self._h.forward(ids, 0, True)
        if p >= ids.numel():
            return self._h.forward(ids, 0, True, False)
        return torch.cat([self._h.forward(ids[:p], 0, True, False), self._h.forward(ids[p:], p, True)])

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (every matrix once, one embedding row, the norms)."""
        return int(self._h.weight_bytes_per_token())

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        eos_token_id: int | list[int] | None = None,
        profile: bool = False,
        on_token: Callable[[int], None] | None = None,
        dense_prompt: bool = False,
    ) -> Tensor:
        """Continue one sequence ``input_ids [1, T]`` by up to ``max_new_tokens``; returns ``[1, T + n]``.

        ``dense_prompt=True`` runs the prompt without the activation thresholds and only the new
        tokens with them: the thresholds save weight reads only at one token per step, so a dense
        prompt costs no decode speed and spares the prompt's hidden states the error (TEAL's
        perplexity protocol leaves half of each sequence dense the same way). Default False: every
        token thresholded, as :func:`~sparsetorch.activation.apply_thresholds` does.

        Greedy by default; ``do_sample=True`` samples from ``softmax(logits / temperature)``
        restricted to the ``top_k`` most likely tokens (0 = all) and the smallest set whose
        probability reaches ``top_p``, drawing from ``generator``. Stops after an
        ``eos_token_id``. ``profile=True`` fills :attr:`last_stats`. ``on_token(id)`` is called
        for each new token (streaming).
        """
        ids = _check_ids(input_ids)
        if max_new_tokens < 0:
            raise DataError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if do_sample:
            _check_sampling(temperature, top_k, top_p)
        eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        prompt = ids[0].to(torch.int64).contiguous()
        t = prompt.numel()
        out = [int(v) for v in prompt]
        if max_new_tokens == 0:
            return ids.clone()
        self._reset(t + max_new_tokens)
        self._h.set_profile(bool(profile))
        token_s: list[float] = []
        fwd = self._h.forward
        logits = fwd(prompt, 0, False, not dense_prompt)
        pos = t
        for i in range(max_new_tokens):
            t0 = time.perf_counter() if profile else 0.0
            nxt = _pick(logits[0], do_sample, temperature, top_k, top_p, generator)
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if nxt in eos or i == max_new_tokens - 1:
                break
            logits = fwd(torch.tensor([nxt], dtype=torch.int64), pos, False)
            pos += 1
            if profile:
                token_s.append(time.perf_counter() - t0)
        if profile:
            total, lin, attn, calls = self._h.stats()
            self.last_stats = DecodeStats(int(calls), total, lin, attn, token_s)
            self._h.set_profile(False)
        return torch.tensor([out], dtype=ids.dtype)

    def layout_counts(self) -> dict[str, int]:
        """How many matrices use each layout (``{"bitmask-t": 120, "dense": 2, ...}``)."""
        from collections import Counter

        return dict(sorted(Counter(self.layouts.values()).items()))

    def __repr__(self) -> str:
        counts = self.layout_counts()
        src = ""
        if any(v != "packed" for v in self.sources.values()):
            direct = sum(v == "direct" for v in self.sources.values())
            src = f", from checkpoint: {direct} read directly, {len(self.sources) - direct} repacked"
        return (f"DecodeEngine({self.config['model_type']}, {self.config['layers']} layers, dtype={self.config['dtype']}, "
                f"head={self.config['head_dtype']}, layouts={counts}, {self.weight_bytes_per_token / 1e6:.1f} MB/token{src})")


def _check_ids(input_ids: Tensor) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise DataError(f"the decode engine takes one sequence, input_ids of shape [1, T>=1]; got {shape}.")
    return input_ids


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise DataError(f"temperature must be > 0 when sampling, got {temperature}.")
    if top_k < 0:
        raise DataError(f"top_k must be >= 0 (0 = no limit), got {top_k}.")
    if not 0 < top_p <= 1:
        raise DataError(f"top_p must be in (0, 1], got {top_p}.")


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> int:
    """The next token from fp32 logits ``[vocab]``: argmax, or a sample (temperature, top-k, top-p)."""
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits / float(temperature)
    if top_k and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_s, idx = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_s, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_s, -1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_s = sorted_s.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, idx, sorted_s)
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_dense_prefix(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"dense_prefix must be a whole number of positions >= 0, got {n!r}.")
    return n


class EngineLM(nn.Module):
    """A :class:`DecodeEngine` behind a causal-LM ``forward(input_ids) -> .logits`` (for perplexity).

    Each row of ``input_ids`` is scored on its own with a fresh cache (batched prompt path);
    ``dense_prefix`` positions of each row run without the activation thresholds (a dense prompt:
    score the rest with ``perplexity(score_from=dense_prefix)``).
    """

    def __init__(self, engine: DecodeEngine, dense_prefix: int = 0) -> None:
        super().__init__()
        self.engine = engine
        self.dense_prefix = _check_dense_prefix(dense_prefix)

    def forward(self, input_ids: Tensor, **_: Any) -> Any:
        from types import SimpleNamespace

        rows = [self.engine.logits(r, self.dense_prefix) for r in input_ids.reshape(input_ids.shape[0], -1)]
        return SimpleNamespace(logits=torch.stack(rows))


def _notice(msg: str) -> None:
    print(f"sparsetorch: {msg}", file=sys.stderr)


def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    *,
    dtype: str = "fp32",
    head_dtype: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: Tensor | None = None,
    engine: DecodeEngine | None = None,
    notice: Callable[[str], None] = _notice,
    dense_prompt: bool = False,
    activation: Any = None,
) -> Tensor:
    """Generate with the fast engine when it can run ``model``; otherwise Hugging Face ``generate``.

    ``activation``: TEAL thresholds (:class:`~sparsetorch.activation.ActivationThresholds`, not
    installed as hooks) applied on whichever path runs: built into the engine this call builds,
    or installed as hooks on ``model`` for the fallback (removed afterwards), so a model the
    engine cannot run still decodes with its activation sparsity. A pre-built ``engine`` must
    carry them already (``DecodeEngine.from_model(..., activation=...)``).

    ``dense_prompt``: passed to :meth:`DecodeEngine.generate` (the prompt without the engine's
    activation thresholds); the fallback cannot do that and refuses it (``ModelError``).

    ``eos_token_id`` defaults to the model's ``generation_config.eos_token_id``. A model the
    engine cannot run (see :func:`decode_support`), batch > 1, a padded ``attention_mask`` or a
    missing compiler go to ``model.generate`` after one line through ``notice`` (stderr by
    default) naming the reason. A low-bit ``dtype`` on the fallback is refused
    (:class:`~sparsetorch.errors.ModelError`): HF would silently run fp32 instead.
    Returns ``[B, T + n]`` token ids.
    """
    from ..errors import DependencyError

    check_value_dtype(dtype)
    if head_dtype is not None:
        check_value_dtype(head_dtype)
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    reason: str | None = None
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise DataError("input_ids must be a [batch, T] tensor of token ids.")
    if engine is not None and activation is not None and "activation" not in engine.config:
        raise DataError("the engine given was built without activation thresholds; build it with "
                        "DecodeEngine.from_model(model, ..., activation=thresholds) or pass no engine.")
    if input_ids.shape[0] != 1:
        reason = f"batch of {input_ids.shape[0]} sequences (the fast path decodes one)"
    elif attention_mask is not None and not bool(attention_mask.all()):
        reason = "the attention mask has padding"
    if reason is None and engine is None:
        try:
            engine = DecodeEngine.from_model(model, dtype, head_dtype=head_dtype, activation=activation)
        except (ModelError, DependencyError) as exc:
            reason = str(exc)
    if reason is None and engine is not None:
        return engine.generate(input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator, eos_token_id=eos_token_id, dense_prompt=dense_prompt)
    if dense_prompt:
        raise ModelError(f"a dense prompt needs the fast decode path, which cannot run this model ({reason}); "
                         "drop --dense-prompt (transformers' generate thresholds every token).")
    if dtype != "fp32" or (head_dtype or "fp32") != "fp32":
        raise ModelError(f"--dtype {dtype} needs the fast decode path, which cannot run this model ({reason}); "
                         "use --dtype fp32 to run it with transformers' generate.")
    notice(f"fast decode path not used ({reason}); falling back to transformers generate")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
        kwargs["pad_token_id"] = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    hooks = None
    if activation is not None:  # the same thresholds, as hooks (every token, as the engine's default)
        from ..activation import apply_thresholds

        hooks = apply_thresholds(model, activation, count=False)
    try:
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    finally:
        if hooks is not None:
            hooks.remove()
