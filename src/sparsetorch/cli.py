"""``sparsetorch`` command line: a thin typer layer over the Python API.

Errors of the library (:class:`SparseTorchError`) are printed without a traceback and the
command exits with status 2. Subpackages add their own commands in the registration block
at the bottom (one line each).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .errors import SparseTorchError

app = typer.Typer(
    name="sparsetorch",
    help="Sparse neural networks: prune, train sparse, verify, export, run fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _register(module: str) -> None:
    """Import ``module`` and call its ``register(app)`` to add its commands."""
    importlib.import_module(module).register(app)


# --- core commands: prune, report, verify ---------------------------------------------------


def _say(text: str) -> None:
    """Print a status line without hard-wrapping it (logs stay greppable)."""
    console.print(text, soft_wrap=True, highlight=False)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (:func:`sparsetorch.memory.peak_rss_mb`: its
    own peak, not one inherited from a parent that started it)."""
    from .memory import peak_rss_mb

    return peak_rss_mb()


def parse_options(items: list[str]) -> dict:
    """``["refit=0", "true_sequential=true"]`` -> ``{"refit": 0, "true_sequential": True}`` (YAML scalars)."""
    import yaml

    from .errors import MethodError

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(f"--option wants KEY=VALUE (e.g. refit=20), got {item!r}.")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def write_json_summary(json_path: Path | None, result: dict, overwrite: bool) -> None:
    """Write a command's ``--json`` summary atomically (nothing when ``json_path`` is None)."""
    if json_path is None:
        return
    import json

    from .atomic import atomic_write_text

    atomic_write_text(json_path, json.dumps(result, indent=2, default=str) + "\n", overwrite=overwrite)
    _say(f"wrote {escape(str(json_path))}")


def check_outputs(model: str, out: Path | None, json_path: Path | None, overwrite: bool) -> list[Path]:
    """Fail before any work if ``--out`` / ``--json`` cannot be written; return the input folders.

    ``--out`` must not be, contain or lie inside the ``--model`` folder, an existing output is
    replaced only with ``--overwrite``, and the location must be writable
    (:func:`sparsetorch.atomic.check_output_dir` / ``check_output_file``).
    """
    from .atomic import check_output_dir, check_output_file

    src = Path(model).expanduser()
    inputs = [src] if src.is_dir() else []
    if out is not None:
        check_output_dir(out, inputs=inputs, overwrite=overwrite)
    if json_path is not None:
        check_output_file(json_path, inputs=inputs, overwrite=overwrite)
        if out is not None and Path(json_path).expanduser().absolute().is_relative_to(
            Path(out).expanduser().absolute()
        ):
            from .errors import OutputExistsError

            raise OutputExistsError(f"--json {json_path} is inside --out {out}, which is replaced as a whole; "
                                    "write the JSON elsewhere (the folder gets sparsetorch.json anyway).")
    return inputs


def _prune_streamed(req, model, calib_samples, seq_len, targets, ignore,  # noqa: ANN001
                    out, json_path, overwrite) -> None:
    """``prune --stream``: :func:`sparsetorch.oneshot.offload.prune_pretrained` from the shell."""
    import json

    import transformers

    from .data.text import calibration_windows
    from .oneshot.offload import prune_pretrained

    src = Path(model).expanduser()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    calib = calibration_windows(tokenizer, calib_samples, seq_len)
    _say(f"streaming {escape(str(src))} -> {escape(str(out))}: {req.method} {req.pattern}, "
         f"{calib.shape[0]}x{seq_len} calibration tokens")
    report = prune_pretrained(src, out, req.method, req.sparsity, req.pattern, calibration=calib, tokenizer=tokenizer,
                              targets=targets or None, ignore=ignore or None, num_samples=calib_samples,
                              seq_len=seq_len, overwrite=overwrite, **req.options)
    _say(f"pruned {len(report.masks)} tensors in {report.seconds_prune:.1f} s: sparsity {report.sparsity_actual:.4f}; "
         f"wrote {escape(str(report.extra['out_dir']))} (evaluate with: sparsetorch eval {escape(str(out))})")
    if json_path is not None:
        from .atomic import atomic_write_text

        result = {
            "model": model, "method": report.method, "pattern": report.pattern, "allocation": report.allocation,
            "sparsity_target": report.sparsity_target, "sparsity_actual": report.sparsity_actual,
            "ppl_dense": None, "ppl_sparse": None, "seconds_prune": report.seconds_prune,
            "peak_rss_mb": _peak_rss_mb(), "calib_samples": int(calib.shape[0]), "seq_len": seq_len,
            "layers_pruned": len(report.masks), "options": req.options, "streamed": True, "out": report.extra["out_dir"],
        }
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str) + "\n", overwrite=overwrite)
        _say(f"wrote {escape(str(json_path))}")


