"""A plain supervised training loop with a Sparsifier, used by the CLI and the benchmark.

It is the documented three-line integration (create, ``attach``, ``step``) plus timing,
evaluation and progress bars; nothing in it is specific to one method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodError
from .base import Sparsifier, get_method

NM_METHODS = ("ste", "srste", "nm_progressive", "nm_decay")


def build_sparsifier(
    method: str,
    sparsity: float | None,
    total_steps: int,
    **kw: Any,
) -> Sparsifier | None:
    """``get_method`` with the run length filled in; ``"dense"`` gives None.

    N:M methods take ``pattern`` (default ``"2:4"``) instead of ``sparsity``; options that are
    None are left to the method's defaults.
    """
    m = method.lower().replace("-", "_")
    if m in ("dense", "none"):
        return None
    kw = {k: v for k, v in kw.items() if v is not None}
    kw["total_steps"] = total_steps
    if m in NM_METHODS:
        kw.pop("allocation", None)
    elif sparsity is None:
        raise MethodError(f"method {method!r} needs a sparsity (e.g. --sparsity 0.9).")
    else:
        kw["sparsity"] = sparsity
    return get_method(m, **kw)


class TensorBatches:
    """The training set as a re-iterable of ``(x, y)`` batches in stored order (no shuffling, no copy).

    :func:`fit` hands this to ``Sparsifier.attach(data=...)``: methods that score on one batch
    (SNIP, GraSP) take the first one (the same ``x[:batch_size]`` as before), methods that search
    or check on training data (allocation search, HyperSparse's ART) iterate further.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, int(batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):  # noqa: ANN204 - a generator of (x, y)
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i: i + self.batch_size], self.y[i: i + self.batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(len(x), 1)


def train_epochs(
    model: nn.Module,
    test: tuple[Tensor, Tensor],
    epochs: int,
    draw_epoch: Callable[[], Iterable[Tensor]],
    step: Callable[[Tensor], Tensor | float],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    total: int,
    postfix_every: int = 1,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[float], float]:
    """The epoch loop that :func:`fit` and :func:`~sparsetorch.privacy.dp_fit` share.

    Each epoch, ``draw_epoch()`` gives that epoch's batches of training indices (drawn before the
    epoch's clock starts if it returns them eagerly; a lazy iterable is drawn on the clock), and
    for each ``step(idx)`` runs one optimizer step and returns its loss, then ``scheduler`` steps;
    after each epoch the model is evaluated on ``test``. The progress bar (``total`` steps) shows
    the loss every ``postfix_every`` steps of an epoch (reading a tensor loss syncs the device, so
    :func:`fit` does it rarely).

    Returns the accuracy after each epoch and the training seconds (evaluation not included): what
    both results report, measured the same way.
    """
    from tqdm.auto import tqdm

    model.train()
    accs: list[float] = []
    seconds = 0.0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        batches = draw_epoch()
        t0 = time.perf_counter()
        for i, idx in enumerate(batches):
            loss = step(idx)
            scheduler.step()
            if i % postfix_every == 0:
                value = float(loss.detach()) if isinstance(loss, Tensor) else loss
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            bar.update(1)
        seconds += time.perf_counter() - t0
        accs.append(evaluate(model, *test))
    bar.close()
    return accs, seconds


def sparsity_report(model: nn.Module, sparsifier: Sparsifier | None) -> tuple[float, dict[str, float]]:
    """After training: check that pruned weights are still exactly zero, and return the overall
    and per-layer sparsity (0.0 and ``{}`` for a dense run)."""
    if sparsifier is None:
        return 0.0, {}
    assert sparsifier.masks is not None
    sparsifier.masks.verify(model)
    return sparsifier.sparsity_actual(), sparsifier.layer_sparsity()


@dataclass
class FitResult:
    """What one training run produced."""

    accuracy: float
    accuracy_per_epoch: list[float]
    seconds: float
    seconds_per_epoch: float
    seconds_per_step: float
    steps: int
    sparsity_actual: float
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def fit(
    model: nn.Module,
    sparsifier: Sparsifier | None,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> FitResult:
    """Train with SGD (+momentum, cosine LR), calling ``sparsifier.step()`` after each optimizer step."""
    xtr, ytr = train
    n = len(xtr)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    g = torch.Generator().manual_seed(seed)
    if sparsifier is not None:
        sparsifier.attach(model, opt, data=TensorBatches(xtr, ytr, batch_size))
    def step(idx: Tensor) -> Tensor:
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sparsifier is not None:
            sparsifier.step()
        return loss

    def draw_epoch() -> tuple[Tensor, ...]:  # a fresh order each epoch, drawn before its clock starts
        return torch.randperm(n, generator=g).split(batch_size)

    accs, train_seconds = train_epochs(
        model, test, epochs, draw_epoch, step, sched, total=total, postfix_every=20,
        progress=progress, desc=desc or (sparsifier.name if sparsifier else "dense"))
    sp_actual, layers = sparsity_report(model, sparsifier)
    history = list(sparsifier.history) if sparsifier is not None else []
    return FitResult(
        accuracy=accs[-1],
        accuracy_per_epoch=accs,
        seconds=train_seconds,
        seconds_per_epoch=train_seconds / epochs,
        seconds_per_step=train_seconds / total,
        steps=total,
        sparsity_actual=sp_actual,
        layer_sparsity=layers,
        history=history,
    )
