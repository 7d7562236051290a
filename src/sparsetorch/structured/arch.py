"""Where the removable structures of a decoder-only LM live, and how to cut them out.

Structured pruning needs more than the weights: it must know which rows of ``q_proj`` belong to
which query head, which KV head a query head reads (grouped-query attention), which columns of
``down_proj`` match which rows of ``gate_proj``/``up_proj``, and which config fields describe
the shapes, so that the smaller model reloads with plain ``transformers``. This module maps the
Llama family layout (Llama, Mistral, Qwen2/3, SmolLM, ...): blocks in an ``nn.ModuleList``,
each with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (``gate`` optional).
Anything else raises :class:`~sparsetorch.errors.ModelError` naming what is missing.

Query head ``h`` reads KV head ``h // G`` (``G = heads / kv_heads``, ``repeat_kv`` in
transformers), so heads are removed the same way in every KV group (``G`` stays an integer), or
a whole KV group goes with all of its query heads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..oneshot.blocks import find_decoder_blocks

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Decoder:
    """The structure map of one model (see the module docstring); read it with :func:`decoder_of`."""

    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    config: Any
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    gated: bool

    @property
    def group(self) -> int:
        """Query heads per KV head (``G``)."""
        return self.heads // self.kv_heads

    def attn(self, i: int) -> nn.Module:
        return self.blocks[i].self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.blocks[i].mlp

    def block_params(self) -> int:
        """Parameters of the decoder blocks (the embedding, final norm and LM head not counted)."""
        return sum(p.numel() for p in self.blocks.parameters())

    def head_cost(self) -> int:
        """Parameters one query head owns: its ``q_proj`` rows and ``o_proj`` columns."""
        return 2 * self.hidden * self.head_dim

    def kv_cost(self) -> int:
        """Parameters one KV head owns: its ``k_proj`` and ``v_proj`` rows."""
        return 2 * self.hidden * self.head_dim

    def channel_cost(self) -> int:
        """Parameters one MLP channel owns: a row of gate/up and a column of down."""
        return (3 if self.gated else 2) * self.hidden


def _linear(mod: nn.Module, name: str, where: str) -> nn.Linear:
    lin = getattr(mod, name, None)
    if not isinstance(lin, nn.Linear):
        raise ModelError(f"{where} has no nn.Linear {name!r}: structured pruning maps Llama-style blocks "
                         f"(self_attn.q_proj/k_proj/v_proj/o_proj, mlp.gate_proj/up_proj/down_proj); "
                         f"this architecture keeps them elsewhere (fused qkv or a different layout).")
    return lin


def decoder_of(model: nn.Module) -> Decoder:
    """Map ``model``'s blocks, heads and channels; :class:`ModelError` naming what is missing."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no .config: structured pruning works on Hugging Face "
                         "causal LMs whose config gives the head counts and sizes.")
    missing = [f for f in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers")
               if not isinstance(getattr(config, f, None), int)]
    if missing:
        raise ModelError(f"{type(model).__name__}'s config has no {', '.join(missing)}: structured pruning "
                         "needs them to describe the smaller model.")
    name, blocks = find_decoder_blocks(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    gated = False
    for i, block in enumerate(blocks):
        where = f"block {i} ({type(block).__name__})"
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None:
            raise ModelError(f"{where} has no {'self_attn' if attn is None else 'mlp'} submodule: "
                             "structured pruning maps Llama-style blocks only.")
        q, k, v, o = (_linear(attn, n, f"{where}.self_attn") for n in _ATTN)
        up, down = _linear(mlp, "up_proj", f"{where}.mlp"), _linear(mlp, "down_proj", f"{where}.mlp")
        gated = isinstance(getattr(mlp, "gate_proj", None), nn.Linear)
        shapes_ok = (q.out_features == heads * head_dim and k.out_features == kv_heads * head_dim
                     and v.out_features == kv_heads * head_dim and o.in_features == heads * head_dim
                     and down.in_features == up.out_features == config.intermediate_size)
        if not shapes_ok:
            raise ModelError(f"{where}'s projection shapes do not match its config (heads {heads}, kv heads "
                             f"{kv_heads}, head_dim {head_dim}, intermediate {config.intermediate_size}); "
                             "per-layer shapes are not supported.")
    if heads % kv_heads:
        raise ModelError(f"{heads} query heads do not split evenly over {kv_heads} KV heads.")
    return Decoder(model, name, blocks, config, heads, kv_heads, head_dim, config.hidden_size,
                   config.intermediate_size, gated)


# --- surgery: build smaller Linear layers and swap them in --------------------------------------


def _new_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def keep_rows(lin: nn.Linear, rows: Tensor, with_bias: bool) -> nn.Linear:
    """A Linear with only output features ``rows`` (a zero bias added when ``with_bias``)."""
    w = lin.weight.detach()[rows]
    b = lin.bias.detach()[rows] if lin.bias is not None else (w.new_zeros(w.shape[0]) if with_bias else None)
    return _new_linear(w, b)


def keep_cols(lin: nn.Linear, cols: Tensor, with_bias: bool, bias_add: Tensor | None = None) -> nn.Linear:
    """A Linear with only input features ``cols``; ``bias_add`` is added to the bias (compensation)."""
    w = lin.weight.detach()[:, cols]
    b = lin.bias.detach().clone() if lin.bias is not None else (
        w.new_zeros(w.shape[0]) if with_bias or bias_add is not None else None)
    if bias_add is not None:
        b = b + bias_add.to(b.dtype)
    return _new_linear(w, b)


def head_rows(heads: Sequence[int], head_dim: int, device: torch.device | None = None) -> Tensor:
    """Row (or column) indices of ``heads`` in a ``[heads * head_dim]`` projection, in order."""
    idx = [h * head_dim + j for h in heads for j in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _set_attrs(mod: nn.Module, **values: int) -> None:
    for k, v in values.items():
        if hasattr(mod, k):
            setattr(mod, k, v)


def shrink_attention(dec: Decoder, i: int, keep_heads: Sequence[int], keep_kv: Sequence[int],
                     with_bias: bool, o_bias_add: Tensor | None = None) -> None:
    """Keep query heads ``keep_heads`` (grouped by KV head, the same count per group) and KV heads
    ``keep_kv`` of block ``i``; ``o_bias_add`` compensates the removed heads (FLAP)."""
    attn = dec.attn(i)
    dev = attn.q_proj.weight.device
    q_rows, kv_rows = head_rows(keep_heads, dec.head_dim, dev), head_rows(keep_kv, dec.head_dim, dev)
    attn.q_proj = keep_rows(attn.q_proj, q_rows, with_bias)
    attn.k_proj = keep_rows(attn.k_proj, kv_rows, with_bias)
    attn.v_proj = keep_rows(attn.v_proj, kv_rows, with_bias)
    attn.o_proj = keep_cols(attn.o_proj, q_rows, with_bias, o_bias_add)
    n_q, n_kv = len(keep_heads), len(keep_kv)
    _set_attrs(attn, num_key_value_groups=n_q // n_kv, num_heads=n_q, num_attention_heads=n_q,
               num_key_value_heads=n_kv)


def shrink_mlp(dec: Decoder, i: int, keep: Tensor, with_bias: bool, down_bias_add: Tensor | None = None) -> None:
    """Keep intermediate channels ``keep`` of block ``i``'s MLP; ``down_bias_add`` compensates."""
    mlp = dec.mlp(i)
    if dec.gated:
        mlp.gate_proj = keep_rows(mlp.gate_proj, keep, with_bias)
    mlp.up_proj = keep_rows(mlp.up_proj, keep, with_bias)
    mlp.down_proj = keep_cols(mlp.down_proj, keep, with_bias, down_bias_add)
    _set_attrs(mlp, intermediate_size=int(keep.numel()))


def drop_blocks(dec: Decoder, remove: Sequence[int]) -> None:
    """Remove whole blocks; the rest are renumbered (``layer_idx``, used by the KV cache) and the
    config's ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow."""
    gone = set(remove)
    kept = [i for i in range(len(dec.blocks)) if i not in gone]
    new = nn.ModuleList(dec.blocks[i] for i in kept)
    for j, block in enumerate(new):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    parent_name, _, attr = dec.blocks_name.rpartition(".")
    parent = dec.model.get_submodule(parent_name) if parent_name else dec.model
    setattr(parent, attr, new)
    dec.blocks = new
    cfg = dec.config
    cfg.num_hidden_layers = len(kept)
    for key in PER_LAYER_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list):
            setattr(cfg, key, [value[i] for i in kept])


#: config fields that hold one entry per decoder layer (they follow a block removal)
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def check_blocks_removable(dec: Decoder) -> None:
    """:class:`ModelError` when the config describes its layers in a way block removal cannot
    follow (a per-layer list of the wrong length, or a list of layer indices)."""
    n = len(dec.blocks)
    for key, value in vars(dec.config).items():
        if not isinstance(value, list) or "layer" not in key:
            continue
        if key in PER_LAYER_KEYS and len(value) == n:
            continue
        raise ModelError(f"config.{key} ({value!r}) describes the layers in a way block removal does not map; "
                         "remove heads/channels only (--what heads,channels).")


#: the projection whose bias takes FLAP's compensation, per kind of structure
COMPENSATED = {"heads": "self_attn.o_proj", "channels": "mlp.down_proj"}
_PROJECTIONS = tuple(f"self_attn.{n}" for n in _ATTN) + tuple(f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj"))


def biased_projections(dec: Decoder, attention: bool, mlp: bool) -> set[str]:
    """The projections (``"self_attn.o_proj"``, ``"mlp.down_proj"`` ...) that ``type(model)``
    builds with a bias once the config says ``attention_bias`` (when ``attention``) and ``mlp_bias``
    (when ``mlp``): what ``from_pretrained`` will load a saved bias into.

    Some classes ignore the flags (Mistral and Qwen2 build ``o_proj`` / ``down_proj`` with
    ``bias=False`` whatever the config says; Qwen2 builds ``q/k/v_proj`` with a bias regardless),
    so this builds a one-layer copy of the model from the config on the ``meta`` device (no
    memory, no weights) and looks. :class:`ModelError` when that copy cannot be built."""
    cfg = copy.deepcopy(dec.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    for key in PER_LAYER_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, value[:1])
    if attention:
        cfg.attention_bias = True
    if mlp:
        cfg.mlp_bias = True
    try:
        with torch.device("meta"):
            probe = type(dec.model)(cfg)
        block = find_decoder_blocks(probe)[1][0]
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot confirm the biases survive a reload
        raise ModelError(f"could not build a one-layer {type(dec.model).__name__} from its config to check which "
                         f"projections keep a bias after save/reload ({type(exc).__name__}: {exc}); bias "
                         "compensation needs that: pass compensate=False (CLI: --no-compensate).") from exc
    found = set()
    for name in _PROJECTIONS:
        try:
            lin = block.get_submodule(name)
        except AttributeError:
            continue
        if getattr(lin, "bias", None) is not None:
            found.add(name)
    return found


def check_compensation(dec: Decoder, kinds: Sequence[str]) -> set[str]:
    """Before any change: the biased projections (:func:`biased_projections`) for compensating the
    width ``kinds`` (``heads`` -> ``o_proj``, ``channels`` -> ``down_proj``), or :class:`ModelError`
    naming the model type and the projection whose class drops the bias on reload."""
    width = [k for k in kinds if k in COMPENSATED]
    found = biased_projections(dec, attention="heads" in width, mlp="channels" in width)
    for kind in width:
        proj = COMPENSATED[kind]
        if proj not in found:
            model_type = getattr(dec.config, "model_type", None) or "?"
            raise ModelError(
                f"{type(dec.model).__name__} (model_type {model_type!r}) builds {proj} without a bias whatever its "
                f"config says, so the bias compensation for removed {kind} would be dropped when the saved model is "
                f"reloaded and it would silently compute something else. Pass compensate=False (CLI: "
                "--no-compensate).")
    return found


def set_biases(dec: Decoder, attention: bool, mlp: bool, biased: set[str] | None = None) -> None:
    """Give the projections of the named kinds a bias (zeros where they had none) and say so in the
    config (``attention_bias`` / ``mlp_bias``), so that the saved model reloads exactly. ``biased``
    (from :func:`check_compensation`) limits this to the projections the model class builds with a
    bias; ``None`` gives every projection of the kind one (the Llama layout)."""
    for i in range(len(dec.blocks)):
        mods = ([(dec.attn(i), "self_attn", n) for n in _ATTN] if attention else []) + (
            [(dec.mlp(i), "mlp", n) for n in ("gate_proj", "up_proj", "down_proj") if hasattr(dec.mlp(i), n)]
            if mlp else [])
        for parent, kind, name in mods:
            lin = getattr(parent, name)
            if lin.bias is None and (biased is None or f"{kind}.{name}" in biased):
                setattr(parent, name, keep_rows(lin, torch.arange(lin.out_features, device=lin.weight.device), True))
    if attention:
        dec.config.attention_bias = True
    if mlp:
        dec.config.mlp_bias = True


def refresh_config(dec: Decoder, heads: int, kv_heads: int, intermediate: int) -> None:
    """Write the new uniform shapes into the config (``head_dim`` explicitly: it no longer equals
    ``hidden_size / num_attention_heads``)."""
    cfg = dec.config
    cfg.head_dim = dec.head_dim
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = heads, kv_heads, intermediate
    dec.heads, dec.kv_heads, dec.intermediate = heads, kv_heads, intermediate
