"""The ``fairage`` command: one module per command group, each command thin (parse, call the library, print).

``common`` holds the typer app, the error handling (a FairageError becomes one red line and exit 2, a full
disk one line and exit 1) and the options and printers several groups share; importing the group modules
here registers their commands on ``app``.
"""

# imported in the order the commands are listed by --help
from . import data, evaluate, weights, train, suite, tune, report, demo, importers, predict, export, serve  # noqa: F401, I001
from .common import app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv)
