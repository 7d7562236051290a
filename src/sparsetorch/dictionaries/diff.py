"""What changed inside a model when it was pruned or fine-tuned: a crosscoder between model A
(e.g. dense) and model B (its pruned / fine-tuned version) at one site, read with Delta-norm and
Latent Scaling, and reported as JSON, a histogram (PNG) and an HTML page of contexts.

:func:`diff_models` does it all; :func:`patch_losses` measures how much of B's loss gap to A is
explained by putting A's lost latents back into B's activations.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DictionaryError
from .crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderOptions,
    classify,
    latent_scaling,
    train_crosscoder,
)
from .harvest import ActivationStore, harvest, within
from .sites import Site, read_site, splice_site

REPORT = "diff_report.json"
HISTOGRAM = "delta_norm.png"
PAGE = "latents.html"


def pair_batches(model_a: nn.Module, model_b: nn.Module, site: Site, windows: Tensor, skip_first: int = 1,
                 batch_size: int = 4, max_norm: tuple[float, float] | None = None) -> Iterator[Tensor]:
    """Raw activation pairs ``[tokens, 2, d]`` of both models on the same windows, batch by batch
    (without sink tokens above ``max_norm`` in either model)."""
    for b in range(0, len(windows), batch_size):
        ids = windows[b:b + batch_size]
        xa = read_site(model_a, site, ids)[:, skip_first:]
        xb = read_site(model_b, site, ids)[:, skip_first:]
        x = torch.stack([xa, xb], 2).reshape(-1, 2, xa.shape[-1]).float().cpu()
        yield x if max_norm is None else x[within(x, max_norm)]


@torch.no_grad()
def top_contexts(cc: Crosscoder, store: ActivationStore, latents: Tensor, top: int = 5,
                 shards: int | None = None) -> dict[int, list]:
    """The ``top`` most activating (value, window, position) of each latent over the harvest's
    first ``shards`` shards (all by default)."""
    best: dict[int, list] = {int(j): [] for j in latents}
    for i in range(min(len(store), shards or len(store))):
        sh = store.shard(i)
        if cc.cfg.max_norm is not None:
            keep = within(sh["acts"], cc.cfg.max_norm)
            sh = {k: v[keep] for k, v in sh.items()}
        f = cc.encode(sh["acts"])[:, latents]
        k = min(top, f.shape[0])
        vals, rows = f.topk(k, dim=0)
        for c, j in enumerate(latents.tolist()):
            for v, r in zip(vals[:, c].tolist(), rows[:, c].tolist()):
                if v > 0:
                    best[j].append((v, int(sh["window"][r]), int(sh["pos"][r])))
            best[j] = sorted(best[j], reverse=True)[:top]
    return best


def _context_html(tokenizer: Any, window: Tensor, pos: int, before: int = 16, after: int = 4) -> str:
    lo, hi = max(0, pos - before), min(len(window), pos + after + 1)

    def dec(ids: list[int]) -> str:
        return html.escape(tokenizer.decode(ids)) if ids else ""
    return (dec(window[lo:pos].tolist()) + "<mark>" + dec([int(window[pos])]) + "</mark>"
            + dec(window[pos + 1:hi].tolist()))


def write_page(path: Path, tokenizer: Any, windows: Tensor, groups: dict[str, list[tuple[int, float, list]]],
               title: str) -> None:
    """An HTML page: per group, each latent's Delta-norm / nu and its top contexts."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em}mark{background:#fd6}"
             "li{font-family:monospace;white-space:pre-wrap;margin:.2em 0}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for name, items in groups.items():
        parts.append(f"<h2>{html.escape(name)} ({len(items)} shown)</h2>")
        for j, delta, ctx in items:
            parts.append(f"<h3>latent {j} &mdash; delta-norm {delta:.3f}</h3><ol>")
            for v, w, p in ctx:
                parts.append(f"<li>[{v:.2f}] {_context_html(tokenizer, windows[w], p)}</li>")
            parts.append("</ol>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def plot_histogram(path: Path, delta: Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(delta.numpy(), bins=50, range=(0, 1), color="#357")
    for x in (0.1, 0.4, 0.6, 0.9):
        ax.axvline(x, color="#aaa", lw=0.8, ls="--")
    ax.set_xlabel("delta-norm (0 = only in B, 1 = only in A)")
    ax.set_ylabel("latents")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stats(v: Tensor) -> dict[str, float] | None:
    v = v[torch.isfinite(v)]
    if not len(v):
        return None
    q = torch.quantile(v.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(v), "p10": q[0], "median": q[1], "p90": q[2]}


def diff_models(
    model_a: nn.Module, model_b: nn.Module, tokenizer: Any, site: Site, out: str | os.PathLike[str], *,
    train_windows: Tensor, eval_windows: Tensor, tokens: int, width: int = 4608, k: int = 32,
    kind: str = "batchtopk", names: tuple[str, str] = ("a", "b"), activations: str | os.PathLike[str] | None = None,
    skip_first: int = 1, batch_size: int = 4096, nu_cutoff: float = 0.2, top_latents: int = 20,
    sink_factor: float | None = 10.0,
    context_shards: int = 8, overwrite: bool = False, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Crosscoder diff of two models at ``site``; writes ``out`` (crosscoder, report JSON,
    histogram, HTML) and returns the report. A latent counts as *lost* (in A, not in B) when its
    Delta-norm says only-A and Latent Scaling agrees (``nu_error < nu_cutoff``), *gained* likewise
    for only-B; ``nu`` is measured on ``eval_windows``."""
    from ..atomic import atomic_dir, check_output_dir

    say = log or (lambda _m: None)
    out = Path(out).expanduser()
    check_output_dir(out, overwrite=overwrite)
    acts = Path(activations) if activations is not None else Path(str(out).rstrip("/") + ".activations")
    say(f"harvesting {tokens:,} paired tokens at {site} into {acts}")
    man = harvest([model_a, model_b], train_windows, site, acts, tokens=tokens, skip_first=skip_first,
                  model_names=list(names), resume=acts.exists(), windows_per_shard=32)
    store = ActivationStore(acts)
    bound = store.sink_norm(sink_factor)
    cfg = CrosscoderConfig(d=man.d, width=width, kind=kind, k=k, scales=tuple(man.scale()), models=names,
                           site=str(site), max_norm=tuple(bound) if bound else None)
    cc = Crosscoder(cfg)
    steps = min(tokens, store.rows) // batch_size
    if steps < 1:
        raise DictionaryError(f"{store.rows} harvested tokens do not fill one batch of {batch_size}.")
    say(f"training a {kind} crosscoder ({width} latents) for {steps} steps")
    train = train_crosscoder(cc, store.batches(batch_size, epochs=steps * batch_size / store.rows,
                                               max_norm=cfg.max_norm), steps,
                             CrosscoderOptions(batch_size=batch_size), log=say)
    delta = cc.delta_norm()
    cls = classify(delta)
    g = torch.Generator().manual_seed(0)
    shared_sample = cls["shared"][torch.randperm(len(cls["shared"]), generator=g)[:max(len(cls["only_a"]), 50)]]
    cand = torch.cat([cls["only_a"], cls["only_b"], shared_sample])
    home = torch.cat([torch.zeros(len(cls["only_a"])), torch.ones(len(cls["only_b"])),
                      torch.zeros(len(shared_sample))]).long()
    say(f"latent scaling on {len(cand)} latents over {len(eval_windows)} evaluation windows")
    ls = latent_scaling(cc, cand, home, pair_batches(model_a, model_b, site, eval_windows, skip_first,
                                                     max_norm=cfg.max_norm))
    nu_e, nu_r = ls.nu("error"), ls.nu("recon")
    na, nb = len(cls["only_a"]), len(cls["only_b"])
    lost = cls["only_a"][nu_e[:na] < nu_cutoff]
    gained = cls["only_b"][nu_e[na:na + nb] < nu_cutoff]
    # reconstruction quality of the crosscoder on the evaluation windows, per model
    sse = torch.zeros(2, dtype=torch.float64)
    s1 = torch.zeros(2, man.d, dtype=torch.float64)
    s2 = torch.zeros(2, dtype=torch.float64)
    n = 0
    l0 = 0.0
    fired = torch.zeros(width, dtype=torch.bool)
    with torch.no_grad():
        for x in pair_batches(model_a, model_b, site, eval_windows, skip_first, max_norm=cfg.max_norm):
            f = cc.encode(x)
            xh = cc(x)
            sse += (x - xh).double().pow(2).sum(dim=(0, 2))
            s1 += x.double().sum(0)
            s2 += x.double().pow(2).sum(dim=(0, 2))
            n += len(x)
            l0 += float((f != 0).sum())
            fired |= (f != 0).any(0)
    fvu = (sse / (s2 - s1.pow(2).sum(1) / n)).tolist()
    report: dict[str, Any] = {
        "models": list(names), "site": str(site), "kind": kind, "width": width, "k": k,
        "train": train, "harvested_tokens": store.rows,
        "eval": {"tokens": n, "fvu_a": fvu[0], "fvu_b": fvu[1], "l0": l0 / max(n, 1),
                 "dead_fraction": float((~fired).float().mean())},
        "delta_norm_convention": "((|d_A| - |d_B|) / max + 1) / 2: 1 = only in A, 0 = only in B",
        "counts": {k2: len(v) for k2, v in cls.items()},
        "nu_cutoff": nu_cutoff,
        "lost": lost.tolist(), "gained": gained.tolist(),
        "nu_error": {"only_a": _stats(nu_e[:na]), "only_b": _stats(nu_e[na:na + nb]),
                     "shared_sample": _stats(nu_e[na + nb:])},
        "nu_recon": {"only_a": _stats(nu_r[:na]), "only_b": _stats(nu_r[na:na + nb]),
                     "shared_sample": _stats(nu_r[na + nb:])},
    }
    report["counts"].update(lost=len(lost), gained=len(gained))
    show = {"lost (only in A)": lost, "gained (only in B)": gained, "shared (sample)": shared_sample[:5]}
    picks = {name: v[delta[v].argsort(descending=name.startswith("lost"))][:top_latents] for name, v in show.items()}
    allp = torch.cat(list(picks.values())) if picks else torch.zeros(0, dtype=torch.long)
    ctx = top_contexts(cc, store, allp, shards=context_shards) if len(allp) else {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cc.save(tmp / "crosscoder", extra={"train": train})
        import json

        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        plot_histogram(tmp / HISTOGRAM, delta, f"{names[0]} vs {names[1]} at {site}: {width} latents")
        groups = {name: [(int(j), float(delta[j]), ctx.get(int(j), [])) for j in v] for name, v in picks.items()}
        write_page(tmp / PAGE, tokenizer, store.windows(), groups, f"{names[0]} vs {names[1]} at {site}")
    return report


def _summed_loss(m: nn.Module, ids: Tensor, skip_first: int) -> float:
    logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    lg = logits[:, skip_first:-1].float()
    return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, skip_first + 1:].reshape(-1),
                                                   reduction="sum"))


@torch.no_grad()
def patch_losses(model_a: nn.Module, model_b: nn.Module, cc: Crosscoder, site: Site, windows: Tensor,
                 latents: Tensor, *, skip_first: int = 1, batch_size: int = 4) -> dict[str, float]:
    """Model B's loss with ``latents``' A-side contribution put back at ``site``:
    ``x_B + sum_j f_j (scale_A d_j^A - scale_B d_j^B)`` (f from the pair), against B clean and A clean.
    ``explained`` = (L_B - L_patched) / (L_B - L_A): the share of B's loss gap these latents close."""
    sa, sb = cc.cfg.scales
    delta_dir = (cc.W_dec[latents, 0] * sa - cc.W_dec[latents, 1] * sb).float()  # [n, d]
    dev = next(model_b.parameters()).device
    tot = {"a": 0.0, "b": 0.0, "patched": 0.0}
    cnt = 0
    for b in range(0, len(windows), batch_size):
        ids = windows[b:b + batch_size].to(dev)
        xa = read_site(model_a, site, ids)

        def fn(h: Tensor, xa: Tensor = xa) -> Tensor:
            pair = torch.stack([xa[:, skip_first:], h[:, skip_first:]], 2)
            flat = pair.reshape(-1, 2, pair.shape[-1]).float()
            f = cc.encode(flat)[:, latents]
            if cc.cfg.max_norm is not None:  # sink tokens are not patched
                f = f * within(flat, cc.cfg.max_norm)[:, None]
            out = h.clone()
            out[:, skip_first:] += (f @ delta_dir).view(h.shape[0], -1, h.shape[-1]).to(h.dtype)
            return out

        tot["a"] += _summed_loss(model_a, ids, skip_first)
        tot["b"] += _summed_loss(model_b, ids, skip_first)
        with splice_site(model_b, site, fn):
            tot["patched"] += _summed_loss(model_b, ids, skip_first)
        cnt += ids[:, skip_first + 1:].numel()
    la, lb, lp = (tot[k] / cnt for k in ("a", "b", "patched"))
    gap = lb - la
    return {"loss_a": la, "loss_b": lb, "loss_b_patched": lp, "ppl_a": math.exp(la), "ppl_b": math.exp(lb),
            "ppl_b_patched": math.exp(lp), "explained": (lb - lp) / gap if gap else float("nan"),
            "latents": len(latents)}
