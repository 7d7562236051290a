"""Analysis: per-layer sparsity reports and plots."""

from __future__ import annotations

from .report import (
    folder_report,
    layer_rows,
    load_folder_weights,
    plot_sparsity,
    print_table,
    rich_table,
    summary,
    table_width,
    tensors_module,
    verify_folder,
)

__all__ = [
    "folder_report",
    "layer_rows",
    "load_folder_weights",
    "plot_sparsity",
    "print_table",
    "rich_table",
    "summary",
    "table_width",
    "tensors_module",
    "verify_folder",
]
