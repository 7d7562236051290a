"""Dictionary metrics, each defined once (docs/dictionaries.md has the same definitions).

* **FVU** (fraction of variance unexplained) = ``sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - xbar||^2``:
  numerator and denominator summed separately over the *whole* evaluation set, ``xbar`` its mean
  (not a per-batch or per-token ratio; see the reference's pitfalls). Summed in float64.
* **L0** = mean number of non-zero latents per token (BatchTopK measured under its threshold).
* **dead fraction** = share of latents never non-zero over the evaluation tokens (state N).
* Sink tokens (norm above the SAE's ``max_norm``, see train.py) are left out of these statistics
  (counted as ``skipped``) and keep their own activations when splicing.
* **shrinkage** = ``E||x_hat||^2 / E<x, x_hat>`` (1 = no shrinkage; < 1 = reconstructions too short).
* **delta LM loss** = ``L_sae - L_clean`` in nats: the model's next-token cross-entropy with the
  site's output replaced by the SAE's reconstruction, minus the clean loss.
* **CE loss recovered** = ``(L_zero - L_sae) / (L_zero - L_clean)``, ``L_zero`` with the site's output
  zeroed (zero ablation, as dictionary_learning and SAELens).
All three losses are means over the same predicted positions: those at or after ``skip_first``
(the positions never spliced -- the attention sink -- are left out of every loss alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .sae import SparseAutoencoder
from .sites import Site, splice_site


@dataclass
class ReconStats:
    """Streaming sums for FVU, L0, dead latents and shrinkage."""

    width: int
    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    dot: float = 0.0
    hat_sq: float = 0.0
    active: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self._sum: Tensor | None = None
        self._fired = torch.zeros(self.width, dtype=torch.bool)

    def add(self, x: Tensor, x_hat: Tensor, latents: Tensor, active: int) -> None:
        """Add a batch: raw activations, reconstructions, the indices of non-zero latents."""
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.dot += float((x * x_hat).sum())
        self.hat_sq += float(x_hat.pow(2).sum())
        s = x.sum(0)
        self._sum = s if self._sum is None else self._sum + s
        self.active += active
        self._fired[latents] = True

    def fvu(self) -> float:
        assert self._sum is not None, "no data"
        total = self.sum_sq - float(self._sum.pow(2).sum()) / self.n  # sum ||x - xbar||^2
        return self.sse / total

    def l0(self) -> float:
        return self.active / max(self.n, 1)

    def dead_fraction(self) -> float:
        return float((~self._fired).float().mean())

    def shrinkage(self) -> float:
        return self.hat_sq / self.dot if self.dot else float("nan")


@torch.no_grad()
def recon_stats(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> ReconStats:
    """FVU, L0, dead fraction and shrinkage of ``sae`` (eval mode) over raw activation batches;
    sink tokens (norm above the SAE's ``max_norm``) are counted in ``skipped`` and left out."""
    was = sae.training
    sae.eval()
    st = ReconStats(sae.cfg.width)
    try:
        for x in batches:
            x = x.reshape(-1, x.shape[-1]).float()
            keep = sae.regular(x)
            st.skipped += int((~keep).sum())
            x = x[keep]
            code = sae.encode(x)
            live = code.value != 0
            st.add(x, sae.decode(code), code.latent[live], int(live.sum()))
    finally:
        sae.train(was)
    return st


def _position_loss(model: nn.Module, windows: Tensor, skip_first: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over predicted positions ``>= skip_first`` of ``windows``."""
    device = next(model.parameters()).device
    tot, cnt = 0.0, 0
    for b in range(0, len(windows), batch_size):
        ids = windows[b:b + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        lg = logits[:, skip_first:-1].float()
        tgt = ids[:, skip_first + 1:]
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="sum")
        tot += float(loss)
        cnt += tgt.numel()
    return tot / cnt


@dataclass
class SpliceResult:
    """The three losses and what follows from them (see the module docstring)."""

    clean_loss: float
    sae_loss: float
    zero_loss: float

    @property
    def delta_lm_loss(self) -> float:
        return self.sae_loss - self.clean_loss

    @property
    def ce_recovered(self) -> float:
        return (self.zero_loss - self.sae_loss) / (self.zero_loss - self.clean_loss)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "delta_lm_loss": self.delta_lm_loss, "ce_recovered": self.ce_recovered}


def _from(skip_first: int, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def replace(h: Tensor) -> Tensor:
        out = h.clone()
        out[:, skip_first:] = fn(h[:, skip_first:])
        return out
    return replace


@torch.no_grad()
def splice_losses(model: nn.Module, site: Site, windows: Tensor,
                  reconstruct: Callable[[Tensor], Tensor], *, skip_first: int = 1,
                  batch_size: int = 4, baseline: tuple[float, float] | None = None) -> SpliceResult:
    """Clean, spliced and zero-ablated LM losses; ``reconstruct`` maps the site's activations
    ``[B, T, d]`` to their replacement (an SAE's forward, or a crosscoder's side). ``baseline``:
    the ``(clean, zero)`` losses of an earlier call on the same model, site and windows (they do
    not depend on the SAE), to skip recomputing them."""
    if baseline is None:
        clean = _position_loss(model, windows, skip_first, batch_size)
        with splice_site(model, site, _from(skip_first, torch.zeros_like)):
            zero = _position_loss(model, windows, skip_first, batch_size)
    else:
        clean, zero = baseline
    with splice_site(model, site, _from(skip_first, reconstruct)):
        spliced = _position_loss(model, windows, skip_first, batch_size)
    return SpliceResult(clean, spliced, zero)


def sae_splice(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    """The SAE (eval mode) as a replacement function for :func:`splice_losses`; sink tokens (above
    the SAE's ``max_norm``) keep their own activations."""
    sae.eval()

    def fn(h: Tensor) -> Tensor:
        return torch.where(sae.regular(h)[..., None], sae(h.float()).to(h.dtype), h)
    return fn


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, model: nn.Module, site: Site, windows: Tensor, *,
                 lm_windows: Tensor | None = None, skip_first: int = 1, batch_size: int = 4) -> dict[str, float]:
    """Every metric of the module docstring for ``sae`` at ``site``: reconstruction statistics over
    the activations of ``windows`` (positions from ``skip_first`` on) and the spliced losses on
    ``lm_windows`` (default: the same windows). Keys: ``fvu, l0, dead_fraction, shrinkage, tokens,
    clean_loss, sae_loss, zero_loss, delta_lm_loss, ce_recovered``."""
    from .sites import read_site

    def acts():
        for b in range(0, len(windows), batch_size):
            h = read_site(model, site, windows[b:b + batch_size])[:, skip_first:]
            yield h.reshape(-1, h.shape[-1]).float().cpu()

    st = recon_stats(sae, acts())
    sp = splice_losses(model, site, windows if lm_windows is None else lm_windows, sae_splice(sae),
                       skip_first=skip_first, batch_size=batch_size)
    return {"fvu": st.fvu(), "l0": st.l0(), "dead_fraction": st.dead_fraction(), "shrinkage": st.shrinkage(),
            "tokens": st.n, "sink_tokens_skipped": st.skipped, **sp.as_dict()}
