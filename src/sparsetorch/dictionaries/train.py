"""Train a sparse autoencoder on harvested activations.

One loop for the three kinds. Defaults, and where the references disagree
(``../shared/ALGORITHMS-DICTIONARIES-ACTIVATION.md`` 1.1-1.4):

* **loss**: the batch's fraction of variance unexplained ``sum||x - x_hat||^2 / sum||x - mean_batch||^2``
  (scale-free, as in eai-sparsify; ``loss="mse"``: the mean over tokens of ``||x - x_hat||^2`` in scaled
  units, as dictionary_learning) plus ``auxk_alpha`` times AuxK (TopK/BatchTopK) or the L0
  penalty (JumpReLU).
* **AuxK**: the ``k_aux`` (default d/2) largest pre-activations among dead latents reconstruct the
  detached residual, decoded without ``b_dec``; normalised by the residual's own variance (OpenAI /
  dictionary_learning); ``auxk_alpha`` 1/32. A latent is dead after ``dead_tokens`` tokens without
  firing: 1M by default, not the references' 10M, because runs here are 1-2M tokens and 10M would
  never switch AuxK on.
* **JumpReLU**: each latent's threshold starts at the ``1 - k/width`` quantile of its pre-activations
  on the first batch (``theta_from_data``; so L0 starts near ``k``: the references' fixed 0.001 start
  needs tens of thousands of steps to climb to the right scale) and is learned as ``log theta`` with
  its own Adam rate ``theta_lr`` 1e-2; rectangle-kernel width 0.05 in scaled units (SAELens); penalty
  ``l0_coeff * (L0 / k - 1)^2`` towards the target L0 ``k`` (dictionary_learning's form; the paper's
  plain ``lambda * L0`` needs lambda tuned per run), coefficient warmed up linearly over the
  first 10% of steps.
* **BatchTopK threshold**: an exponential average (``threshold_beta`` 0.99, bias-corrected) of each
  batch's smallest selected activation, in float64 (the paper averages the per-batch minima;
  dictionary_learning uses beta 0.999 from step 1000, too slow for runs of a few hundred steps).
* **optimizer**: Adam, lr ``2e-3 / sqrt(width / 2^14)``: the LR-width scaling of Gao et al. (used by
  dictionary_learning and eai-sparsify's Adam path) with a base ten times theirs (2e-4). Their base
  is made for runs of 10^4 and more steps; at the budgets here (hundreds of steps: 500k tokens at
  4,096 per step) it leaves the weights nearly where they started. Chosen on the training stream
  of SmolLM2's residual stream (train FVU on tokens not yet seen, never the evaluation half):
  TopK, 4,608 latents, 122 steps: base 2e-4 -> FVU 0.43, lr 1.5e-3 -> 0.17, lr 4e-3 -> 0.16.
  Between 4,608 and 18,432 latents the rate is held flat at its 4,608 value (3.8e-3): at these
  budgets the best rate did not fall with width (1.1M training tokens, 268 steps, final train FVU
  on tokens not yet seen: 18,432 latents at 1.9e-3 -> 0.139, 3.8e-3 -> 0.130, 7.5e-3 -> 0.138;
  4,608 latents at 3.8e-3 -> 0.141, 7.5e-3 -> 0.142). Beyond 18,432 it falls as ``1/sqrt(width)``
  again from there (not measured here: the references' scaling).
  Linear warm-up over 5% of steps, linear decay to zero over the last 20%, gradient norm clipped at 1.
* **initialisation**: tied (``W_enc = W_dec``, unit rows), ``b_dec`` the geometric median of the
  first batch (OpenAI, dictionary_learning; ``bdec_init="mean"`` as eai-sparsify).
* **activation scale**: inputs divided by ``sqrt(E||x||^2 / d)`` from the harvest's statistic.
* **sink tokens**: tokens whose norm exceeds ``sink_factor`` (10) times the RMS norm are left out of
  training, and the SAE records that bound (``max_norm``) so that evaluation and splicing skip
  them too. Position 0 is dropped at harvest; SmolLM2 has a few more such tokens mid-window
  (norm about 24,000 against a median of 170 at block 15): one of them alone made 94% of a
  BatchTopK SAE's squared error on a shard. ``None`` keeps every token.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DictionaryError
from ..statefile import load_state, save_state
from .harvest import ActivationStore
from .sae import SAEConfig, SparseAutoencoder


@dataclass
class TrainOptions:
    """Training settings (see the module docstring for the defaults' sources)."""

    tokens: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 1_000_000
    l0_coeff: float = 1.0
    theta_lr: float = 1e-2
    theta_from_data: bool = True
    threshold_beta: float = 0.99
    bdec_init: str = "geometric_median"
    loss: str = "fvu"
    sink_factor: float | None = 10.0
    seed: int = 0
    log_every: int = 50

    def check(self) -> None:
        if self.tokens is not None and self.tokens < 1:
            raise DictionaryError(f"tokens must be at least 1, got {self.tokens}.")
        if self.batch_size < 2:
            raise DictionaryError(f"batch_size must be at least 2, got {self.batch_size}.")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise DictionaryError(f"lr must be a positive number, got {self.lr}.")
        for name in ("warmup_fraction", "decay_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise DictionaryError(f"{name} must be in [0, 1], got {v}.")
        if not self.theta_lr > 0:
            raise DictionaryError(f"theta_lr must be positive, got {self.theta_lr}.")
        if self.auxk_alpha < 0 or self.l0_coeff < 0:
            raise DictionaryError("auxk_alpha and l0_coeff must be >= 0.")
        if self.k_aux is not None and self.k_aux < 1:
            raise DictionaryError(f"k_aux must be at least 1, got {self.k_aux}.")
        if self.dead_tokens < 1:
            raise DictionaryError(f"dead_tokens must be at least 1, got {self.dead_tokens}.")
        if not 0 <= self.threshold_beta < 1:
            raise DictionaryError(f"threshold_beta must be in [0, 1), got {self.threshold_beta}.")
        if self.sink_factor is not None and not self.sink_factor > 1:
            raise DictionaryError(f"sink_factor must be > 1 or None, got {self.sink_factor}.")
        if self.loss not in ("fvu", "mse"):
            raise DictionaryError(f"loss {self.loss!r}: use fvu (batch fraction of variance unexplained) or mse.")
        if self.bdec_init not in ("geometric_median", "mean", "zeros"):
            raise DictionaryError(f"bdec_init {self.bdec_init!r}: use geometric_median, mean or zeros.")


#: widths between which the default Adam rate is held flat (measured; module docstring)
FLAT_LR_WIDTHS = (4608, 18432)


def auto_lr(width: int) -> float:
    """``2e-3 / sqrt(w / 2^14)`` (Gao et al.'s LR-width scaling with a base ten times theirs) where
    ``w`` is ``width`` up to 4,608 latents, 4,608 from there to 18,432 (the rate stays flat: at the
    budgets here the best measured rate did not fall with width), and ``width / 4`` beyond, so the
    rate is continuous in width. Evidence: module docstring."""
    lo, hi = FLAT_LR_WIDTHS
    w = width if width <= lo else lo if width <= hi else width * lo / hi
    return 2e-3 / math.sqrt(w / 2**14)


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x`` (Weiszfeld)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * max(float(y.norm()), 1.0):
            return new
        y = new
    return y


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``||pred - target||^2 / ||target - mean(target)||^2`` over the batch."""
    return (pred - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)


class FiringClock:
    """Tokens since each latent last fired; a latent is *dead* once that reaches ``limit`` (the
    AuxK trigger and the dead fraction, for SAEs and crosscoders alike)."""

    def __init__(self, width: int, limit: int) -> None:
        self.since = torch.zeros(width, dtype=torch.long)
        self.limit = limit

    def tick(self, tokens: int, fired: Tensor) -> None:
        """``tokens`` more tokens seen; ``fired`` (indices or a bool mask) fired among them."""
        self.since += tokens
        self.since[fired] = 0

    def dead(self) -> Tensor:
        return self.since >= self.limit

    def fraction(self) -> float:
        return float(self.dead().float().mean())


class ThresholdEMA:
    """BatchTopK's inference threshold: a bias-corrected exponential average (``beta``) of each
    batch's smallest selected activation, in float64."""

    def __init__(self, beta: float) -> None:
        self.beta, self.avg, self.weight = beta, 0.0, 0.0

    def update(self, batch_min: float) -> float:
        self.avg = self.beta * self.avg + (1 - self.beta) * batch_min
        self.weight = self.beta * self.weight + (1 - self.beta)
        return self.avg / self.weight


def _lr_factor(step: int, steps: int, warm: int, decay_from: int) -> float:
    if step < warm:
        return (step + 1) / warm
    if step >= decay_from:
        return max(steps - step, 0) / max(steps - decay_from, 1)
    return 1.0


@dataclass
class TrainResult:
    """What one training run did; ``history`` holds (step, fvu, l0, dead fraction) rows."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_fvu: float
    final_l0: float
    dead_fraction: float
    lr: float
    threshold: float | None
    history: list[tuple[int, float, float, float]]

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


def _fingerprint(cfg: SAEConfig, opts: TrainOptions, steps: int) -> dict[str, Any]:
    """What a training checkpoint must agree on to be resumed (``log_every`` may differ)."""
    o = asdict(opts)
    o.pop("log_every")
    return {"cfg": asdict(cfg), "opts": o, "steps": steps}


def train_sae(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    steps: int,
    opts: TrainOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> TrainResult:
    """Train ``sae`` in place on ``steps`` batches of raw activations ``[B, d]`` from ``batches``.

    With ``checkpoint`` (a file path) and ``checkpoint_every`` N, the whole training state (SAE,
    Adam moments, step, dead-latent clock, BatchTopK threshold average, history) is saved
    atomically every N steps as a safetensors state file (no pickle). ``resume=True`` loads it
    (when it exists), skips the batches already trained on -- ``batches`` must be the same
    deterministic stream, e.g. ``ActivationStore.batches`` with the same seed -- and continues:
    the result equals an uninterrupted run bit for bit. ``seconds`` and ``tokens_per_s`` then
    count this process's part only."""
    opts = opts or TrainOptions()
    opts.check()
    cfg = sae.cfg
    if steps < 1:
        raise DictionaryError("no training steps: give at least one full batch of activations.")
    if checkpoint_every < 0 or (checkpoint_every and checkpoint is None):
        raise DictionaryError("checkpoint_every needs a checkpoint path and must be at least 0.")
    torch.manual_seed(opts.seed)
    lr = opts.lr or auto_lr(cfg.width)
    main = [p for n, p in sae.named_parameters() if n != "log_theta"]
    groups: list[dict[str, Any]] = [{"params": main, "lr": lr, "base": lr}]
    if cfg.kind == "jumprelu":
        groups.append({"params": [sae.log_theta], "lr": opts.theta_lr, "base": opts.theta_lr})
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    warm = max(1, int(opts.warmup_fraction * steps))
    decay_from = int((1 - opts.decay_fraction) * steps)
    k_aux = opts.k_aux or cfg.d // 2
    clock = FiringClock(cfg.width, opts.dead_tokens)
    threshold = ThresholdEMA(opts.threshold_beta)
    hist: list[tuple[int, float, float, float]] = []
    run_fvu: list[float] = []
    run_l0: list[float] = []
    sae.train()
    n_tok = 0
    step = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        st = load_state(checkpoint)
        if not isinstance(st, dict) or st.get("fingerprint") != _fingerprint(cfg, opts, steps):
            raise DictionaryError(f"cannot resume from {checkpoint}: it was written for another SAE, other "
                                  "training options or another number of steps. Use the same settings, or "
                                  "start without --resume into a new --out.")
        sae.load_state_dict(st["sae"])
        opt.load_state_dict(st["opt"])
        step, n_tok = st["step"], st["tokens"]
        clock.since.copy_(st["since"])
        threshold.avg, threshold.weight = st["threshold"]
        hist, run_fvu, run_l0 = list(st["history"]), list(st["run_fvu"]), list(st["run_l0"])
        if log:
            log(f"resumed from {checkpoint} at step {step}/{steps}")
    start, tok_start = step, n_tok
    t0 = time.perf_counter()
    for i, x in enumerate(batches):
        if i < start:  # trained on before the checkpoint
            continue
        if step >= steps:
            break
        x = x.float()
        if step == 0 and opts.bdec_init != "zeros":
            with torch.no_grad():
                xs = x[:32768] / cfg.scale
                sae.b_dec.copy_(geometric_median(xs) if opts.bdec_init == "geometric_median" else xs.mean(0))
        if step == 0 and cfg.kind == "jumprelu" and opts.theta_from_data:
            with torch.no_grad():
                q = sae.pre_acts(x[:32768]).quantile(1 - cfg.k / cfg.width, dim=0)
                sae.log_theta.copy_(q.clamp_min(1e-3).log())
        for g in opt.param_groups:
            g["lr"] = g["base"] * _lr_factor(step, steps, warm, decay_from)
        code, pre = sae.encode_with_pre(x)
        x_s = x / cfg.scale
        x_hat = sae.decode_scaled(code)
        e = x_s - x_hat
        fvu = e.pow(2).sum() / (x_s - x_s.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = fvu if opts.loss == "fvu" else e.pow(2).sum(1).mean()
        if cfg.kind == "jumprelu":
            assert code.l0_train is not None
            ramp = min(1.0, (step + 1) / max(1, int(0.1 * steps)))
            loss = loss + opts.l0_coeff * ramp * (code.l0_train / cfg.k - 1).pow(2)
        dead = clock.dead()
        n_dead = int(dead.sum())
        if cfg.kind != "jumprelu" and opts.auxk_alpha > 0 and n_dead > 0:
            with torch.no_grad():
                masked = pre.masked_fill(~dead, float("-inf"))
                vals, idx = masked.topk(min(k_aux, n_dead), dim=-1, sorted=False)
                keep = vals > 0
                token = torch.arange(x.shape[0])[:, None].expand_as(idx)[keep]
                latent = idx[keep]
            if token.numel():
                aux_hat = sae.decode_scaled(sae.code_at(x, pre, token, latent), bias=False)
                loss = loss + opts.auxk_alpha * normalized_mse(aux_hat, e.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        if opts.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), opts.grad_clip)
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            live = code.value != 0
            clock.tick(x.shape[0], code.latent[live].unique())
            l0 = float(live.sum()) / x.shape[0]
            if cfg.kind == "batchtopk" and live.any():
                sae.threshold.fill_(threshold.update(float(code.value[live].min())))
        n_tok += x.shape[0]
        run_fvu.append(float(fvu.detach()))
        run_l0.append(l0)
        if step % opts.log_every == 0 or step == steps - 1:
            dead_frac = clock.fraction()
            hist.append((step, float(fvu.detach()), l0, dead_frac))
            if log:
                log(f"step {step + 1}/{steps}: fvu {float(fvu.detach()):.4f}, L0 {l0:.1f}, dead {dead_frac:.3f}, "
                    f"{(n_tok - tok_start) / (time.perf_counter() - t0):.0f} tok/s")
        step += 1
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            save_state({"fingerprint": _fingerprint(cfg, opts, steps), "sae": sae.state_dict(),
                        "opt": opt.state_dict(), "step": step, "tokens": n_tok, "since": clock.since,
                        "threshold": (threshold.avg, threshold.weight), "history": hist,
                        "run_fvu": run_fvu, "run_l0": run_l0}, checkpoint)
    if step < steps:
        raise DictionaryError(f"the activations ran out after {step} of {steps} steps; harvest more tokens "
                              "or train for fewer.")
    secs = time.perf_counter() - t0
    sae.eval()
    tail = max(1, min(20, len(run_fvu) // 10))
    return TrainResult(
        steps=step, tokens=n_tok, seconds=secs, tokens_per_s=(n_tok - tok_start) / max(secs, 1e-9),
        final_fvu=sum(run_fvu[-tail:]) / tail, final_l0=sum(run_l0[-tail:]) / tail,
        dead_fraction=clock.fraction(), lr=lr,
        threshold=float(sae.threshold) if cfg.kind == "batchtopk" else None, history=hist,
    )


def train_on_store(
    store: ActivationStore,
    cfg: SAEConfig,
    opts: TrainOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> tuple[SparseAutoencoder, TrainResult]:
    """Build an SAE for ``store``'s activations (scale from its statistic) and train it on
    ``opts.tokens`` tokens (default: every harvested row once); ``checkpoint``,
    ``checkpoint_every`` and ``resume`` as in :func:`train_sae`."""
    opts = opts or TrainOptions()
    opts.check()
    if store.manifest.paired:
        raise DictionaryError("this harvest is paired (two models); train a crosscoder on it, not an SAE.")
    if cfg.d != store.d:
        raise DictionaryError(f"the SAE's width d={cfg.d} differs from the activations' {store.d}.")
    cfg.scale = store.manifest.scale()[0]
    cfg.site = cfg.site or store.manifest.site
    bound = store.sink_norm(opts.sink_factor)
    cfg.max_norm = bound[0] if bound else None
    tokens = opts.tokens or store.rows
    steps = tokens // opts.batch_size
    if steps < 1:
        raise DictionaryError(f"{tokens} tokens do not fill one batch of {opts.batch_size}; lower the batch size.")
    epochs = tokens / store.rows
    sae = SparseAutoencoder(cfg, seed=opts.seed)
    batches = store.batches(opts.batch_size, seed=opts.seed, epochs=epochs, max_norm=cfg.max_norm)
    res = train_sae(sae, batches, steps, opts, log=log, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, resume=resume)
    return sae, res