def _check_stream(req, model: str, out: Path | None) -> None:  # noqa: ANN001
    """The combinations ``--stream`` supports (checked before any work)."""
    from .errors import MethodError, ModelError

    if not (Path(model).expanduser() / "config.json").is_file():
        raise ModelError(f"--stream reads a local Hugging Face folder (with config.json and safetensors); got {model!r}.")
    if out is None:
        raise MethodError("--stream writes the pruned model block by block: pass --out DIR.")
    if req.data_free:
        raise MethodError(f"--stream runs the calibrated block pipeline; {req.method!r} needs no calibration: drop --stream.")
    if req.allocation != "uniform":
        raise MethodError("--stream supports only --allocation uniform (OWL/sensitivity need a dense pass over all blocks).")


@app.command()
def prune(
    model: str = typer.Option("smollm2", "--model", "-m", help="'smollm2' or a local Hugging Face causal-LM folder."),
    method: str = typer.Option("magnitude", help="magnitude, random, or a calibrated one-shot method (wanda, sparsegpt ...)."),
    sparsity: float | None = typer.Option(None, help="Fraction of zeros in [0, 1); default 0.5, or implied by an N:M pattern."),
    pattern: str = typer.Option("unstructured", help="unstructured, N:M (e.g. 2:4), blockHxW, channel."),
    allocation: str = typer.Option("uniform", help="How sparsity splits across layers: uniform, er, erk, global, owl."),
    calib_samples: int = typer.Option(64, help="Calibration windows (calibrated methods only)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration/evaluation window."),
    eval_windows: int = typer.Option(16, help="Evaluation windows for perplexity (0 skips evaluation)."),
    batch_size: int = typer.Option(4, help="Evaluation batch size."),
    targets: list[str] | None = typer.Option(None, "--targets", help="Layers to prune (repeatable): names, class names or re:<regex>."),
    ignore: list[str] | None = typer.Option(None, "--ignore", help="Layers to keep dense (repeatable)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the pruned HF model folder here."),
    json_path: Path | None = typer.Option(None, "--json", help="Write a JSON summary of the run here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder / --json file."),
    sample: str | None = typer.Option(None, help="Prompt for a greedy sample before and after pruning."),
    table: bool = typer.Option(True, help="Print the sparsity table (one line per layer kind)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print every layer in the table, not one line per kind."),
    option: list[str] | None = typer.Option(
        None, "--option", help="Method/pipeline option KEY=VALUE (repeatable), e.g. refit=0, true_sequential=true, reconstruct=true."
    ),
    stream: bool = typer.Option(
        False, "--stream", help="Models larger than RAM: read one block at a time from the HF folder --model and write the "
        "pruned model to --out block by block (calibrated methods, uniform allocation; no evaluation: run 'sparsetorch eval OUT')."
    ),
) -> None:
    """Prune a causal LM one-shot; print dense/sparse perplexity and a sparsity table."""
    import json
    import time

    from .analysis.report import MASKS_FILE, layer_rows, plot_sparsity
    from .errors import DataError, ModelError
    from .patterns import parse_pattern
    from .prune import check_request
    from .tables import print_layer_table

    # validate every argument and output path before the expensive model load
    if seq_len < 2 or eval_windows < 0 or calib_samples < 1 or batch_size < 1:
        raise DataError("--seq-len must be >= 2, --eval-windows >= 0, --calib-samples >= 1, --batch-size >= 1.")
    options = parse_options(option or [])
    pat = parse_pattern(pattern)
    sparsity_arg = sparsity if sparsity is not None else (None if pat.fixed_sparsity is not None else 0.5)
    req = check_request(method, sparsity_arg, pat, allocation=allocation, options=options,
                        num_samples=calib_samples, seq_len=seq_len)
    if stream:
        _check_stream(req, model, out)
    from .data.llm import model_max_positions

    limit = model_max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelError(f"--seq-len {seq_len} is longer than {model!r} accepts ({limit} positions, "
                         f"config.max_position_embeddings); pass --seq-len <= {limit}.")
    inputs = check_outputs(model, out, json_path, overwrite)
    if stream:
        _prune_streamed(req, model, calib_samples, seq_len, targets, ignore, out, json_path, overwrite)
        return

    from .data.llm import load_causal_lm, save_hf_model
    from .data.text import calibration_windows
    from .data.text import eval_windows as make_eval_windows
    from .evaluate import generate_sample, perplexity
    from .prune import prune as prune_model

    _say(f"loading [bold]{escape(model)}[/] ...")
    t0 = time.perf_counter()
    lm, tokenizer = load_causal_lm(model, progress=True)
    seconds_load = time.perf_counter() - t0
    _say(f"loaded {type(lm).__name__} in {seconds_load:.1f} s")

    ew = make_eval_windows(tokenizer, eval_windows, seq_len) if eval_windows else None
    t0 = time.perf_counter()
    ppl_dense = perplexity(lm, windows=ew, batch_size=batch_size) if ew is not None else None
    seconds_eval = time.perf_counter() - t0
    if ppl_dense is not None:
        _say(f"dense perplexity ({ew.shape[0]}x{seq_len} tokens): [bold]{ppl_dense:.3f}[/]")
    sample_dense = generate_sample(lm, tokenizer, sample) if sample else None

    calib = None
    if not req.data_free:
        _say(f"calibration: {calib_samples} windows x {seq_len} tokens")
        calib = calibration_windows(tokenizer, calib_samples, seq_len)
    report = prune_model(
        lm,
        req.method,
        req.sparsity,
        req.pattern,
        allocation=req.allocation,
        targets=targets or None,
        ignore=ignore or None,
        calibration=calib,
        tokenizer=tokenizer,
        num_samples=calib_samples,
        seq_len=seq_len,
        **req.options,
    )
    _say(
        f"pruned {len(report.masks)} tensors with {report.method} ({report.pattern}, {report.allocation}) "
        f"in {report.seconds_prune:.1f} s: sparsity {report.sparsity_actual:.4f}"
    )
    ppl_sparse = perplexity(lm, windows=ew, batch_size=batch_size) if ew is not None else None
    if ppl_sparse is not None:
        _say(f"sparse perplexity: [bold]{ppl_sparse:.3f}[/]")
    rows = layer_rows(lm, report.masks)
    if table:
        print_layer_table(rows, console, title=f"{model}: {report.method} {report.pattern}", per_layer=per_layer)
    sample_sparse = generate_sample(lm, tokenizer, sample) if sample else None
    if sample:
        _say(f"[bold]prompt[/]: {escape(sample)}\n[bold]dense[/]: {escape(sample_dense or '')}")
        _say(f"[bold]sparse[/]: {escape(sample_sparse or '')}")

    result = {
        "model": model,
        "method": report.method,
        "pattern": report.pattern,
        "allocation": report.allocation,
        "sparsity_target": report.sparsity_target,
        "sparsity_actual": report.sparsity_actual,
        "ppl_dense": ppl_dense,
        "ppl_sparse": ppl_sparse,
        "seconds_prune": report.seconds_prune,
        "seconds_load": seconds_load,
        "seconds_eval_dense": seconds_eval,
        "peak_rss_mb": _peak_rss_mb(),
        "calib_samples": 0 if calib is None else int(calib.shape[0]),
        "seq_len": seq_len,
        "eval_windows": 0 if ew is None else int(ew.shape[0]),
        "layers_pruned": len(report.masks),
        "options": req.options,
    }
    if sample:
        result["sample"] = {"prompt": sample, "dense": sample_dense, "sparse": sample_sparse}
    if out is not None:
        full = {**result, "report": report.to_dict(), "rows": rows}

        def extra(tmp: Path) -> None:
            report.masks.save(tmp / MASKS_FILE)
            plot_sparsity(rows, tmp / "sparsity.png", title=f"{model}: {report.method} {report.pattern}")
            (tmp / "sparsetorch.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")

        saved = save_hf_model(lm, tokenizer, out, extra=extra, overwrite=overwrite, inputs=inputs)
        _say(f"saved Hugging Face model folder, {MASKS_FILE}, sparsity.png, sparsetorch.json to {escape(str(saved))}")
    write_json_summary(json_path, result, overwrite)


