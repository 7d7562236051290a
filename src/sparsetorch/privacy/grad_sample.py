"""Per-sample gradients restricted to a mask, clipped on their live norm, summed.

DP-SGD needs, for every example i of a batch, the norm of its gradient g_i and then the sum of
the clipped gradients ``sum_i g_i * min(1, C / ||g_i||)``. On a sparse model both are taken over
the *live* coordinates only: ``g_i ⊙ M``. This module computes them from two things a normal
forward/backward already has, per layer: the layer's input ``a`` and the gradient ``g`` of the
per-sample losses with respect to the layer's output. Nothing else of the model is needed, and
no per-sample copy of a whole weight matrix is kept:

* ``nn.Linear`` on 2-D input (one vector per example): the per-sample gradient is the outer
  product ``g_i a_iᵀ``, so its masked squared norm is
  ``sum_jk M_jk g_ij² a_ik² = (g_i²)ᵀ M (a_i²)`` -- one matrix product, exact, for any mask
  (``||g_i||²·||a_i||²`` without one). The clipped sum is ``((c ⊙ g)ᵀ a) ⊙ M`` with
  ``c_i = min(1, C/||g_i||)``.
* ``nn.Linear`` on inputs with more dimensions (sequences) and ``nn.Conv1d/2d`` (through
  ``unfold``): per-sample gradients are materialised in chunks of examples that fit
  ``chunk_bytes``, only to take their masked norms; the clipped sum is again one contraction
  with ``c`` folded into ``g``.

The norm of example i is over *all* trainable parameters of the model together (flat clipping,
as in Abadi et al. and Opacus's default). Frozen parameters (``requires_grad=False``) are left
out of norms and sums. A trainable parameter in any other kind of layer raises
:class:`~sparsetorch.errors.PrivacyError` naming it (freeze it or replace the layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PrivacyError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: upper bound on the memory of one chunk of materialised per-sample gradients
CHUNK_BYTES = 256 * 2**20


@dataclass
class _Layer:
    """One supported module with at least one trainable parameter."""

    name: str
    module: nn.Module
    weight: str | None  # full parameter names, None when frozen
    bias: str | None


def dp_layers(model: nn.Module) -> list[_Layer]:
    """The supported layers that hold trainable parameters; every trainable parameter must
    belong to one of them (directly), else :class:`PrivacyError`."""
    layers: list[_Layer] = []
    for mname, mod in model.named_modules():
        direct = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not direct:
            continue
        prefix = f"{mname}." if mname else ""
        if not isinstance(mod, SUPPORTED):
            names = ", ".join(prefix + n for n, _ in direct)
            raise PrivacyError(
                f"DP-SGD computes per-sample gradients for nn.Linear, nn.Conv1d and nn.Conv2d only; "
                f"{names} belong to a {type(mod).__name__}. Freeze them (requires_grad=False) or "
                "replace the layer (normalisation layers: GroupNorm/LayerNorm without affine)."
            )
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
            mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)
        ):
            raise PrivacyError(
                f"{mname}: DP-SGD supports convolutions with groups=1, padding_mode='zeros' and "
                f"numeric padding, got groups={mod.groups}, padding_mode={mod.padding_mode!r}, "
                f"padding={mod.padding!r}."
            )
        trainable = {n for n, _ in direct}
        layers.append(_Layer(mname, mod, prefix + "weight" if "weight" in trainable else None,
                             prefix + "bias" if "bias" in trainable else None))
    if not layers:
        raise PrivacyError("the model has no trainable parameters: nothing for DP-SGD to train.")
    return layers


def _unfold(mod: nn.Module, a: Tensor) -> Tensor:
    """Input patches of a convolution, (B, C_in * prod(kernel), L)."""
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(-2)
        k, d, p, s = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
    else:
        k, d, p, s = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    return F.unfold(a, k, dilation=d, padding=p, stride=s)


def _as_matrices(layer: _Layer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(a, g, flat): flat=True gives (B, in), (B, out); else (B, in, L), (B, out, L) such that
    the per-sample weight gradient is ``g_i @ a_iᵀ`` (reshaped to the weight)."""
    mod = layer.module
    if isinstance(mod, nn.Linear):
        if a.dim() == 2:
            return a, g, True
        b = a.shape[0]
        return a.reshape(b, -1, a.shape[-1]).transpose(1, 2), g.reshape(b, -1, g.shape[-1]).transpose(1, 2), False
    b = a.shape[0]
    return _unfold(mod, a), g.reshape(b, g.shape[1], -1), False


