"""Per-layer sparsity report (name, shape, params, nonzeros, sparsity) and a bar plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import CheckpointError
from ..masks import MaskSet

MASKS_FILE = "masks.safetensors"
_SKIP_WORDS = ("embed", "lm_head", "wte", "wpe", "norm")


def _row(name: str, shape: Sequence[int], params: int, nonzeros: int) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(shape),
        "params": int(params),
        "nonzeros": int(nonzeros),
        "sparsity": 1.0 - nonzeros / params if params else 0.0,
    }


def layer_rows(
    source: nn.Module | MaskSet | Mapping[str, Tensor],
    masks: MaskSet | None = None,
    *,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per sparse tensor: ``name, shape, params, nonzeros, sparsity``.

    ``source`` is a model (non-zeros counted in the weights), a :class:`MaskSet` (kept
    entries counted in the masks) or a name->tensor mapping such as a loaded state dict.
    Layers are those of ``masks`` when given, else the default targets of the model (for a
    mapping: every weight with two or more dimensions except embeddings, heads and norms).
    """
    if isinstance(source, MaskSet):
        return [_row(n, m.shape, m.numel(), int(m.sum())) for n, m in source.items()]
    if isinstance(source, nn.Module):
        if masks is not None:
            params = dict(source.named_parameters())
            tensors = {n: params[n] for n in masks if n in params}
        else:
            from ..targets import select

            tensors = select(source, targets, ignore)
    else:
        if masks is not None:
            tensors = {n: source[n] for n in masks if n in source}
        else:
            tensors = {
                n: t
                for n, t in source.items()
                if t.ndim >= 2 and n.endswith("weight") and not any(w in n.lower() for w in _SKIP_WORDS)
            }
    with torch.no_grad():
        return [_row(n, t.shape, t.numel(), int(torch.count_nonzero(t))) for n, t in tensors.items()]


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over ``rows``: layers, params, nonzeros and overall sparsity."""
    params = sum(r["params"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    return {
        "layers": len(rows),
        "params": params,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / params if params else 0.0,
    }


def rich_table(rows: Sequence[Mapping[str, Any]], title: str = "per-layer sparsity") -> Any:
    """A ``rich.table.Table`` of ``rows`` with a total line."""
    from rich.table import Table

    table = Table(title=title, show_footer=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("shape", justify="right")
    table.add_column("params", justify="right")
    table.add_column("nonzeros", justify="right")
    table.add_column("sparsity", justify="right")
    for r in rows:
        table.add_row(
            r["name"], "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['nonzeros']:,}", f"{r['sparsity']:.4f}"
        )
    s = summary(rows)
    table.add_section()
    table.add_row(f"total ({s['layers']} layers)", "", f"{s['params']:,}", f"{s['nonzeros']:,}", f"{s['sparsity']:.4f}")
    return table


def table_width(rows: Sequence[Mapping[str, Any]]) -> int:
    """Console width that shows the table of ``rows`` without wrapping layer names."""
    name = max([len(r["name"]) for r in rows] + [20])
    shape = max([len("x".join(map(str, r["shape"]))) for r in rows] + [5])
    return name + shape + 50


def print_table(rows: Sequence[Mapping[str, Any]], console: Any = None, title: str = "per-layer sparsity") -> None:
    """Print the table of ``rows`` to a rich console, wide enough for full layer names."""
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(rich_table(rows, title=title), width=max(console.width, table_width(rows)))


def plot_sparsity(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a PNG bar plot of per-layer sparsity to ``path`` (atomically); return the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(max(6.0, min(24.0, 0.08 * n + 4)), 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(n), [r["sparsity"] for r in rows], width=0.8, color="#3b6ea8")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_xlabel("layer")
    step = max(1, n // 30)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    short = [".".join(rows[i]["name"].split(".")[-4:-1]) or rows[i]["name"] for i in ticks]
    ax.set_xticklabels(short, rotation=90, fontsize=6)
    s = summary(rows)
    ax.set_title(title or f"per-layer sparsity ({s['layers']} layers, overall {s['sparsity']:.3f})")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


INDEX_FILE = "model.safetensors.index.json"


def folder_member(folder: str | os.PathLike[str], name: object, *, source: str = "") -> Path:
    """``folder / name`` for a file name read from a file (``weight_map`` entry ...), refused with
    :class:`CheckpointError` when it would leave ``folder``: not a string, empty, absolute, a
    drive, a ``..`` part, a backslash or NUL, or a symlink that resolves outside ``folder``.

    The one allowed way out is the Hugging Face hub cache layout, where
    ``snapshots/<rev>/<file>`` are symlinks into the sibling ``blobs/`` folder.
    """
    from pathlib import PurePosixPath, PureWindowsPath

    where = f" (in {source})" if source else ""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise CheckpointError(f"weight file name {name!r}{where} is not a plain relative file name; "
                              "the index is corrupt or crafted.")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise CheckpointError(f"weight file name {name!r}{where} points outside the model folder "
                              "(absolute path or '..'); refusing to read it. The index is corrupt "
                              "or crafted.")
    root = Path(folder).resolve()
    path = Path(folder) / pure
    real = path.resolve()
    hub_blob = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if root not in real.parents and not hub_blob:
        raise CheckpointError(f"weight file {path}{where} is a symlink to {real}, outside the model "
                              "folder; refusing to read it.")
    return path


def read_weight_index(folder: str | os.PathLike[str], name: str = INDEX_FILE) -> list[Path]:
    """The weight files named by the index ``name`` (``model.safetensors.index.json``, or
    ``pytorch_model.bin.index.json`` ...) of ``folder``, each checked by :func:`folder_member`;
    :class:`CheckpointError` for a malformed index."""
    index = Path(folder) / name
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{index} is corrupt: {exc}") from exc
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index} is corrupt: it needs a non-empty 'weight_map' object "
                              "{tensor name: file name}. Re-save the model.")
    files = []
    for tensor, fname in wmap.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index} is corrupt: weight_map[{tensor!r}] is {fname!r}, not a file name.")
        if fname not in files:
            files.append(fname)
    return [folder_member(folder, f, source=str(index)) for f in sorted(files)]


def load_folder_weights(folder: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read every tensor of the safetensors weight files of a model folder (masks excluded).

    With ``model.safetensors.index.json`` the files it names are read (:func:`read_weight_index`:
    entries that leave the folder are refused), otherwise every ``*.safetensors`` file.
    """
    from safetensors.torch import load_file

    from ..atomic import recover_dir

    d = Path(folder)
    recover_dir(d)  # a folder swap interrupted by a kill: put the previous folder back
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; pass the folder written by `sparsetorch prune --out`.")
    if (d / INDEX_FILE).is_file():
        paths = read_weight_index(d)
    else:
        paths = [folder_member(d, p.name) for p in sorted(d.glob("*.safetensors")) if p.name != MASKS_FILE]
    if not paths:
        raise CheckpointError(f"{d} holds no *.safetensors weight files.")
    out: dict[str, Tensor] = {}
    for p in paths:
        try:
            out.update(load_file(str(p)))
        except FileNotFoundError:
            raise CheckpointError(f"weight file {p} listed in the index is missing.") from None
        except IsADirectoryError:
            raise CheckpointError(f"weight file {p} listed in the index is a folder.") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
            raise CheckpointError(f"weight file {p} is corrupt: {exc}") from exc
    return out


