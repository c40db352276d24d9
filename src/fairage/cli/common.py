"""What every ``fairage`` command shares: the typer app, its error handling and the shared options and printers.

Every command turns a FairageError (bad file, bad config, bad argument) into one
red message on stderr and exit code 2, never a traceback; a full disk is one message
and exit code 1 (``_FairageGroup``). The commands live in one module per group beside this one;
keep them thin: parse arguments, call the library, print with rich.
"""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

from ..errors import FairageError


class _Console:
    """A rich console made at each print, so COLUMNS and the current stdout/stderr apply."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    def print(self, *objects, **kwargs) -> None:
        Console(stderr=self.stderr).print(*objects, **kwargs)


err_console = _Console(stderr=True)
console = _Console()


def _print_error(message: str) -> None:
    from rich.markup import escape

    # escaped: messages quote user input and "[20,40)"-style groups that rich would read as markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


class _FairageGroup(TyperGroup):
    """Top-level group: a FairageError anywhere below becomes one message + exit 2.

    Done at the click level (not in ``main``) so typer's CliRunner sees it too.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FairageError as err:
            _print_error(str(err))
            raise typer.Exit(getattr(err, "exit_code", 2)) from None
        except OSError as err:
            if err.errno == errno.ENOSPC:  # not the input's fault: exit 1, as for any failed run
                where = f"{err.filename}: " if err.filename else ""
                _print_error(f"{where}no space left on device; free some space and run the command again")
                raise typer.Exit(1) from None
            # a path the user named is unusable (a file where a folder must go, no permission):
            # say which path and why, not a traceback
            if err.filename is None:
                raise
            where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
            _print_error(f"{where}: {err.strerror or err}")
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
    _print_error(message)
    raise typer.Exit(2)


def _extra_categories_option(value: str):
    """CLI form of ``extra_categories``: error, keep, unknown, or a mapping 'indian=asian,others=unknown'."""
    from ..data.loaders import parse_extra_categories

    return parse_extra_categories(value)


_EXTRA_CATEGORIES_HELP = (
    "Attribute values outside the usual vocabulary: keep (default: a group of their own), "
    "error, unknown, or a mapping that merges or renames values like "
    "indian=asian,others=unknown (config data.extra_categories)."
)
_SKIP_BAD_HELP = "Drop missing/corrupt images (listed in a warning) instead of failing (config data.skip_bad)."
_ABSOLUTE_HELP = (
    "csv layout: accept absolute image paths (by default every image path must lie inside the "
    "dataset folder; config data.allow_absolute_paths)."
)


def _data_flags(
    skip_bad: bool = False,
    extra_categories: str | None = None,
    allow_absolute_paths: bool = False,
    layout: str | None = None,
) -> dict:
    """The command-line data options, one shape for every command: the ``load_faces`` keyword
    arguments (= config ``data.*`` keys) the user gave; an option left at its default is absent."""
    options: dict = {}
    if layout is not None:
        options["layout"] = layout
    if skip_bad:
        options["skip_bad"] = True
    if extra_categories is not None:
        # checked here for a message with the syntax
        options["extra_categories"] = _extra_categories_option(extra_categories)
    if allow_absolute_paths:
        options["allow_absolute_paths"] = True
    return options


def _as_overrides(options: dict) -> list[str]:
    """``_data_flags`` as config overrides (``data.KEY=VALUE``; JSON is YAML, so each reads back as written)."""
    return [f"data.{key}={json.dumps(value)}" for key, value in options.items()]


@contextlib.contextmanager
def _sigterm_exits(hint: str, run_json: Path | None):
    """SIGTERM inside the block: one message with ``hint`` and exit 143, never exit 0.

    ``run_json``: the run folder's run.json; when it does not exist yet, nothing was
    written and there is nothing to resume.
    """
    from ..training.interrupt import sigterm_raises

    with _terminated_exits(hint, run_json), sigterm_raises():
        yield


@contextlib.contextmanager
def _terminated_exits(hint: str, run_json: Path | None):
    """``Terminated`` (SIGTERM raised by library code inside ``sigterm_raises``) out of the block: one
    message with ``hint`` and exit 143 (``run_json`` as for ``_sigterm_exits``)."""
    from ..training.interrupt import Terminated

    try:
        yield
    except Terminated:
        if run_json is not None and not run_json.is_file():
            hint = "the run folder was not written yet; start the command again"
        _print_error(f"terminated (SIGTERM): {hint}")
        raise typer.Exit(Terminated.exit_code) from None


def _check_trainers(configs) -> None:
    """Lightning settings checked before any run folder is created (ConfigError -> exit 2)."""
    from ..config.runtime import check_trainer

    for cfg in configs:
        check_trainer(cfg.trainer)


_TRACKING_HELP = (
    "Log each stage's epoch metrics to this MLflow tracking server or store "
    "(http://HOST:5000, sqlite:///mlflow.db, ...): sets trainer.logger=mlflow and "
    "trainer.tracking_uri. Default with trainer.logger=mlflow: a store in the run (or tune) folder."
)


def _tracking_overrides(uri: str | None) -> list[str]:
    """``--tracking-uri URL`` as config overrides (first, so that a --set trainer.logger=... is seen)."""
    if uri is None:
        return []
    return ["trainer.logger=mlflow", f"trainer.tracking_uri={json.dumps(uri)}"]


_CLIP_HELP = "Clip predictions into 0-150 years instead of refusing values outside."


def _parse_edges(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--age-edges: expected comma-separated numbers like 20,40,60, got {text!r}")


def _fmt_ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _fmt_number(x) -> str:
    """Three decimals; "n/a" for None or NaN (an empty table cell)."""
    import math

    return "n/a" if x is None or math.isnan(float(x)) else f"{float(x):.3f}"


def _fmt_value(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _warn_full_scale(cfg, scale: str) -> None:
    """Loud warning when a full-scale preset runs without the VGGFace2 weights."""
    from ..config.presets import full_scale_warning

    message = full_scale_warning(cfg, scale)
    if message:
        err_console.print(f"[bold yellow]WARNING:[/bold yellow] {message}", highlight=False, soft_wrap=True)


def _print_comparison(run_dirs: list[Path], title: str, reference: str | None = None) -> None:
    from ..outputs.report import comparison_table, rich_table

    console.print(rich_table(comparison_table(run_dirs), title=title))
    if reference is not None:
        from rich.table import Table

        from ..outputs.reference import PUBLISHED_NOTE, reference_display

        published = reference_display(reference)
        table = Table(title=PUBLISHED_NOTE, title_style="bold yellow")
        for column in published.columns:
            table.add_column(column, justify="left" if column == "Model" else "right")
        for row in published.itertuples(index=False):
            table.add_row(*row)
        console.print(table)
