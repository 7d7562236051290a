"""Tables for the command line: full numbers at any width, one summary line per layer kind.

rich shrinks a table to the console width, and when stdout is not a terminal (a log, a pipe,
CI) that width is 80 columns, so numbers came out cut (``576x1…``, ``106,1…``). Here a table is
printed as aligned plain text when stdout is not a terminal, and as a rich table exactly as wide
as its content when it is: no cell is ever cut or wrapped.

Per-layer rows (the dicts of :func:`sparsetorch.analysis.report.layer_rows`: ``name, shape,
params, nonzeros, sparsity``) are summarised by layer kind (``self_attn.q_proj`` x 30: params,
kept, sparsity) with a total line; the full per-layer table is printed with ``per_layer=True``
(``--per-layer``) and is always in the JSON outputs.

Usage from a command::

    from ..tables import print_layer_table
    print_layer_table(rows, console, title="model: magnitude 2:4", per_layer=per_layer)

or, for any other table, ``print_rows(console, ["col", ...], [[cell, ...], ...], title=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["layer_kind", "group_by_kind", "format_table", "print_rows", "print_layer_table"]


def layer_kind(name: str) -> str:
    """The kind of a layer: its name after the last block index, without ``.weight``.

    ``model.layers.7.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; ``lm_head.weight`` ->
    ``lm_head``; ``features.0.weight`` -> ``features.0`` (nothing after the index).
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if idx and idx[-1] < len(parts) - 1:
        parts = parts[idx[-1] + 1 :]
    return ".".join(parts) or name


def group_by_kind(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per :func:`layer_kind` (in order of first appearance): layers, params, kept, sparsity."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(layer_kind(r["name"]), {"kind": layer_kind(r["name"]), "layers": 0,
                                                      "params": 0, "nonzeros": 0})
        g["layers"] += 1
        g["params"] += int(r["params"])
        g["nonzeros"] += int(r["nonzeros"])
    for g in groups.values():
        g["sparsity"] = 1.0 - g["nonzeros"] / g["params"] if g["params"] else 0.0
    return list(groups.values())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Aligned plain text: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _is_terminal(console: Any) -> bool:
    return bool(getattr(console, "is_terminal", False))


def print_rows(
    console: Any,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    footer: Sequence[str] | None = None,
    left: int = 1,
) -> None:
    """Print a table without cutting any cell: plain text off a terminal, a rich table on one.

    ``console`` is a ``rich.console.Console`` (None: a new one on stdout). ``footer`` is a last
    line set apart (totals). Cells are strings (format numbers before).
    """
    if console is None:
        from rich.console import Console

        console = Console()
    body = [list(r) for r in rows] + ([list(footer)] if footer is not None else [])
    text = format_table(headers, body, left=left)
    width = len(text.split("\n")[0])
    # rich would shrink a table wider than the console (cutting cells): plain text then
    if not _is_terminal(console) or width + 3 * len(headers) + 1 > console.width:
        if footer is not None:  # a rule above the totals
            lines = text.split("\n")
            lines.insert(len(lines) - 1, lines[1])
            text = "\n".join(lines)
        console.print((title + "\n" if title else "") + text, markup=False, highlight=False,
                      soft_wrap=True, crop=False)
        return
    from rich.table import Table

    table = Table(title=title, show_footer=footer is not None)
    for i, h in enumerate(headers):
        table.add_column(h, footer=footer[i] if footer is not None else "",
                         justify="left" if i < left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console.print(table)


def _n(x: int) -> str:
    return f"{int(x):,}"


def print_layer_table(
    rows: Sequence[Mapping[str, Any]],
    console: Any = None,
    *,
    title: str | None = None,
    per_layer: bool = False,
) -> None:
    """Print per-layer rows summarised by layer kind (or every layer with ``per_layer``), with totals."""
    params = sum(int(r["params"]) for r in rows)
    kept = sum(int(r["nonzeros"]) for r in rows)
    total = ["total", _n(len(rows)), _n(params), _n(kept), f"{1.0 - kept / params if params else 0.0:.4f}"]
    if per_layer:
        body = [[r["name"], "x".join(str(d) for d in r["shape"]), _n(r["params"]), _n(r["nonzeros"]),
                 f"{float(r['sparsity']):.4f}"] for r in rows]
        total[1] = ""
        print_rows(console, ["layer", "shape", "params", "kept", "sparsity"], body, title=title,
                   footer=[f"total ({len(rows)} layers)", *total[1:]])
        return
    body = [[g["kind"], _n(g["layers"]), _n(g["params"]), _n(g["nonzeros"]), f"{g['sparsity']:.4f}"]
            for g in group_by_kind(rows)]
    print_rows(console, ["layer kind", "layers", "params", "kept", "sparsity"], body, title=title, footer=total)
