"""Plots (matplotlib, Agg backend): per-layer sparsity over training, accuracy vs sparsity per method."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..atomic import atomic_path


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_sparsity(
    history: Sequence[tuple[int, Mapping[str, float]]], path: str | os.PathLike[str], title: str = "",
    *, overwrite: bool = True,
) -> None:
    """One line per layer: its sparsity at each recorded step (a Sparsifier's ``history``).

    Written atomically; ``overwrite=False`` refuses an existing file (CLI without --overwrite)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        steps = [s for s, _ in history]
        for name in history[-1][1]:
            ax.step(steps, [h.get(name, float("nan")) for _, h in history], where="post", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "per-layer sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_accuracy_vs_sparsity(
    results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], dense_accuracy: float | None = None,
    *, overwrite: bool = True,
) -> None:
    """Rows with ``method``, ``sparsity_target``, ``accuracy``; one line per method (atomic write)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.get("method") == "dense":
            dense_accuracy = r["accuracy"] if dense_accuracy is None else dense_accuracy
            continue
        by.setdefault(r["method"], []).append((r["sparsity_target"], r["accuracy"]))
    for m, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
