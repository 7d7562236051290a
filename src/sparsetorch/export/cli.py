"""``sparsetorch export``: write a compressed checkpoint from a model folder and print its sizes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CheckpointError

MASKS_FILE = "masks.safetensors"  # same name as sparsetorch.analysis.report.MASKS_FILE

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _folder_dtype(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return d if d in _DTYPES[1:] else "float32"


def print_summary(path: Path, console) -> dict[str, int]:  # noqa: ANN001 - a rich Console
    """Print per-tensor formats and sizes of a compressed checkpoint; return the totals.

    Full names and numbers at any width (:func:`sparsetorch.tables.print_rows`)."""
    from ..tables import print_rows
    from .checkpoint import checkpoint_summary

    rows = checkpoint_summary(path)
    cells: list[list[str]] = []
    dense = stored = 0
    tied_notes: list[str] = []
    for r in rows:
        dense += r.dense_bytes
        stored += r.stored_bytes
        if r.tied_to:
            cells.append([r.name, "tied", "", "", "", "0 B", "0 B", ""])
            tied_notes.append(f"{r.name} is tied to {r.tied_to} (stored once)")
            continue
        cells.append([r.name, r.format, "x".join(map(str, r.shape)), r.dtype, r.pattern or "",
                      _human(r.dense_bytes), _human(r.stored_bytes), f"{r.ratio:.3f}"])
    print_rows(console, ["tensor", "format", "shape", "dtype", "pattern", "dense", "stored", "ratio"], cells,
               title=str(path), left=5,
               footer=["total", "", "", "", "", _human(dense), _human(stored), f"{stored / max(dense, 1):.3f}"])
    for note in tied_notes:
        console.print(note)
    file_bytes = path.stat().st_size
    console.print(
        f"tensors: dense {_human(dense)} -> stored {_human(stored)} ({stored / max(dense, 1):.3f}x); "
        f"file {_human(file_bytes)} ({file_bytes / max(dense, 1):.3f}x of the dense tensor bytes)",
        soft_wrap=True,
    )
    return {"dense_bytes": dense, "stored_bytes": stored, "file_bytes": file_bytes}


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to the sparsetorch CLI."""

    @app.command("export")
    def export(
        source: str = typer.Argument(..., help="A Hugging Face model folder (e.g. from `sparsetorch prune --out`) or 'smollm2'."),
        fmt: str = typer.Option("auto", "--format", help="auto | dense | bitmask | csr | n:m (auto: smallest per tensor)."),
        out: Path = typer.Option(..., "--out", help="Output folder (compressed file + config + tokenizer) or a .safetensors file."),
        dtype: str = typer.Option("auto", help="auto (the folder's dtype) | float32 | float16 | bfloat16."),
        masks_path: Path | None = typer.Option(None, "--masks", help=f"Masks file (default: SOURCE/{MASKS_FILE} if present)."),
        hf_folder: Path | None = typer.Option(None, "--hf-folder", help="Also write a plain HF folder (dense weights with zeros)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out / --hf-folder (never the input)."),
        quantize: str | None = typer.Option(None, "--quantize", help="int8: store the sparse layers' values as int8 "
                                            "with per-row scales (format version 3; lossy, pruned zeros exact)."),
    ) -> None:
        """Write a compressed sparse checkpoint and print per-layer formats and sizes.

        A folder ``--out`` (compressed file + config + tokenizer) is written in one atomic step;
        an existing non-empty ``--out`` folder, ``--out`` file or ``--hf-folder`` is replaced
        only with ``--overwrite``, and an output that is, contains or lies inside SOURCE never.
        """
        import torch
        from rich.console import Console

        from ..atomic import atomic_dir, atomic_path, check_output_dir, check_output_file
        from ..data.llm import load_causal_lm
        from ..masks import MaskSet
        from .checkpoint import DEFAULT_FILENAME, save, save_hf_folder
        from .formats import Format

        console = Console()
        if fmt != "auto" and fmt not in {f.value for f in Format}:
            raise CheckpointError(f"--format must be auto or one of {', '.join(f.value for f in Format)}, got {fmt!r}.")
        if dtype not in _DTYPES:
            raise CheckpointError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
        if quantize not in (None, "int8"):
            raise CheckpointError(f"--quantize must be int8 (or left out), got {quantize!r}.")
        src = Path(source)
        inputs = [src] if src.exists() else []
        if masks_path is not None:
            inputs.append(masks_path)
        # refuse outputs that would lose files before the (possibly long) load
        single_file = out.suffix == ".safetensors"
        if single_file:
            check_output_file(out, inputs=inputs, overwrite=overwrite)
        else:
            check_output_dir(out, inputs=inputs, overwrite=overwrite)
        if hf_folder is not None:
            check_output_dir(hf_folder, inputs=[*inputs, out], overwrite=overwrite)
        if dtype == "auto":
            dtype = _folder_dtype(src) if src.is_dir() else "float32"
        model, tokenizer = load_causal_lm(source, dtype=getattr(torch, dtype), progress=False)
        mpath = masks_path if masks_path is not None else (src / MASKS_FILE if src.is_dir() else None)
        masks = None
        if mpath is not None and mpath.is_file():
            masks = MaskSet.load(mpath)
            console.print(f"masks: {mpath} ({len(masks)} tensors)")
        elif masks_path is not None:
            raise CheckpointError(f"masks file {masks_path} does not exist.")
        if single_file:
            with atomic_path(out, overwrite=overwrite) as tmp:
                save(model, tmp, format=fmt, masks=masks, quantize=quantize)
            target = out
        else:
            with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
                save(model, tmp / DEFAULT_FILENAME, format=fmt, masks=masks, quantize=quantize)
                model.config.save_pretrained(str(tmp))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
            target = out / DEFAULT_FILENAME
        print_summary(target, console)
        console.print(f"wrote {target}")
        if hf_folder is not None:
            saved = save_hf_folder(model, hf_folder, tokenizer, overwrite=overwrite)
            console.print(f"wrote Hugging Face folder {saved}")
