"""``sparsetorch train``: sparse training of a small model on Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import typer

#: examples in the Fashion-MNIST training split (the run length is known before the data is read)
FASHION_MNIST_TRAIN = 60_000
#: DP-SGD defaults, applied only with --dp-epsilon / --dp-noise-multiplier (the options default to
#: None so that a DP flag given without DP-SGD can be refused, even at its default value)
DP_DELTA, DP_CLIP, DP_ACCOUNTANT = 1e-5, 1.0, "prv"


def train_command(
    dataset: str = typer.Option("fashion-mnist", help="Dataset; only 'fashion-mnist' for now."),
    model: str = typer.Option("cnn", help="'cnn' (2 conv + 2 linear) or 'mlp' (300-100)."),
    method: str = typer.Option("rigl", help="dense, random/static, snip, grasp, synflow, gmp, set, rigl, snfs, acdc, ste, srste, nm_progressive, nm_decay; learned: hypersparse, group_lasso, kgroup, l0, ste_gates, dass, random_search."),
    sparsity: float = typer.Option(0.9, help="Target fraction of zeros in [0, 1) (ignored by N:M methods)."),
    pattern: str = typer.Option("2:4", help="N:M pattern for ste/srste/nm_progressive/nm_decay."),
    allocation: str | None = typer.Option(None, help="erk, er, uniform or global (default: the method's own)."),
    dense: str | None = typer.Option(None, help="Comma-separated weights kept dense, e.g. 'first' or 'first,last' or 'conv1.weight'."),
    method_arg: list[str] = typer.Option([], "--method-arg", help="A method option as KEY=VALUE (YAML value), repeatable, e.g. --method-arg lam=1e-4 --method-arg groups=row."),
    epochs: int = typer.Option(1, help="Training epochs."),
    batch_size: int | None = typer.Option(None, help="Batch size (default 128; with DP-SGD the expected Poisson batch size, default 512)."),
    lr: float | None = typer.Option(None, help="SGD learning rate, momentum 0.9, cosine decay (default 0.05; with DP-SGD 2.0)."),
    seed: int = typer.Option(0, help="Seed for init, data order and the method's RNG."),
    compare_dense: bool = typer.Option(False, "--compare-dense", help="Also train the dense model with the same settings."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Path | None = typer.Option(None, help="Write a per-layer-sparsity-over-training PNG here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json / --plot file."),
    data_dir: Path | None = typer.Option(None, help="Folder with the Fashion-MNIST IDX(.gz) files."),
    train_subset: int | None = typer.Option(None, help="Use only the first N training examples."),
    threads: int | None = typer.Option(None, help="torch.set_num_threads (default: torch's)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    dp_epsilon: float | None = typer.Option(None, "--dp-epsilon", help="Train with DP-SGD to this epsilon (the noise multiplier is calibrated to it)."),
    dp_delta: float | None = typer.Option(None, "--dp-delta", help=f"DP-SGD delta (default {DP_DELTA:g})."),
    dp_clip: float | None = typer.Option(None, "--dp-clip", help=f"DP-SGD per-sample clipping norm on the live coordinates (default {DP_CLIP:g})."),
    dp_noise_multiplier: float | None = typer.Option(None, "--dp-noise-multiplier", help="DP-SGD with this noise multiplier instead of --dp-epsilon (epsilon is then reported)."),
    dp_accountant: str | None = typer.Option(None, "--dp-accountant", help=f"Privacy accountant: prv (Opacus's default, tighter) or rdp (default {DP_ACCOUNTANT})."),
    dp_mask_is_public: bool = typer.Option(False, "--dp-mask-is-public", help="State that a data-dependent mask (snip, grasp) may be computed on the training data because it is public; otherwise DP-SGD refuses such masks."),
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

    private = dp_epsilon is not None or dp_noise_multiplier is not None
    batch_size = batch_size if batch_size is not None else (512 if private else 128)
    lr = lr if lr is not None else (2.0 if private else 0.05)
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
    if method_arg:
        kw.update(parse_method_args(method, method_arg))
    train_size = min(train_subset, FASHION_MNIST_TRAIN) if train_subset else FASHION_MNIST_TRAIN
    checked = build_sparsifier(method, sparsity, math.ceil(train_size / batch_size) * epochs, **kw)  # validates
    if private:
        from ..errors import require
        from ..privacy import check_mask_privacy, check_privacy_args
        from ..privacy.dpsgd import check_dp_options

        dp_delta = DP_DELTA if dp_delta is None else dp_delta
        dp_clip = DP_CLIP if dp_clip is None else dp_clip
        dp_accountant = DP_ACCOUNTANT if dp_accountant is None else dp_accountant
        check_privacy_args(epsilon=dp_epsilon, delta=dp_delta, clip=dp_clip,
                           noise_multiplier=dp_noise_multiplier, accountant=dp_accountant)
        check_dp_options(dp_epsilon, dp_noise_multiplier, batch_size, train_size, epochs)
        check_mask_privacy(checked, mask_is_public=dp_mask_is_public)
        require("opacus", "privacy")  # the accountant: missing, it would fail after the data or the run
    else:
        given = [flag for flag, value in (("--dp-delta", dp_delta), ("--dp-clip", dp_clip),
                                          ("--dp-accountant", dp_accountant),
                                          ("--dp-mask-is-public", dp_mask_is_public or None))
                 if value is not None]
        if given:
            raise DataError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to DP-SGD: "
                            "add --dp-epsilon or --dp-noise-multiplier, or leave "
                            f"{'it' if len(given) == 1 else 'them'} out to train without privacy.")
    if threads:
        torch.set_num_threads(threads)
    train = load_fashion_mnist("train", data_dir, subset=train_subset)
    test = load_fashion_mnist("test", data_dir)
    total = math.ceil(len(train[0]) / batch_size) * epochs
    sp = build_sparsifier(method, sparsity, total, **kw)
    if private:
        _train_private(dict(
            model=model, method=method, sp=sp, train=train, test=test, seed=seed, epochs=epochs,
            batch_size=batch_size, lr=lr, progress=progress, compare_dense=compare_dense, plot=plot,
            json_path=json_path, overwrite=overwrite, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
            dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier, dp_accountant=dp_accountant,
            dp_mask_is_public=dp_mask_is_public,
        ))
        return
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


def parse_method_args(method: str, items: list[str]) -> dict:
    """``["lam=1e-4", "groups=row"]`` -> ``{"lam": 1e-4, "groups": "row"}``, keys checked against the method.

    Values are read as YAML (numbers, booleans, lists, mappings); an unknown key or a malformed item
    is a :class:`~sparsetorch.errors.MethodError` naming the accepted keys.
    """
    import yaml

    from ..errors import MethodError, close_matches
    from ..recipes import _accepted, recipe_loader
    from . import METHODS

    key = method.lower().replace("-", "_")
    ok = _accepted(METHODS[key]) if key in METHODS else set()
    out: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise MethodError(f"--method-arg needs KEY=VALUE, got {item!r} (e.g. --method-arg lam=1e-4).")
        if ok and name not in ok:
            raise MethodError(f"unknown option {name!r} for method {key!r}; accepted: {', '.join(sorted(ok))}."
                              + close_matches(name, ok))
        try:
            out[name] = yaml.load(raw, Loader=recipe_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise MethodError(f"--method-arg {item!r}: the value is not valid YAML: {exc}") from None
    return out


def _train_private(a: dict) -> None:
    """The DP-SGD branch of ``train``: ``a`` holds its checked arguments, the loaded data
    (``train``, ``test``) and the unattached sparsifier ``sp``."""
    import torch

    from ..atomic import atomic_write_text
    from ..cli import console
    from ..models import get_model
    from ..privacy import dp_fit

    def run(sp, desc: str):  # noqa: ANN001, ANN202
        torch.manual_seed(a["seed"])
        return dp_fit(get_model(a["model"]), sp, a["train"], a["test"], epsilon=a["dp_epsilon"],
                      noise_multiplier=a["dp_noise_multiplier"], delta=a["dp_delta"], clip=a["dp_clip"],
                      epochs=a["epochs"], batch_size=a["batch_size"], lr=a["lr"],
                      accountant=a["dp_accountant"], mask_is_public=a["dp_mask_is_public"],
                      seed=a["seed"], progress=a["progress"], desc=desc)

    sp = a["sp"]
    res = run(sp, f"dp-sgd {a['method']}")
    out = {
        "dataset": "fashion-mnist", "model": a["model"], "method": a["method"], "private": True,
        "sparsity_target": (sp.sparsity if sp is not None else 0.0),
        "sparsity_actual": res.sparsity_actual, "accuracy": res.accuracy,
        "accuracy_per_epoch": res.accuracy_per_epoch, "epsilon": res.epsilon, "delta": res.delta,
        "noise_multiplier": res.noise_multiplier, "sample_rate": res.sample_rate, "steps": res.steps,
        "clip": res.clip, "accountant": res.accountant, "expected_batch_size": a["batch_size"],
        "mean_batch": res.mean_batch, "clipped_fraction": res.clipped_fraction,
        "seconds": res.seconds, "seconds_per_step": res.seconds_per_step, "epochs": a["epochs"],
        "lr": a["lr"], "train_examples": len(a["train"][0]), "layer_sparsity": res.layer_sparsity,
    }
    if a["compare_dense"]:
        dense = run(None, "dp-sgd dense")
        out.update(accuracy_dense=dense.accuracy, seconds_dense=dense.seconds)
    console.print(
        f"DP-SGD {a['method']}: accuracy {res.accuracy:.2f}%  epsilon {res.epsilon:.3f} at delta "
        f"{res.delta:g} (noise multiplier {res.noise_multiplier:.3f}, sample rate "
        f"{res.sample_rate:.4g}, {res.steps} steps)  sparsity {res.sparsity_actual:.4f}  {res.seconds:.1f}s"
        + (f"  | dense DP-SGD {out['accuracy_dense']:.2f}%" if a["compare_dense"] else "")
    )
    if a["plot"] is not None and sp is not None:
        from .plots import plot_layer_sparsity

        plot_layer_sparsity(sp.history, a["plot"], title=f"{a['method']} {out['sparsity_target']:.2f} (DP-SGD)")
    if a["json_path"] is not None:
        atomic_write_text(a["json_path"], json.dumps(out, indent=2) + "\n", overwrite=a["overwrite"])


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the sparsetorch CLI."""
    app.command("train")(train_command)
