"""Crosscoders: one dictionary across two models' activations at the same site, and the tools
that read it -- decoder-norm differences (Delta-norm) and Latent Scaling.

Parameterisation (Anthropic's crosscoder, as in dictionary_learning's ``CrossCoder``)::

    a_m   = x_m / scale_m                                  m in {A, B}, scale_m from the harvest
    pre   = sum_m W_enc[:, m] a_m + b_enc                  W_enc [width, 2, d]
    f     = act(pre)                                       [width], shared by both models
    a_hat_m = W_dec[:, m]^T f + b_dec[m]                   W_dec [width, 2, d]

* ``l1`` (Anthropic): ``f = ReLU(pre)``; loss ``sum_m ||a_m - a_hat_m||^2 + l1_coeff * sum_i f_i sum_m
  ||d_i^m||`` (batch mean), no norm constraint on the decoders (the penalty carries the norms).
* ``batchtopk`` (Minder et al.): keep the ``k * B`` largest of ``ReLU(pre_i) * sum_m ||d_i^m||`` over the
  batch; at evaluation a learned threshold on that scaled value; loss = summed squared error over
  both models divided by their summed variance (FVU) + AuxK; no norm constraint.

**Delta-norm** (one convention here, that of the diffing-toolkit):
``delta_i = ((||d_i^A|| - ||d_i^B||) / max(||d_i^A||, ||d_i^B||) + 1) / 2`` in [0, 1]: 1 = the latent
exists only in A's decoder ("lost" when B is A pruned or fine-tuned), 0 = only in B ("gained"),
0.5 = equal. Classes: only-A ``delta > 0.9``, only-B ``delta < 0.1``, shared ``|delta - 0.5| < 0.1``.

**Latent Scaling** (Minder et al.): for latent ``j`` with decoder direction ``d`` (its row in the
model where it lives) and target ``y_n`` of model ``m``,
``beta = argmin_beta sum_n ||y_n - beta f_j(n) d||^2 = d . sum_n f_j(n) y_n / (||d||^2 sum_n f_j(n)^2)``,
with the *error* target ``y = a_m - (a_hat_m - f_j d_j^m)`` (the residual with j's own term added back)
and the *reconstruction* target ``y = a_hat_m``. ``nu = beta_other / beta_home``: near 0 the other
model truly lacks the latent; high ``nu_error`` = the crosscoder zeroed a decoder the other model
still uses (Complete Shrinkage); high ``nu_recon`` = the other model rebuilds it from other latents
(Latent Decoupling).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DictionaryError
from .train import FiringClock, ThresholdEMA, _lr_factor, auto_lr

KINDS = ("batchtopk", "l1")
WEIGHTS = "crosscoder.safetensors"
CONFIG = "config.json"
FORMAT = "sparsetorch-crosscoder"
VERSION = 1


@dataclass
class CrosscoderConfig:
    """What defines a crosscoder (saved beside its weights); ``scales`` per model; ``max_norm`` per
    model bounds the regular tokens (sink tokens above it are skipped, as for SAEs)."""

    d: int
    width: int
    kind: str = "batchtopk"
    k: int = 32
    l1_coeff: float = 1.0
    scales: tuple[float, float] = (1.0, 1.0)
    models: tuple[str, str] = ("a", "b")
    site: str = ""
    max_norm: tuple[float, float] | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise DictionaryError(f"crosscoder kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}.")
        if self.d < 1 or self.width < 1:
            raise DictionaryError(f"d and width must be positive, got d={self.d}, width={self.width}.")
        if self.kind == "batchtopk" and not 1 <= self.k < self.width:
            raise DictionaryError(f"k must be in 1..width-1 (k={self.k}, width={self.width}).")
        if self.l1_coeff < 0:
            raise DictionaryError(f"l1_coeff must be >= 0, got {self.l1_coeff}.")
        if len(self.scales) != 2 or not all(s > 0 and math.isfinite(s) for s in self.scales):
            raise DictionaryError(f"scales must be two positive numbers, got {self.scales}.")


class Crosscoder(nn.Module):
    """A two-model crosscoder (see the module docstring)."""

    def __init__(self, cfg: CrosscoderConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.empty(cfg.width, 2, cfg.d).uniform_(-1.0, 1.0, generator=g)
        w /= w.norm(dim=2, keepdim=True)
        init_norm = 0.1 if cfg.kind == "l1" else 1.0  # small L1 decoders as in the references' scripts
        self.W_dec = nn.Parameter(w * init_norm)
        self.W_enc = nn.Parameter(w.clone() / math.sqrt(2))  # tied; two inputs summed
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(2, cfg.d))
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))

    def scaled(self, x: Tensor) -> Tensor:
        """``[B, 2, d]`` raw pair -> scaled units."""
        if x.dim() != 3 or x.shape[1:] != (2, self.cfg.d):
            raise DictionaryError(f"a crosscoder takes activation pairs [B, 2, {self.cfg.d}], got {tuple(x.shape)}.")
        s = torch.tensor(self.cfg.scales, dtype=x.dtype, device=x.device)
        return x.float() / s[None, :, None]

    def decoder_norms(self) -> Tensor:
        """``[width, 2]``: each latent's decoder norm in model A and model B."""
        return self.W_dec.detach().norm(dim=2)

    def encode(self, x: Tensor, *, use_threshold: bool | None = None) -> Tensor:
        """Dense latent activations ``[B, width]`` for a raw pair batch."""
        a = self.scaled(x)
        pre = torch.einsum("bmd,nmd->bn", a, self.W_enc) + self.b_enc
        r = F.relu(pre)
        if self.cfg.kind == "l1":
            return r
        if use_threshold is None:
            use_threshold = not self.training
        v = r * self.W_dec.norm(dim=2).sum(1).detach()
        if use_threshold:
            if not torch.isfinite(self.threshold):
                raise DictionaryError("this crosscoder has no learned threshold yet; train it first.")
            return r * (v > float(self.threshold))
        keep = torch.zeros_like(r, dtype=torch.bool).reshape(-1)
        keep[v.reshape(-1).topk(min(self.cfg.k * r.shape[0], r.numel()), sorted=False).indices] = True
        return r * keep.view_as(r)

    def decode_scaled(self, f: Tensor) -> Tensor:
        """``[B, 2, d]`` reconstructions in scaled units."""
        return torch.einsum("bn,nmd->bmd", f, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        s = torch.tensor(self.cfg.scales, dtype=torch.float32, device=x.device)
        return self.decode_scaled(self.encode(x)) * s[None, :, None]

    def delta_norm(self) -> Tensor:
        """Delta-norm per latent (module docstring): 1 = only in A, 0 = only in B."""
        n = self.decoder_norms()
        return ((n[:, 0] - n[:, 1]) / n.max(dim=1).values.clamp_min(1e-12) + 1) / 2

    # --- save / load --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        from ..atomic import atomic_dir

        out = Path(folder).expanduser()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS))
            info = {"format": FORMAT, "version": VERSION, "config": asdict(self.cfg), **(extra or {})}
            (tmp / CONFIG).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Crosscoder:
        from safetensors.torch import load_file

        path = Path(folder).expanduser()
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise DictionaryError(f"{path} is not a saved crosscoder (needs {CONFIG} and {WEIGHTS}).")
        try:
            info = json.loads((path / CONFIG).read_text(encoding="utf-8"))
            if info.get("format") != FORMAT:
                raise ValueError(f"format {info.get('format')!r}")
            raw = info["config"]
            raw["scales"], raw["models"] = tuple(raw["scales"]), tuple(raw["models"])
            if raw.get("max_norm") is not None:
                raw["max_norm"] = tuple(raw["max_norm"])
            cc = cls(CrosscoderConfig(**raw), seed=None)
            cc.load_state_dict(load_file(str(path / WEIGHTS)))
        except Exception as exc:
            raise DictionaryError(f"{path} holds a broken crosscoder ({exc}); train it again.") from None
        return cc.eval()


