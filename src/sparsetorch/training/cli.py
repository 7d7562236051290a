"""``sparsetorch train``: sparse training of a small model on Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import typer

#: examples in the Fashion-MNIST training split (the run length is known before the data is read)
FASHION_MNIST_TRAIN = 60_000


def train_command(
    dataset: str = typer.Option("fashion-mnist", help="Dataset; only 'fashion-mnist' for now."),
    model: str = typer.Option("cnn", help="'cnn' (2 conv + 2 linear) or 'mlp' (300-100)."),
    method: str = typer.Option("rigl", help="dense, random/static, snip, grasp, synflow, gmp, set, rigl, snfs, acdc, ste, srste, nm_progressive, nm_decay."),
    sparsity: float = typer.Option(0.9, help="Target fraction of zeros in [0, 1) (ignored by N:M methods)."),
    pattern: str = typer.Option("2:4", help="N:M pattern for ste/srste/nm_progressive/nm_decay."),
    allocation: str | None = typer.Option(None, help="erk, er, uniform or global (default: the method's own)."),
    dense: str | None = typer.Option(None, help="Comma-separated weights kept dense, e.g. 'first' or 'first,last' or 'conv1.weight'."),
    epochs: int = typer.Option(1, help="Training epochs."),
    batch_size: int = typer.Option(128, help="Batch size."),
    lr: float = typer.Option(0.05, help="SGD learning rate (momentum 0.9, cosine decay)."),
    seed: int = typer.Option(0, help="Seed for init, data order and the method's RNG."),
    compare_dense: bool = typer.Option(False, "--compare-dense", help="Also train the dense model with the same settings."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Path | None = typer.Option(None, help="Write a per-layer-sparsity-over-training PNG here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json / --plot file."),
    data_dir: Path | None = typer.Option(None, help="Folder with the Fashion-MNIST IDX(.gz) files."),
    train_subset: int | None = typer.Option(None, help="Use only the first N training examples."),
    threads: int | None = typer.Option(None, help="torch.set_num_threads (default: torch's)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a small model sparse from scratch and report accuracy, sparsity and time."""
    import math

    import torch

    from ..atomic import check_output_file
    from ..cli import console
    from ..data.fashion_mnist import load_fashion_mnist
    from ..errors import DataError
    from ..models import get_model
    from .loop import NM_METHODS, build_sparsifier, fit

    # every argument and output path is checked before the data is read
    if dataset.lower().replace("_", "-") != "fashion-mnist":
        raise DataError(f"unknown dataset {dataset!r}; available: fashion-mnist.")
    if epochs < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise DataError(f"--epochs and --batch-size must be >= 1 and --lr a positive number; got {epochs}, "
                        f"{batch_size}, {lr}.")
    if (train_subset is not None and train_subset < 1) or (threads is not None and threads < 1):
        raise DataError("--train-subset and --threads must be >= 1.")
    for path in (json_path, plot):
        if path is not None:
            check_output_file(path, overwrite=overwrite)
    get_model(model)  # an unknown model name fails here
    kw = {"allocation": allocation, "seed": seed}
    if dense:
        kw["dense"] = [d.strip() for d in dense.split(",") if d.strip()]
    if method.lower() in NM_METHODS:
        kw = {"pattern": pattern, "seed": seed}
    train_size = min(train_subset, FASHION_MNIST_TRAIN) if train_subset else FASHION_MNIST_TRAIN
    build_sparsifier(method, sparsity, math.ceil(train_size / batch_size) * epochs, **kw)  # validates
    if threads:
        torch.set_num_threads(threads)
    train = load_fashion_mnist("train", data_dir, subset=train_subset)
    test = load_fashion_mnist("test", data_dir)
    total = math.ceil(len(train[0]) / batch_size) * epochs
    sp = build_sparsifier(method, sparsity, total, **kw)
    torch.manual_seed(seed)
    net = get_model(model)
    res = fit(net, sp, train, test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, desc=method)
    out = {
        "dataset": "fashion-mnist",
        "model": model,
        "method": method,
        "sparsity_target": (sp.sparsity if sp is not None else 0.0),
        "sparsity_actual": res.sparsity_actual,
        "accuracy": res.accuracy,
        "accuracy_per_epoch": res.accuracy_per_epoch,
        "seconds": res.seconds,
        "seconds_per_epoch": res.seconds_per_epoch,
        "epochs": epochs,
        "train_examples": len(train[0]),
        "layer_sparsity": res.layer_sparsity,
    }
    if compare_dense:
        torch.manual_seed(seed)
        dense = fit(get_model(model), None, train, test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, desc="dense")
        out.update(accuracy_dense=dense.accuracy, seconds_dense=dense.seconds, seconds_per_epoch_dense=dense.seconds_per_epoch)
    console.print(
        f"{method}: accuracy {res.accuracy:.2f}%  sparsity {res.sparsity_actual:.4f} (target {out['sparsity_target']:.4f})  "
        f"{res.seconds:.1f}s" + (f"  | dense {out['accuracy_dense']:.2f}% {out['seconds_dense']:.1f}s" if compare_dense else "")
    )
    if plot is not None and sp is not None:
        from .plots import plot_layer_sparsity

        plot_layer_sparsity(res.history, plot, title=f"{method} {out['sparsity_target']:.2f}")
    if json_path is not None:
        from ..atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps(out, indent=2) + "\n", overwrite=overwrite)


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the sparsetorch CLI."""
    app.command("train")(train_command)