@app.command()
def report(
    folder: Path = typer.Argument(..., help="A model folder written by `sparsetorch prune --out`."),
    plot: Path | None = typer.Option(None, help="Also write a per-layer sparsity bar plot (PNG)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print every layer, not one line per layer kind."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --plot / --json file."),
) -> None:
    """Print the sparsity table of a saved model (weights; masks if present), one line per layer kind."""
    import json

    from .analysis.report import folder_report, plot_sparsity, summary
    from .atomic import check_output_file
    from .tables import print_layer_table

    for path in (plot, json_path):
        if path is not None:
            check_output_file(path, inputs=[folder], overwrite=overwrite)
    rows, masks = folder_report(folder)
    src = "masks.safetensors + weights" if masks is not None else "weights (no masks file)"
    print_layer_table(rows, console, title=f"{folder} ({src})", per_layer=per_layer)
    if plot is not None:
        plot_sparsity(rows, plot)
        _say(f"wrote {escape(str(plot))}")
    if json_path is not None:
        from .atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps({"summary": summary(rows), "rows": rows}, indent=2) + "\n",
                          overwrite=overwrite)
        _say(f"wrote {escape(str(json_path))}")


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="A model folder with masks.safetensors (from `sparsetorch prune --out`)."),
) -> None:
    """Check that every masked weight is exactly zero and every pattern holds; exit 2 otherwise."""
    from .analysis.report import verify_folder

    masks = verify_folder(folder)
    pats = sorted({str(p) for p in masks.patterns.values()})
    _say(
        f"OK: {len(masks)} tensors in {escape(str(folder))}: every pruned weight is zero and the pattern holds "
        f"({', '.join(pats)}); sparsity {masks.sparsity().overall:.4f}"
    )


# --- subcommands registered by subpackages (one line each; keep this block at the end) ---
_register("sparsetorch.export.cli")
_register("sparsetorch.training.cli")
_register("sparsetorch.inference.cli")
_register("sparsetorch.oneshot.cli")
_register("sparsetorch.finetune.cli")
_register("sparsetorch.stages_cli")
_register("sparsetorch.distributed.cli")
_register("sparsetorch.structured.cli")
_register("sparsetorch.dictionaries.cli")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Usage errors (unknown flag, a value that does not parse, a missing argument) are handled by
    typer itself in standalone mode: it prints the short usage message and exits 2. (typer
    bundles its own copy of click, so catching ``click.ClickException`` here would never match.)
    Every :class:`SparseTorchError` is printed as one line, without traceback, exit status 2.
    Any other exception is a bug and keeps its traceback.
    """
    try:
        app(args=argv, prog_name="sparsetorch", standalone_mode=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        return  # success: return normally (callers such as tests need no SystemExit handling)
    except SparseTorchError as exc:
        # escape: messages hold brackets, e.g. 'sparsetorch[llm]'
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