@dataclass
class CrosscoderOptions:
    """Training settings: Adam at ``lr`` (default ``train.auto_lr(width)`` for BatchTopK, as the
    SAEs here: ``2e-3 / sqrt(width / 2^14)``, flat from 4,608 to 18,432 latents; see train.py for
    why ten times the references' base and why flat); 1e-3 for L1 as in the
    references' scripts), warm-up 5%, decay over the last 20%, AuxK 1/32 with
    ``k_aux = d/2`` after ``dead_tokens`` without firing, BatchTopK threshold EMA 0.99."""

    tokens: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000
    threshold_beta: float = 0.99
    seed: int = 0


def _auxk(cc: Crosscoder, a: Tensor, pre_r: Tensor, dead: Tensor, e: Tensor, k_aux: int) -> Tensor:
    vals = pre_r.masked_fill(~dead, 0.0)
    top = vals.topk(min(k_aux, int(dead.sum())), dim=1)
    f = torch.zeros_like(vals).scatter(1, top.indices, top.values)
    e_hat = torch.einsum("bn,nmd->bmd", f, cc.W_dec)
    tgt = e.detach()
    return (e_hat - tgt).pow(2).sum() / (tgt - tgt.mean(0)).pow(2).sum().clamp_min(1e-12)


def train_crosscoder(cc: Crosscoder, batches: Iterable[Tensor], steps: int, opts: CrosscoderOptions | None = None,
                     *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cc`` in place on ``steps`` raw pair batches ``[B, 2, d]``; returns a summary."""
    opts = opts or CrosscoderOptions()
    cfg = cc.cfg
    torch.manual_seed(opts.seed)
    lr = opts.lr or (1e-3 if cfg.kind == "l1" else auto_lr(cfg.width))
    opt = torch.optim.Adam(cc.parameters(), lr=lr)
    warm, decay_from = max(1, int(0.05 * steps)), int(0.8 * steps)
    clock = FiringClock(cfg.width, opts.dead_tokens)
    threshold = ThresholdEMA(opts.threshold_beta)
    t0 = time.perf_counter()
    fvus: list[float] = []
    l0s: list[float] = []
    step = 0
    cc.train()
    for x in batches:
        if step >= steps:
            break
        if step == 0:
            with torch.no_grad():
                cc.b_dec.copy_(cc.scaled(x[:32768]).mean(0))
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, steps, warm, decay_from)
        a = cc.scaled(x)
        pre = torch.einsum("bmd,nmd->bn", a, cc.W_enc) + cc.b_enc
        f = cc.encode(x, use_threshold=False)
        e = a - cc.decode_scaled(f)
        var = (a - a.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = e.pow(2).sum() / var
        if cfg.kind == "l1":
            loss = e.pow(2).sum(dim=(1, 2)).mean() + cfg.l1_coeff * (f * cc.W_dec.norm(dim=2).sum(1)).sum(1).mean()
        else:
            loss = fvu
            dead = clock.dead()
            if opts.auxk_alpha > 0 and dead.any():
                loss = loss + opts.auxk_alpha * _auxk(cc, a, F.relu(pre), dead, e, cfg.d // 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            live = f != 0
            clock.tick(x.shape[0], live.any(0))
            if cfg.kind == "batchtopk" and live.any():
                v = (f * cc.W_dec.norm(dim=2).sum(1))[live]
                cc.threshold.fill_(threshold.update(float(v.min())))
        fvus.append(float(fvu.detach()))
        l0s.append(float(live.sum()) / x.shape[0])
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}: fvu {fvus[-1]:.4f}, L0 {l0s[-1]:.1f}")
        step += 1
    if step < steps:
        raise DictionaryError(f"the activations ran out after {step} of {steps} steps.")
    cc.eval()
    secs = time.perf_counter() - t0
    tail = max(1, min(20, len(fvus) // 10))
    return {"steps": steps, "tokens": steps * opts.batch_size, "seconds": secs,
            "tokens_per_s": steps * opts.batch_size / secs, "final_fvu": sum(fvus[-tail:]) / tail,
            "final_l0": sum(l0s[-tail:]) / tail, "lr": lr,
            "dead_fraction": clock.fraction()}


# --- classification and Latent Scaling -------------------------------------------------------
def classify(delta: Tensor) -> dict[str, Tensor]:
    """Latent indices per Delta-norm class: ``only_a`` (> 0.9), ``only_b`` (< 0.1), ``shared``
    (``|delta - 0.5| < 0.1``), ``other``."""
    only_a, only_b = delta > 0.9, delta < 0.1
    shared = (delta - 0.5).abs() < 0.1
    other = ~(only_a | only_b | shared)
    return {k: v.nonzero().squeeze(1) for k, v in
            (("only_a", only_a), ("only_b", only_b), ("shared", shared), ("other", other))}


@dataclass
class LatentScaling:
    """Per latent: betas of both models on both targets and the ratios ``nu`` (home = the model
    whose decoder direction is used)."""

    latents: Tensor
    home: Tensor            # 0 = A, 1 = B, per latent
    beta_error: Tensor      # [n, 2] (model A, model B)
    beta_recon: Tensor      # [n, 2]

    def nu(self, target: str = "error") -> Tensor:
        b = self.beta_error if target == "error" else self.beta_recon
        idx = torch.arange(len(self.latents))
        home = b[idx, self.home]
        other = b[idx, 1 - self.home]
        return other / home


@torch.no_grad()
def latent_scaling(cc: Crosscoder, latents: Tensor, home: Tensor, batches: Iterable[Tensor]) -> LatentScaling:
    """Closed-form betas (module docstring) for ``latents``, each with decoder direction from its
    ``home`` model (0 = A, 1 = B), streamed over raw pair batches (running sums in float64)."""
    latents, home = latents.long(), home.long()
    cc.eval()
    D = cc.W_dec[latents, home].double()           # [n, d] directions
    dn = D.pow(2).sum(1)                            # ||d||^2
    cross = torch.einsum("nd,nmd->nm", D, cc.W_dec[latents].double())  # d . d_j^m  [n, 2]
    s_fr = torch.zeros(len(latents), 2, dtype=torch.float64)   # sum f * (d . residual_m)
    s_fh = torch.zeros(len(latents), 2, dtype=torch.float64)   # sum f * (d . a_hat_m)
    s_ff = torch.zeros(len(latents), dtype=torch.float64)
    for x in batches:
        a = cc.scaled(x).double()
        f_all = cc.encode(x)
        a_hat = cc.decode_scaled(f_all).double()
        f = f_all[:, latents].double()                          # [B, n]
        r = a - a_hat
        s_fr += torch.einsum("bn,bmd,nd->nm", f, r, D)
        s_fh += torch.einsum("bn,bmd,nd->nm", f, a_hat, D)
        s_ff += f.pow(2).sum(0)
    denom = (dn * s_ff).clamp_min(1e-300)[:, None]
    beta_err = (s_fr + s_ff[:, None] * cross) / denom
    beta_rec = s_fh / denom
    return LatentScaling(latents, home, beta_err.float(), beta_rec.float())
