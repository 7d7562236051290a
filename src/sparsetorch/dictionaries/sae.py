"""Sparse autoencoders: TopK, BatchTopK and JumpReLU, one module.

Parameterisation (shared by every reference implementation)::

    x_s   = x / scale                                     (scale stored with the SAE, see harvest.py)
    pre   = W_enc (x_s - b_dec) + b_enc                   W_enc [width, d]
    z     = act(pre)                                      sparse, [width]
    x_hat = (W_dec^T z + b_dec) * scale                   W_dec [width, d], rows of unit norm

``act`` per kind:

* ``topk`` -- keep the ``k`` largest of ``ReLU(pre)`` per token (Gao et al. 2024): L0 <= k exactly.
* ``batchtopk`` -- keep the ``k * B`` largest of the batch's ``ReLU(pre)`` (Bussmann et al. 2024);
  at evaluation (``module.eval()``) a single learned threshold ``theta`` replaces the batch rule:
  ``z = pre * [pre > theta]``, so a token's code no longer depends on its batch.
* ``jumprelu`` -- ``z = pre * H(pre - theta_j)`` with a learned threshold per latent
  (Rajamanoharan et al. 2024), trained with straight-through threshold gradients.

Training-time helpers live here too because they are part of the definition: the sparse
encoder gradient (only the selected pre-activations carry gradient, so the encoder's weight
gradient costs ``B * k * d``, not ``B * width * d``), the decoder decode by ``embedding_bag``,
unit-norm decoder rows and the removal of the gradient component parallel to them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DictionaryError

KINDS = ("topk", "batchtopk", "jumprelu")
WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
FORMAT = "sparsetorch-sae"
VERSION = 1


@dataclass
class SAEConfig:
    """What defines an SAE (saved beside its weights).

    ``scale`` divides inputs before encoding (and multiplies reconstructions); ``site`` and
    ``model`` record where the activations came from (informational, used by ``sae eval``).
    ``jump_bandwidth`` is the JumpReLU rectangle-kernel width epsilon (SAELens's 0.05), ``theta_init``
    its initial threshold before training sets it from data (both in scaled units). ``max_norm``
    (raw units): tokens whose activation norm exceeds it are *sink tokens* (massive activations,
    hundreds of times the median norm) that the SAE was not trained on; metrics skip them and
    splicing leaves them unchanged (None: no such rule).
    """

    d: int
    width: int
    kind: str = "topk"
    k: int = 32
    scale: float = 1.0
    site: str = ""
    model: str = ""
    jump_bandwidth: float = 0.05
    theta_init: float = 0.001
    max_norm: float | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise DictionaryError(f"SAE kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}.")
        if self.d < 1 or self.width < 1:
            raise DictionaryError(f"d and width must be positive, got d={self.d}, width={self.width}.")
        if not 1 <= self.k < self.width:
            raise DictionaryError(f"k must be in 1..width-1 (k={self.k}, width={self.width}): with k >= width "
                                  "nothing is sparse. Lower k or widen the dictionary.")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise DictionaryError(f"scale must be a positive finite number, got {self.scale}.")
        if self.max_norm is not None and not self.max_norm > 0:
            raise DictionaryError(f"max_norm must be positive or None, got {self.max_norm}.")
        if self.jump_bandwidth <= 0 or self.theta_init <= 0:
            raise DictionaryError("jump_bandwidth and theta_init must be positive.")


class Code(NamedTuple):
    """A batch's sparse code as (token, latent, value) triples, grouped by token.

    ``offsets[b]`` is where token ``b``'s entries start in ``latent``/``value`` (embedding-bag
    layout). ``value`` carries gradient when the encoder does."""

    token: Tensor
    latent: Tensor
    value: Tensor
    offsets: Tensor
    batch: int
    #: JumpReLU in training: mean L0 per token whose gradient w.r.t. the thresholds is the
    #: straight-through one of ``sum_j H(pre_j - theta_j)`` (None otherwise)
    l0_train: Tensor | None = None

    def l0(self) -> Tensor:
        """Non-zero latents per token ``[batch]``."""
        return torch.bincount(self.token[self.value != 0], minlength=self.batch)


class _PairEncode(torch.autograd.Function):
    """Pre-activations at selected (token, latent) pairs, with a gradient that touches only them.

    forward(x_c, W_enc, b_enc, token, latent, pre_vals) returns ``pre_vals`` (already computed
    by the dense forward, so nothing is recomputed); backward scatters the pairs' gradient:
    ``dW_enc[j] = sum_t g_tj x_c[t]``, ``db_enc[j] = sum_t g_tj``, ``dx_c[t] = sum_j g_tj W_enc[j]``,
    each by one ``embedding_bag`` (no [pairs, d] temporary)."""

    @staticmethod
    def forward(ctx: Any, x_c: Tensor, w: Tensor, b: Tensor, token: Tensor, latent: Tensor,
                pre_vals: Tensor) -> Tensor:
        ctx.save_for_backward(x_c, w, token, latent)
        return pre_vals.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x_c, w, token, latent = ctx.saved_tensors
        n = w.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            order = torch.argsort(latent, stable=True)
            counts = torch.bincount(latent, minlength=n)
            offs = torch.cumsum(counts, 0) - counts
            gs = g[order].to(x_c.dtype)
            if ctx.needs_input_grad[1]:
                gw = F.embedding_bag(token[order], x_c, offs, mode="sum", per_sample_weights=gs)
            if ctx.needs_input_grad[2]:
                gb = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, latent, g)
        if ctx.needs_input_grad[0]:
            counts = torch.bincount(token, minlength=x_c.shape[0])
            offs = torch.cumsum(counts, 0) - counts
            gx = F.embedding_bag(latent, w, offs, mode="sum", per_sample_weights=g.to(w.dtype))
        return gx, gw, gb, None, None, None


class _JumpReLU(torch.autograd.Function):
    """``z = pre * H(pre - theta)``; d/dtheta by the rectangle kernel of width ``eps``:
    ``-(theta/eps) K((pre - theta)/eps)``, K(u) = 1 for |u| < 1/2 (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((pre - theta).abs() < eps / 2).to(g.dtype)
        g_theta = (-(theta / eps) * near * g).sum(0)
        return g * (pre > theta).to(g.dtype), g_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)``; gradient only to theta: ``-(1/eps) K((pre - theta)/eps)``."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * near * g).sum(0), None


