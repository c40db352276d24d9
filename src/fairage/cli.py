"""The ``fairage`` command: thin typer commands over the library modules.

Every command turns a FairageError (bad file, bad config, bad argument) into one
red message on stderr and exit code 2, never a traceback.

Each issue's commands live in their own section below; keep commands thin: parse
arguments, call the library, print with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from .errors import FairageError

err_console = Console(stderr=True)
console = Console()


class _FairageGroup(TyperGroup):
    """Top-level group: a FairageError anywhere below becomes one message + exit 2.

    Done at the click level (not in ``main``) so typer's CliRunner sees it too.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FairageError as err:
            err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_FairageGroup,
    name="fairage",
    help="Fair apparent-age estimation: train, evaluate accuracy and bias by group, compare weighting strategies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(message: str) -> None:
    """Print one clear error and exit with code 2."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# =========================================================================== data (issue 2)


# =========================================================================== evaluation (issue 3)


# =========================================================================== weighting (issue 4)


# =========================================================================== training (issue 5)


# =========================================================================== suite, report, demo (issue 6)


# =========================================================================== entry point


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
