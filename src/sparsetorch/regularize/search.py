"""Per-layer sparsity search: how sparse should each layer be, under one global budget?

Both searches return ``{name: sparsity}`` for the targeted weights, which every training method
accepts as ``allocation=...``; the parameter-weighted mean of the realised (``floor``) counts
meets the global sparsity within 1e-3 (:func:`project_budget` solves the budget exactly, the
floor counts differ by at most one weight per layer).

* :func:`dass_search` - differentiable (in the spirit of DASS, Mousavi et al. 2022): a learnable
  logit ``a_l`` per layer gives its density ``d_l = sigmoid(a_l + c)`` where the shared offset ``c``
  is solved so that ``sum n_l d_l`` is the budget; each layer's weights are multiplied by a soft
  magnitude mask ``sigmoid((|W| - q_l) / (T std|W|))`` with ``q_l`` the ``(1 - d_l)`` quantile of ``|W|``
  (interpolated, so differentiable in ``d_l``). Weights and logits train jointly on a copy of the
  model for a short proxy run while ``T`` anneals; the final densities are the allocation.
* :func:`random_search` - the baseline of "Random Search as a Baseline for Sparse NAS": draw
  per-layer densities around a base allocation (ERK) in logit space, project them onto the budget,
  train each candidate briefly with a fixed random mask (same seed and batches for every
  candidate), keep the one with the best accuracy on held-out training batches. The base
  allocation is candidate 0, so the search never returns a worse proxy score than it.

Neither search touches the caller's model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import allocation as alloc
from ..errors import DataError, MethodError, check_sparsity
from ..patterns import n_pruned, topk_mask

__all__ = ["project_budget", "dass_search", "random_search", "allocation_error", "exact_counts"]

Loss = Callable[[Tensor, Tensor], Tensor]


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: the tensor itself, ``out["logits"]`` or ``out.logits`` (Hugging Face)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    raise DataError(f"cannot find logits in a model output of type {type(out).__name__}; return a tensor or .logits.")


def pair(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, or a dict with ``x``/``input`` and ``y``/``labels``."""
    if isinstance(batch, Mapping):
        x = batch.get("input", batch.get("x"))
        y = batch.get("labels", batch.get("y"))
        if x is not None and y is not None:
            return x, y
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DataError("search batches must be (inputs, targets) pairs or dicts with 'x'/'input' and 'y'/'labels'.")