def jumprelu(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """JumpReLU with straight-through threshold gradients (see :class:`_JumpReLU`)."""
    return _JumpReLU.apply(pre, theta, eps)


def step(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """Heaviside ``H(pre - theta)`` with the straight-through threshold gradient."""
    return _Step.apply(pre, theta, eps)


def _code_from_flat(flat: Tensor, batch: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(token, latent, offsets) of flat indices ``token * width + latent``, sorted by token."""
    flat = torch.sort(flat).values
    token, latent = flat // width, flat % width
    counts = torch.bincount(token, minlength=batch)
    return token, latent, torch.cumsum(counts, 0) - counts


class SparseAutoencoder(nn.Module):
    """A TopK / BatchTopK / JumpReLU sparse autoencoder (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.empty(cfg.width, cfg.d).uniform_(-1.0, 1.0, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.clone())  # tied initialisation W_enc = W_dec
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d))
        if cfg.kind == "jumprelu":
            self.log_theta = nn.Parameter(torch.full((cfg.width,), math.log(cfg.theta_init)))
        # BatchTopK's inference threshold (scaled units); NaN until learned
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))

    # --- encoding -----------------------------------------------------------------------------
    def _center(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d:
            raise DictionaryError(f"the SAE expects activations of width {self.cfg.d}, got {x.shape[-1]}.")
        return x.to(self.W_enc.dtype) / self.cfg.scale - self.b_dec

    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc (x/scale - b_dec) + b_enc`` for a batch ``[B, d]`` of raw activations."""
        return F.linear(self._center(x), self.W_enc, self.b_enc)

    def theta(self) -> Tensor:
        """Per-latent thresholds (JumpReLU) or the BatchTopK inference threshold."""
        if self.cfg.kind == "jumprelu":
            return self.log_theta.exp()
        return self.threshold.to(self.W_enc.dtype)

    def encode(self, x: Tensor, *, use_threshold: bool | None = None) -> Code:
        return self.encode_with_pre(x, use_threshold=use_threshold)[0]

    def encode_with_pre(self, x: Tensor, *, use_threshold: bool | None = None) -> tuple[Code, Tensor]:
        """The sparse code of raw activations ``x [B, d]``. Gradients flow to the encoder only
        through the selected pre-activations. BatchTopK uses its learned threshold when
        ``use_threshold`` (default: in eval mode); JumpReLU always uses its thresholds.
        ``encode_with_pre`` also returns the dense pre-activations (no gradient; for AuxK)."""
        x_c = self._center(x)
        B, n = x_c.shape[0], self.cfg.width
        with torch.no_grad():
            pre = F.linear(x_c, self.W_enc, self.b_enc)
        kind = self.cfg.kind
        if use_threshold is None:
            use_threshold = not self.training
        if kind == "topk" or (kind == "batchtopk" and not use_threshold):
            r = pre.clamp_min(0)
            if kind == "topk":
                vals, idx = r.topk(self.cfg.k, dim=-1, sorted=False)
                flat = (torch.arange(B, device=idx.device)[:, None] * n + idx).reshape(-1)
            else:
                vals, flat = r.reshape(-1).topk(min(self.cfg.k * B, B * n), sorted=False)
            token, latent, offsets = _code_from_flat(flat, B, n)
        elif kind == "batchtopk":
            if not torch.isfinite(self.threshold):
                raise DictionaryError("this BatchTopK SAE has no learned threshold yet (train it first, or "
                                      "encode with use_threshold=False).")
            live = pre > self.theta().detach().clamp_min(0)
            flat = live.reshape(-1).nonzero().squeeze(1)
            token, latent, offsets = _code_from_flat(flat, B, n)
        else:
            return self._encode_jumprelu(x_c, pre), pre
        pv = pre[token, latent]
        value = F.relu(_PairEncode.apply(x_c, self.W_enc, self.b_enc, token, latent, pv))
        return Code(token, latent, value, offsets, B), pre

    def code_at(self, x: Tensor, pre: Tensor, token: Tensor, latent: Tensor) -> Code:
        """A code on given (token, latent) pairs of ``pre`` (ReLU'd, encoder gradient): AuxK's
        dead latents. Pairs must be sorted by token."""
        B = pre.shape[0]
        value = F.relu(_PairEncode.apply(self._center(x), self.W_enc, self.b_enc, token, latent,
                                         pre[token, latent]))
        counts = torch.bincount(token, minlength=B)
        return Code(token, latent, value, torch.cumsum(counts, 0) - counts, B)

    def _encode_jumprelu(self, x_c: Tensor, pre: Tensor) -> Code:
        """JumpReLU code. The live pairs (pre > theta) carry ``pre`` with encoder gradient. With
        gradients on, the pairs within ``eps/2`` of their threshold also carry a term that is
        exactly zero in value but whose gradient w.r.t. ``theta_j`` is the straight-through
        ``-(theta_j/eps) * dL/dz`` (the same trick gives ``l0_train``): the sparse equivalent of
        :func:`jumprelu` and :func:`step` on the dense batch, without a dense decode."""
        B, n = pre.shape
        eps = self.cfg.jump_bandwidth
        theta = self.theta()
        th = theta.detach()
        live = pre > th
        train = torch.is_grad_enabled() and self.log_theta.requires_grad
        near = (pre - th).abs() < eps / 2 if train else torch.zeros_like(live)
        flat = (live | near).reshape(-1).nonzero().squeeze(1)
        token, latent, offsets = _code_from_flat(flat, B, n)
        pv = pre[token, latent]
        is_live = live[token, latent]
        value = _PairEncode.apply(x_c, self.W_enc, self.b_enc, token, latent, pv) * is_live
        l0 = None
        if train:
            is_near = near[token, latent].to(pv.dtype)
            dtheta = (theta - th)[latent] * is_near  # zero in value, d/dtheta_j = 1 on near pairs
            value = value - dtheta * th[latent] / eps
            l0 = (is_live.sum() - (dtheta / eps).sum()) / B
        return Code(token, latent, value, offsets, B, l0)

    # --- decoding -----------------------------------------------------------------------------
    def decode_scaled(self, code: Code, *, bias: bool = True) -> Tensor:
        """``W_dec^T z (+ b_dec)`` in scaled units, ``[B, d]``."""
        out = F.embedding_bag(code.latent, self.W_dec, code.offsets, mode="sum",
                              per_sample_weights=code.value.to(self.W_dec.dtype))
        if out.shape[0] < code.batch:  # trailing tokens with no active latent
            out = torch.cat([out, out.new_zeros(code.batch - out.shape[0], out.shape[1])])
        return out + self.b_dec if bias else out

    def decode(self, code: Code) -> Tensor:
        """Reconstruction in the activations' own units."""
        return self.decode_scaled(code) * self.cfg.scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct raw activations ``x [..., d]``."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return self.decode(self.encode(flat)).reshape(shape).to(x.dtype)

    def regular(self, x: Tensor) -> Tensor:
        """Boolean mask over the rows of ``x [..., d]``: True where the norm is within ``max_norm``."""
        if self.cfg.max_norm is None:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return x.float().norm(dim=-1) <= self.cfg.max_norm

    def dense_code(self, x: Tensor) -> Tensor:
        """The code as a dense ``[B, width]`` tensor (for analysis; small batches)."""
        c = self.encode(x)
        z = torch.zeros(c.batch, self.cfg.width, dtype=c.value.dtype, device=c.value.device)
        z[c.token, c.latent] = c.value.detach()
        return z

    # --- decoder constraint -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (pre-activations are unaffected: the encoder is
        separate)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the row, so that an
        optimizer step moves the row along the unit sphere (to first order)."""
        g = self.W_dec.grad
        if g is not None:
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    # --- save / load --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
        """Write ``sae.safetensors`` and ``config.json`` atomically into a new folder."""
        from safetensors.torch import save_file

        from ..atomic import atomic_dir

        out = Path(folder).expanduser()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS))
            info = {"format": FORMAT, "version": VERSION, "config": asdict(self.cfg), **(extra or {})}
            (tmp / CONFIG).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> SparseAutoencoder:
        """Load an SAE saved by :meth:`save`; DictionaryError for a folder that is not one."""
        from safetensors.torch import load_file

        path = Path(folder).expanduser()
        cfg_path, w_path = path / CONFIG, path / WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise DictionaryError(f"{path} is not a saved SAE (needs {CONFIG} and {WEIGHTS}); train one with "
                                  "`sparsetorch sae train`.")
        try:
            info = json.loads(cfg_path.read_text(encoding="utf-8"))
            if info.get("format") != FORMAT:
                raise ValueError(f"format {info.get('format')!r}")
            if int(info.get("version", 0)) > VERSION:
                raise DictionaryError(f"{cfg_path} has version {info['version']}; upgrade sparsetorch.")
            cfg = SAEConfig(**info["config"])
            state = load_file(str(w_path))
        except DictionaryError:
            raise
        except Exception as exc:
            raise DictionaryError(f"{path} holds a broken SAE ({exc}); train it again.") from None
        sae = cls(cfg, seed=None)
        try:
            sae.load_state_dict(state)
        except RuntimeError as exc:
            raise DictionaryError(f"{w_path} does not match {cfg_path} ({exc}).") from None
        return sae.eval()


def read_sae_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a saved SAE as a dict (config plus training summary)."""
    path = Path(folder).expanduser() / CONFIG
    if not path.is_file():
        raise DictionaryError(f"{folder} is not a saved SAE (no {CONFIG}).")
    return json.loads(path.read_text(encoding="utf-8"))
