"""``sparsetorch`` command line: a thin typer layer over the Python API.

Errors of the library (:class:`SparseTorchError`) are printed without a traceback and the
command exits with status 2. Subpackages add their own commands in the registration block
at the bottom (one line each).
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

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


# --- subcommands registered by subpackages (one line each; keep this block at the end) ---


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=False)
    except SparseTorchError as exc:
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