def _chunk(b: int, per_sample: int, chunk_bytes: int) -> int:
    return max(1, min(b, chunk_bytes // max(per_sample * 4, 1)))


@dataclass
class _Prepared:
    """One layer's recorded tensors as matrices, and its per-sample weight gradients when they
    were materialised in one piece (then the clipped sum reuses them)."""

    layer: _Layer
    a: Tensor
    g: Tensor
    flat: bool
    per_sample: Tensor | None = None  # (B, out, in), masked


def layer_norms_sq(layer: _Layer, a: Tensor, g: Tensor, masks: Mapping[str, Tensor],
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[Tensor, _Prepared]:
    """Squared norms (B,) of each example's masked gradient over this layer's trainable params,
    and the prepared tensors for :func:`layer_clipped_sum`."""
    a, g, flat = _as_matrices(layer, a.float(), g.float())
    prep = _Prepared(layer, a, g, flat)
    out = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    if layer.bias is not None:
        gb = g if flat else g.sum(-1)
        mb = masks.get(layer.bias)
        out += (gb.square() * mb.to(gb.dtype).flatten() if mb is not None else gb.square()).sum(1)
    if layer.weight is None:
        return out, prep
    m = masks.get(layer.weight)
    if flat:
        if m is None:
            return out + g.square().sum(1) * a.square().sum(1), prep
        return out + ((g.square() @ m.to(g.dtype).reshape(g.shape[1], -1)) * a.square()).sum(1), prep
    m2 = None if m is None else m.reshape(g.shape[1], -1)
    step = _chunk(a.shape[0], g.shape[1] * a.shape[1], chunk_bytes)
    for i in range(0, a.shape[0], step):
        gs = torch.bmm(g[i:i + step], a[i:i + step].transpose(1, 2))  # (b, out, in)
        if m2 is not None:
            gs = gs * m2
        out[i:i + step] += gs.square().sum((1, 2))
        if step >= a.shape[0]:  # all of the batch in one chunk: keep it for the sum
            prep.per_sample = gs
    return out, prep


def layer_clipped_sum(prep: _Prepared, scale: Tensor, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sum_i scale_i * (per-sample gradient_i ⊙ M)`` for this layer's trainable params."""
    layer, a, g, flat = prep.layer, prep.a, prep.g, prep.flat
    out: dict[str, Tensor] = {}
    if layer.weight is not None:
        w = layer.module.weight
        m = masks.get(layer.weight)
        if prep.per_sample is not None:  # already masked
            s = (scale @ prep.per_sample.reshape(scale.shape[0], -1)).reshape(w.shape)
        else:
            gc = g * scale.reshape(-1, *([1] * (g.dim() - 1)))
            s = (gc.T @ a if flat else torch.einsum("bol,bkl->ok", gc, a)).reshape(w.shape)
            s = s * m if m is not None else s
        out[layer.weight] = s
    if layer.bias is not None:
        gb = g if flat else g.sum(-1)
        s = scale @ gb
        m = masks.get(layer.bias)
        out[layer.bias] = s * m if m is not None else s
    return out


class PerSampleClipper:
    """Captures each supported layer's input and output during a forward, then clips.

    Usage per batch::

        with clipper.capture():
            losses = loss_fn(model(x), y)          # (B,) per-sample losses
        grads, norms = clipper.clipped_sum(losses)  # summed clipped masked grads, per-sample norms
    """

    def __init__(self, model: nn.Module, clip: float, masks: Mapping[str, Tensor] | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.model = model
        self.clip = float(clip)
        self.layers = dp_layers(model)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.masks = {n: m for n, m in (masks or {}).items() if n in names}
        self.chunk_bytes = int(chunk_bytes)
        self._records: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters that :meth:`clipped_sum` returns gradients for."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for layer in self.layers for n in (layer.weight, layer.bias) if n}

    def capture(self) -> _Capture:
        """Context manager: record the supported layers' inputs and outputs of one forward."""
        return _Capture(self)

    def clipped_sum(self, losses: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """(summed clipped gradients by parameter name, per-sample live norms before clipping)."""
        if losses.dim() != 1:
            raise PrivacyError(f"DP-SGD needs one loss per example (shape (B,)), got shape "
                               f"{tuple(losses.shape)}; use reduction='none'.")
        recs = []
        for layer in self.layers:
            r = self._records.get(layer.name, [])
            if len(r) != 1:
                raise PrivacyError(
                    f"layer {layer.name!r} ran {len(r)} times in the captured forward; DP-SGD's "
                    "per-sample gradients need each trainable layer to run exactly once per forward "
                    "(freeze a layer that is skipped, untie a layer that is reused)."
                )
            recs.append(r[0])
        outs = [o for _, o in recs]
        gouts = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        sq = torch.zeros(losses.shape[0], device=losses.device)
        preps = []
        for layer, (a, o), g in zip(self.layers, recs, gouts):
            g = torch.zeros_like(o) if g is None else g.detach()
            layer_sq, prep = layer_norms_sq(layer, a, g, self.masks, self.chunk_bytes)
            sq += layer_sq
            preps.append(prep)
        norms = sq.sqrt()
        scale = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        grads: dict[str, Tensor] = {}
        for prep in preps:
            grads.update(layer_clipped_sum(prep, scale, self.masks))
        self._records = {}
        return grads, norms


class _Capture:
    def __init__(self, clipper: PerSampleClipper) -> None:
        self.c = clipper
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> PerSampleClipper:
        self.c._records = {}
        for layer in self.c.layers:
            def hook(_m: nn.Module, args: tuple, out: Tensor, _n: str = layer.name) -> None:
                self.c._records.setdefault(_n, []).append((args[0].detach(), out))
            self.handles.append(layer.module.register_forward_hook(hook))
        return self.c

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