def project_budget(logits: Tensor, numels: Tensor, density: float, iters: int = 200) -> Tensor:
    """Densities ``clamp(sigmoid(logits + c), d_min, 1)`` with ``c`` chosen so that
    ``sum numels * d = density * sum numels`` (bisection on ``c``; exact to float64 round-off).

    ``d_min`` keeps one weight per layer. Raises :class:`MethodError` for a density outside (0, 1].
    """
    if not (0 < density <= 1):
        raise MethodError(f"density must be in (0, 1], got {density}.")
    a = logits.detach().double()
    n = numels.double()
    dmin = 1.0 / n
    target = density * float(n.sum())

    def dens(c: float) -> Tensor:
        return torch.maximum(torch.sigmoid(a + c), dmin).clamp(max=1.0)

    lo, hi = -60.0 - float(a.max()), 60.0 - float(a.min())
    if float((n * dens(lo)).sum()) > target:
        return dens(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((n * dens(mid)).sum()) < target:
            lo = mid
        else:
            hi = mid
    return dens(0.5 * (lo + hi))


def allocation_error(shapes: Mapping[str, Any], allocation: Mapping[str, float], sparsity: float) -> float:
    """``|realised mean sparsity (floor counts) - sparsity|``."""
    return abs(alloc.mean_sparsity(shapes, allocation) - sparsity)


def _to_allocation(names: list[str], dens: Tensor) -> dict[str, float]:
    return {n: float(min(max(1.0 - float(d), 0.0), 1.0 - 1e-9)) for n, d in zip(names, dens)}


def exact_counts(numels: Mapping[str, int], allocation: Mapping[str, float], sparsity: float) -> dict[str, float]:
    """``allocation`` adjusted so that the ``floor`` counts sum to exactly ``floor(sparsity * N)`` zeros.

    Each layer's zeros are rounded down, then the missing zeros go one each to the layers with
    the largest fractional remainders (never emptying a layer); the result is ``zeros / numel``.
    """
    names = list(allocation)
    total = sum(int(numels[n]) for n in names)
    want = n_pruned(sparsity, total)
    raw = {n: allocation[n] * int(numels[n]) for n in names}
    zeros = {n: min(int(math.floor(raw[n])), int(numels[n]) - 1) for n in names}
    order = sorted(names, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True)
    missing = want - sum(zeros.values())
    i = 0
    while missing != 0 and i < 10 * len(names) + 10:
        n = order[i % len(order)]
        if missing > 0 and zeros[n] < int(numels[n]) - 1:
            zeros[n] += 1
            missing -= 1
        elif missing < 0 and zeros[n] > 0:
            zeros[n] -= 1
            missing += 1
        i += 1
    return {n: zeros[n] / int(numels[n]) for n in names}


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        seen = False
        for b in data:
            seen = True
            yield b
        if not seen:
            raise DataError("the data iterable passed to the allocation search yielded no batches.")


def _split(data: Iterable[Any], val_batches: int) -> tuple[list[Any], Iterable[Any]]:
    """The first ``val_batches`` batches for validation, the rest (re-iterable) for training."""
    val = list(islice(iter(data), val_batches))
    if len(val) < val_batches:
        raise DataError(f"the allocation search needs more than {val_batches} batches of training data.")

    class _Rest:
        def __iter__(self) -> Iterator[Any]:
            return islice(iter(data), val_batches, None)

    return val, _Rest()


def _logits_from(base: Mapping[str, float], names: list[str]) -> Tensor:
    d = torch.tensor([1.0 - base[n] for n in names], dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return torch.log(d) - torch.log1p(-d)


def _base_allocation(params: Mapping[str, Tensor], sparsity: float, base: str | Mapping[str, float]) -> dict[str, float]:
    if isinstance(base, Mapping):
        return dict(base)
    return alloc.allocate(base, {n: p.detach() for n, p in params.items()}, sparsity)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[Any], weights: Mapping[str, Tensor] | None = None) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for b in batches:
        x, y = pair(b)
        out = model(x) if weights is None else torch.func.functional_call(model, dict(weights), (x,))
        correct += int((logits_of(out).argmax(-1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


def _soft_mask(w: Tensor, density: Tensor, temperature: float) -> Tensor:
    """``sigmoid((|W| - q) / (T std|W|))`` with ``q`` the interpolated ``(1 - density)`` quantile of ``|W|``."""
    a = w.abs().reshape(-1)
    srt = torch.sort(a.detach()).values
    n = srt.numel()
    pos = (1 - density) * (n - 1)
    i0 = torch.clamp(pos.detach().floor().long(), 0, max(n - 2, 0))
    frac = pos - i0.to(pos.dtype)
    q = srt[i0] + frac * (srt[torch.clamp(i0 + 1, max=n - 1)] - srt[i0])
    scale = srt.std().clamp_min(1e-12) * temperature
    return torch.sigmoid((w.abs() - q.to(w.dtype)) / scale)


def dass_search(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable[Any],
    sparsity: float,
    *,
    steps: int = 200,
    lr: float = 0.05,
    alpha_lr: float = 0.05,
    temperature: tuple[float, float] = (0.5, 0.02),
    base: str | Mapping[str, float] = "erk",
    loss_fn: Loss | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Differentiable per-layer sparsity search (see the module docstring).

    ``params`` are the targeted weights of ``model`` by name (e.g. ``Sparsifier.params``). Returns
    ``(allocation, info)``; ``info`` holds the starting allocation and the logits' history.
    """
    s = check_sparsity(sparsity)
    if int(steps) < 1:
        raise MethodError(f"steps must be >= 1, got {steps}.")
    loss_fn = loss_fn or F.cross_entropy
    names = list(params)
    start = _base_allocation(params, s, base)
    if s == 0:
        return {n: 0.0 for n in names}, {"start": start}
    net = copy.deepcopy(model)
    net.train()
    live = dict(net.named_parameters())
    for n in names:
        if n not in live:
            raise MethodError(f"dass_search: {n!r} is not a parameter of the model.")
    numels = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    logits = _logits_from(start, names).float().requires_grad_(True)
    opt_w = torch.optim.SGD([p for p in net.parameters()], lr=lr, momentum=0.9)
    opt_a = torch.optim.Adam([logits], lr=alpha_lr)
    t0, t1 = temperature
    batches = _cycle(data)
    torch.manual_seed(seed)
    hist = []
    for step in range(int(steps)):
        temp = t0 * (t1 / t0) ** (step / max(int(steps) - 1, 1))
        dens_now = project_budget(logits, numels, 1 - s)
        c = torch.logit(dens_now.clamp(1e-9, 1 - 1e-9)).float() - logits.detach()  # the budget offset, held fixed
        d = torch.sigmoid(logits + c)
        x, y = pair(next(batches))
        subs = {n: live[n] * _soft_mask(live[n], d[i], temp) for i, n in enumerate(names)}
        loss = loss_fn(logits_of(torch.func.functional_call(net, subs, (x,))), y)
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        opt_a.step()
        if step % max(int(steps) // 10, 1) == 0:
            hist.append([float(v) for v in dens_now])
    final = project_budget(logits, numels, 1 - s)
    sizes = {n: params[n].numel() for n in names}
    out = exact_counts(sizes, _to_allocation(names, final), s)
    return out, {"start": start, "density_history": hist, "steps": int(steps)}


def random_search(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Iterable[Any],
    sparsity: float,
    *,
    trials: int = 8,
    proxy_steps: int = 100,
    val_batches: int = 4,
    spread: float = 1.0,
    lr: float = 0.05,
    base: str | Mapping[str, float] = "erk",
    loss_fn: Loss | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Random search over per-layer sparsities with short proxy training (see the module docstring).

    Each of ``trials`` candidates (candidate 0 = ``base``) trains a copy of ``model`` for
    ``proxy_steps`` SGD steps with a fixed random mask at its allocation and is scored on the
    first ``val_batches`` batches of ``data`` (held out from its training). Returns
    ``(allocation, info)`` with every candidate and its score in ``info["candidates"]``.
    """
    s = check_sparsity(sparsity)
    if int(trials) < 1 or int(proxy_steps) < 1 or int(val_batches) < 1:
        raise MethodError(f"trials, proxy_steps and val_batches must be >= 1, got {trials}, {proxy_steps}, {val_batches}.")
    if not (spread >= 0 and math.isfinite(spread)):
        raise MethodError(f"spread must be a finite number >= 0, got {spread}.")
    loss_fn = loss_fn or F.cross_entropy
    names = list(params)
    start = _base_allocation(params, s, base)
    numels = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    base_logits = _logits_from(start, names)
    sizes = {n: params[n].numel() for n in names}
    cands: list[dict[str, float]] = [exact_counts(sizes, start, s)]
    for _ in range(int(trials) - 1):
        a = base_logits + spread * torch.randn(len(names), generator=g, dtype=torch.float64)
        cands.append(exact_counts(sizes, _to_allocation(names, project_budget(a, numels, 1 - s)), s))
    val, rest = _split(data, int(val_batches))
    results = []
    for i, cand in enumerate(cands):
        score = _proxy_score(model, params, rest, val, cand, proxy_steps=int(proxy_steps), lr=lr,
                             loss_fn=loss_fn, seed=seed)
        results.append({"allocation": cand, "score": score, "base": i == 0})
    best = max(range(len(results)), key=lambda i: (results[i]["score"], -i))
    return dict(cands[best]), {"candidates": results, "best": best, "start": start,
                               "proxy_steps": int(proxy_steps), "trials": int(trials)}


def _proxy_score(model: nn.Module, params: Mapping[str, Tensor], train: Iterable[Any], val: list[Any],
                 allocation: Mapping[str, float], *, proxy_steps: int, lr: float, loss_fn: Loss, seed: int) -> float:
    """Accuracy on ``val`` after ``proxy_steps`` of SGD with fixed random masks at ``allocation``."""
    net = copy.deepcopy(model)
    net.train()
    live = dict(net.named_parameters())
    g = torch.Generator().manual_seed(seed + 1)
    masks = {}
    for n in params:
        p = live[n]
        keep = p.numel() - n_pruned(allocation[n], p.numel())
        masks[n] = topk_mask(torch.rand(p.numel(), generator=g), keep).reshape(p.shape)
        with torch.no_grad():
            p.mul_(masks[n])
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    batches = _cycle(train)
    torch.manual_seed(seed)
    for _ in range(proxy_steps):
        x, y = pair(next(batches))
        loss = loss_fn(logits_of(net(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, m in masks.items():
            if live[n].grad is not None:
                live[n].grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for n, m in masks.items():
                live[n].mul_(m)
    return _accuracy(net, val)