def tensors_module(tensors: Mapping[str, Tensor]) -> nn.Module:
    """Wrap name->tensor pairs into an ``nn.Module`` whose ``named_parameters()`` has those names."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        if not all(path) or not leaf:
            raise CheckpointError(f"tensor name {name!r} is not a dotted module path (it has an empty part); "
                                  "the weight file was not written from an nn.Module.")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
            if not isinstance(mod, nn.Module):
                raise CheckpointError(f"tensor names {name!r} and {name.rsplit('.', 1)[0]!r}... clash: "
                                      f"{part!r} is both a tensor and a module prefix.")
        if hasattr(mod, leaf):
            raise CheckpointError(f"tensor name {name!r} clashes with another tensor's module prefix.")
        mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


def folder_report(folder: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], MaskSet | None]:
    """Per-layer rows of a saved model folder, and its masks if ``masks.safetensors`` exists."""
    weights = load_folder_weights(folder)
    mask_path = Path(folder) / MASKS_FILE
    masks = MaskSet.load(mask_path) if mask_path.is_file() else None
    return layer_rows(weights, masks), masks


def verify_folder(folder: str | os.PathLike[str]) -> MaskSet:
    """Check a saved folder's weights against its ``masks.safetensors``; raise MaskError if broken."""
    mask_path = Path(folder) / MASKS_FILE
    weights = load_folder_weights(folder)
    if not mask_path.is_file():
        raise CheckpointError(
            f"{folder} has no {MASKS_FILE}; verify needs the masks saved by `sparsetorch prune --out` "
            "(or MaskSet.save)."
        )
    masks = MaskSet.load(mask_path)
    masks.verify(weights)
    return masks
