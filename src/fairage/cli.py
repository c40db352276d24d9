"""The ``fairage`` command: thin typer commands over the library modules.

Every command turns a FairageError (bad file, bad config, bad argument) into one
red message on stderr and exit code 2, never a traceback; a full disk is one message
and exit code 1.

Commands are grouped in sections below (data, evaluation, weighting, training, suite); keep them thin: parse
arguments, call the library, print with rich.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

from .config import MAX_IMAGE_SIZE, MAX_N_BOOT, MAX_N_PERM
from .errors import FairageError


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


# =========================================================================== data


@app.command("synth")
def synth_command(
    out: Path = typer.Argument(..., help="Output folder (APPA-REAL release layout)."),
    n_train: int = typer.Option(4000, "--n-train", min=0, help="Faces in the train split."),
    n_valid: int = typer.Option(1500, "--n-valid", min=0, help="Faces in the valid split."),
    n_test: int = typer.Option(2000, "--n-test", min=0, help="Faces in the test split."),
    size: int = typer.Option(224, "--size", min=16, max=MAX_IMAGE_SIZE, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed -> byte-identical files)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes drawing faces (output does not depend on it)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Write the synthetic face benchmark (procedural faces with age, gender, ethnicity, expression)."""
    from .data import load_faces, write_synthetic

    root = write_synthetic(out, n_train=n_train, n_valid=n_valid, n_test=n_test, size=size, seed=seed,
                           workers=workers, progress=not quiet)
    faces = load_faces(root)
    console.print(f"wrote {len(faces)} synthetic faces ({size} px, seed {seed}) to {root}")


def _extra_categories_option(value: str):
    """CLI form of ``extra_categories``: error, keep, unknown, or a mapping 'indian=asian,others=unknown'."""
    from .data.loaders import parse_extra_categories

    return parse_extra_categories(value)


_EXTRA_CATEGORIES_HELP = ("Attribute values outside the usual vocabulary: keep (default: a group of their own), "
                          "error, unknown, or a mapping that merges or renames values like "
                          "indian=asian,others=unknown (config data.extra_categories).")
_SKIP_BAD_HELP = "Drop missing/corrupt images (listed in a warning) instead of failing (config data.skip_bad)."
_ABSOLUTE_HELP = ("csv layout: accept absolute image paths (by default every image path must lie inside the "
                  "dataset folder; config data.allow_absolute_paths).")


def _data_overrides(skip_bad: bool, extra_categories: str | None, allow_absolute_paths: bool) -> list[str]:
    """The data options of train/suite as config overrides (``data.*``)."""
    import json

    overrides = []
    if skip_bad:
        overrides.append("data.skip_bad=true")
    if extra_categories is not None:
        # checked here for a message with the syntax; JSON is YAML, so the override reads back as written
        overrides.append(f"data.extra_categories={json.dumps(_extra_categories_option(extra_categories))}")
    if allow_absolute_paths:
        overrides.append("data.allow_absolute_paths=true")
    return overrides


@contextlib.contextmanager
def _sigterm_exits(hint: str, run_json: Path | None):
    """SIGTERM inside the block: one message with ``hint`` and exit 143, never exit 0.

    ``run_json``: the run folder's run.json; when it does not exist yet, nothing was
    written and there is nothing to resume.
    """
    from .interrupt import Terminated, sigterm_raises

    try:
        with sigterm_raises():
            yield
    except Terminated:
        if run_json is not None and not run_json.is_file():
            hint = "the run folder was not written yet; start the command again"
        _print_error(f"terminated (SIGTERM): {hint}")
        raise typer.Exit(Terminated.exit_code) from None


def _data_options(base: dict, skip_bad: bool, extra_categories: str | None, allow_absolute_paths: bool) -> dict:
    """``load_faces`` options: ``base`` (a run's config, or {}) with the command-line data options on top."""
    options = dict(base)
    if skip_bad:
        options["skip_bad"] = True
    if extra_categories is not None:
        options["extra_categories"] = _extra_categories_option(extra_categories)
    if allow_absolute_paths:
        options["allow_absolute_paths"] = True
    return options


def _check_trainers(configs) -> None:
    """Lightning settings checked before any run folder is created (ConfigError -> exit 2)."""
    from .config import check_trainer

    for cfg in configs:
        check_trainer(cfg.trainer)


_TRACKING_HELP = ("Log each stage's epoch metrics to this MLflow tracking server or store "
                  "(http://HOST:5000, sqlite:///mlflow.db, ...): sets trainer.logger=mlflow and "
                  "trainer.tracking_uri. Default with trainer.logger=mlflow: a store in the run (or tune) folder.")


def _tracking_overrides(uri: str | None) -> list[str]:
    """``--tracking-uri URL`` as config overrides (first, so that a --set trainer.logger=... is seen)."""
    if uri is None:
        return []
    return ["trainer.logger=mlflow", f"trainer.tracking_uri={json.dumps(uri)}"]


@contextlib.contextmanager
def _without_skipped_log():
    """Hold back the loader's one-line "skipped N ..." warnings (for a command that lists them itself)."""
    logger = logging.getLogger("fairage.data.loaders")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("skipped ")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@data_app.command("info")
def data_info_command(
    root: Path = typer.Argument(..., help="Dataset folder (or a CSV file for the csv layout)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    layout: str | None = typer.Option(None, "--layout", help="Force a layout: appa, npy, utkface, csv (default: detect)."),
    target: str = typer.Option("apparent", "--target", help="appa only: apparent (apparent_age_avg) or real (real_age)."),
    full_images: bool = typer.Option(False, "--full-images", help="appa only: the full photos instead of the face crops."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str = typer.Option("keep", "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the stratified split (utkface, csv without a split column)."),
) -> None:
    """Show a dataset: layout, faces per split, counts per attribute value, age histogram."""
    import json

    from rich.table import Table

    from .data import load_faces
    from .data.loaders import SKIP_BAD_HINT, describe_faces, find_bad_images
    from .errors import DataError

    with _without_skipped_log():  # listed below, one line per image
        faces = load_faces(root, layout=layout, target=target, full_images=full_images,
                           extra_categories=_extra_categories_option(extra_categories), seed=seed, skip_bad=skip_bad,
                           allow_absolute_paths=allow_absolute_paths)
    if not skip_bad:
        # decode every image (at reduced scale: quick) so a corrupt file is reported now
        bad = find_bad_images(faces)
        if bad:
            more = f" (and {len(bad) - 1} more bad image(s))" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; {SKIP_BAD_HINT}")
    info = describe_faces(faces)
    skipped = faces.attrs.get("skipped", [])
    if skipped:
        from rich.markup import escape

        err_console.print(f"[yellow]skipped {len(skipped)} bad image(s):[/yellow]", highlight=False)
        for line in skipped:
            err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    splits = list(info["splits"])
    console.print(f"[bold]{root}[/bold]: layout [bold]{info['layout']}[/bold], {len(faces)} faces "
                  + ", ".join(f"{s} {info['splits'][s]['n']}" for s in splits), highlight=False, soft_wrap=True)
    table = Table(title="faces per split and attribute value")
    table.add_column("attribute")
    table.add_column("value")
    for s in splits:
        table.add_column(s, justify="right")
    for attribute in info["attributes"]:
        values = sorted({v for s in splits for v in info["splits"][s][attribute]})
        for k, v in enumerate(values):
            table.add_row(attribute if k == 0 else "", v, *[str(info["splits"][s][attribute].get(v, 0)) for s in splits],
                          end_section=k == len(values) - 1)
    table.add_row("age", "min / mean / max", *[
        f"{info['age'][s]['min']:.1f} / {info['age'][s]['mean']:.1f} / {info['age'][s]['max']:.1f}" for s in splits])
    console.print(table)
    edges, counts = info["age_histogram"]["edges"], info["age_histogram"]["counts"]
    hist = Table(title="age histogram (years, all splits)")
    hist.add_column("age")
    hist.add_column("n", justify="right")
    hist.add_column("")
    top = max(max(counts), 1)
    for lo, c in zip(edges, counts):
        label = f"{lo}-{lo + 10}" if lo < edges[-1] else f"{lo}+"
        hist.add_row(label, str(int(c)), "█" * int(round(40 * c / top)))
    console.print(hist)


# =========================================================================== evaluation


def _run_predictions(run_dir: Path):
    """A run folder and its predictions file (``predictions_test.csv``)."""
    from .runs import RunFolder

    folder = RunFolder.open(run_dir)
    return folder, _predictions_file(folder)


def _predictions_file(folder) -> Path:
    """A run folder's ``predictions_test.csv``; exit 2 when the run has not written it."""
    from .runs import RunFolder

    predictions = folder.file(RunFolder.PREDICTIONS)
    if not predictions.is_file():
        fail(f"{folder.path}: run folder has no {RunFolder.PREDICTIONS} (is the run finished?)")
    return predictions


def _run_split_faces(folder, data: Path | None, split: str, skip_bad: bool, extra_categories: str | None,
                     allow_absolute_paths: bool):
    """A run's faces of ``split``: loaded as the run loaded them, unless other data or data options are given."""
    base = folder.config().data.loader_options()
    options = _data_options(base, skip_bad, extra_categories, allow_absolute_paths)
    if data is None and options == base:
        return folder.faces(split)
    return _split_faces(data or folder.data_dir, split, options)


def _split_faces(data: Path, split: str, options: dict | None = None):
    from .data import load_faces

    faces = load_faces(data, **(options or {}))
    faces = faces[faces["split"] == split].reset_index(drop=True)
    if len(faces) == 0:
        fail(f"{data}: the dataset has no {split!r} faces")
    return faces


def _joined_predictions(predictions: Path, faces, clip: bool = False):
    from .data.predictions import join_predictions, read_predictions

    return join_predictions(faces, read_predictions(predictions, clip=clip), predictions)


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


@app.command("evaluate")
def evaluate_command(
    run_dir: Path | None = typer.Argument(
        None, help="A run folder: its predictions_test.csv; for another split or dataset (--split, --data) its model "
                   "predicts those faces. A model folder predicts the faces of --data."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    split: str = typer.Option("test", "--split", help="Split the predictions are for."),
    predictions: Path | None = typer.Option(None, "--predictions", help="Predictions CSV (image,prediction)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    n_boot: int | None = typer.Option(None, "--n-boot", min=0, max=MAX_N_BOOT,
                                         help="Bootstrap resamples (0: no intervals; default 1000, for a run its eval.n_boot)."),
    level: float | None = typer.Option(None, "--level", min=0.5, max=0.999,
                                          help="Confidence level of the intervals (default 0.95, for a run its eval.level)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of the bootstrap and permutations (default 0, for a run its seed)."),
    n_perm: int | None = typer.Option(
        None, "--n-perm", min=0, max=MAX_N_PERM, help="Label permutations for each bias's p-value (0: no test; default 1000, "
                                      "for a run its eval.n_perm)."),
    attribute: list[str] | None = typer.Option(
        None, "--attribute", help="Attribute to score (repeatable; 'age' = ground-truth age bins; any column). "
                                  "Default: age, gender, ethnicity, expression."),
    age_edges: str = typer.Option("20,40,60", "--age-edges", help="Inner edges of the age groups, in years."),
    intersection: list[str] | None = typer.Option(
        None, "--intersection", help="Attributes scored cell by cell, comma-separated (repeatable), e.g. "
                                     "age,ethnicity. Default: age x ethnicity and gender x ethnicity "
                                     "(for a run: its eval.intersections)."),
    min_group: int | None = typer.Option(None, "--min-group", min=1,
                                         help="Groups with fewer faces are flagged (default 20; a run: eval.min_group)."),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """MAE, bias scores and the field's metrics (with bootstrap intervals) of a prediction set, by group.

    For a run folder the faces are loaded with the run's own data settings (layout,
    target, ...) and scored with its eval settings, so the result equals its metrics_test.json.
    On another split or dataset the run's model predicts the faces first.
    """
    import json

    from .config import EvalConfig
    from .conformal import CONFORMAL, interval_arguments, read_calibration
    from .metrics import evaluate

    eval_config, run_seed = EvalConfig(), 0
    df = None
    calibration = None  # the model's, when the predictions are its own
    if run_dir is not None and predictions is None and _is_model_folder(run_dir):
        calibration = read_calibration(run_dir / CONFORMAL)
        if data is None:  # no predictions yet: the model predicts the split's faces first
            fail(f"{run_dir} is a model folder: give the dataset with --data DIR")
        faces = _split_faces(data, split, _data_options({}, skip_bad, extra_categories, allow_absolute_paths))
        df, predictions = _model_folder_predictions(run_dir, faces, not json_out), run_dir
    elif run_dir is not None:
        from .runs import RunFolder

        folder = RunFolder.open(run_dir)
        run_config = folder.config()
        eval_config, run_seed = run_config.eval, run_config.seed
        calibration = folder.calibration() if predictions is None else None
        faces = _run_split_faces(folder, data, split, skip_bad, extra_categories, allow_absolute_paths)
        own_test = split == "test" and (data is None or data.resolve() == Path(folder.data_dir).resolve())
        if predictions is None and not own_test:
            # predictions_test.csv covers the run's own test split only: its model predicts these faces
            df, predictions = _model_folder_predictions(run_dir, faces, not json_out), run_dir
        elif predictions is None:
            predictions = _predictions_file(folder)
    elif data is None or predictions is None:
        fail("give a run folder, or both --data DIR and --predictions FILE")
    else:
        faces = _split_faces(data, split, _data_options({}, skip_bad, extra_categories, allow_absolute_paths))
    if df is None:
        df = _joined_predictions(predictions, faces, clip)
    settings = eval_config.metric_settings(run_seed, df.columns)
    if intersection:
        settings["intersections"] = [[a.strip() for a in item.split(",") if a.strip()] for item in intersection]
    chosen = {k: v for k, v in (("n_boot", n_boot), ("level", level), ("n_perm", n_perm), ("seed", seed),
                                ("attributes", attribute or None), ("min_group", min_group)) if v is not None}
    settings.update(chosen)
    n_boot, level = settings["n_boot"], settings["level"]
    evaluation = evaluate(df, age_edges=_parse_edges(age_edges), **settings, **interval_arguments(calibration, df))
    result = evaluation.to_json()
    if json_out:
        print(json.dumps(result))
        return
    _print_evaluation(result, f"{predictions}", split, settings["n_perm"])
    _print_coverage(evaluation, f"{100 * level:g}%")


def _print_evaluation(result: dict, source: str, split: str, n_perm: int) -> None:
    """The tables of ``fairage evaluate``: age bins first, then the field's metrics, biases and groups."""
    from rich.table import Table

    level, n_boot = result["level"], result["n_boot"]
    pct = f"{100 * level:g}%"
    console.print(f"[bold]{source}[/bold] on {split} ({result['n']} faces), {pct} bootstrap intervals "
                  f"({n_boot} resamples)", highlight=False)
    console.print(f"  MAE {result['mae']:.2f} years {_fmt_ci(result['mae_ci'])}", highlight=False)
    small = result["min_group"]
    ages = Table(title="MAE by age (ground truth, years)", title_justify="left")
    for column in ("age", "n", "MAE", f"{pct} interval"):
        ages.add_column(column, justify="left" if column == "age" else "right")
    for group, row in result["age_bins"]["groups"].items():
        ages.add_row(group, str(row["n"]), _fmt_value(row["mae"] if row["n"] else None), _fmt_ci(row["ci"]),
                     style="yellow" if 0 < row["n"] < small else None)
    console.print(ages)
    for k, stat in result["cs"].items():
        console.print(f"  CS@{k} {100 * stat['value']:.1f}% of faces within {k} years "
                      f"{_fmt_ci(stat['ci'] and [100 * x for x in stat['ci']])}", highlight=False)
    if result["epsilon_error"]:
        eps = result["epsilon_error"]
        console.print(f"  epsilon-error {eps['value']:.3f} {_fmt_ci(eps['ci'])} (against the raters' std)",
                      highlight=False)
    for name, bias in result["bias"].items():
        p_value = result["bias_p"].get(name)
        test = f"  permutation p = {p_value:.3g}" if p_value is not None else ""
        worst = result["worst_group"].get(name)
        spread = result["group_mae_std"].get(name)
        field = (f"  worst group {worst['group']} {worst['mae']:.2f} {_fmt_ci(worst['ci'])}, "
                 f"group-MAE std {spread['value']:.2f}" if worst else "")
        console.print(f"  {name} bias {_fmt_value(bias)} {_fmt_ci(result['bias_ci'][name])}{test}{field}",
                      highlight=False)
    if n_perm:
        console.print(f"  (p: how often {n_perm} random relabellings of the faces' groups give a bias at "
                      "least as large; small = the gap is unlikely to be chance)", highlight=False)
    for name, groups in result["groups"].items():
        table = Table(title=f"{name} (bias {_fmt_value(result['bias'][name])})", title_justify="left")
        table.add_column("group")
        table.add_column("n", justify="right")
        table.add_column("MAE", justify="right")
        table.add_column(f"{pct} interval", justify="right")
        table.add_column("")
        flagged = set(result["small_groups"].get(name, []))
        for group, row in groups.items():
            note = f"under {small} faces" if group in flagged else ""
            table.add_row(group, str(row["n"]), f"{row['mae']:.2f}", _fmt_ci(result["groups_ci"][name][group]), note,
                          style="yellow" if note else None)
        for group in result["skipped_groups"][name]:
            table.add_row(group, "0", "-", "skipped (no faces)", "", style="dim")
        console.print(table)


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt_pct_ci(ci) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _print_coverage(evaluation, pct: str) -> None:
    """Coverage and width of the intervals (conformal, plain beside it), overall and per group."""
    from rich.table import Table

    if not evaluation.coverage:
        return
    target = evaluation.coverage_target
    aim = f", aiming at {_fmt_pct(target)}" if target is not None else ""
    console.print(f"[bold]intervals[/bold] (age_lo-age_hi{aim}; gap = coverage bias score, mean |difference| "
                  "between groups)", highlight=False)
    for name, cov in evaluation.coverage.items():
        console.print(f"  {name}: coverage {_fmt_pct(cov.total.coverage)} {_fmt_pct_ci(cov.total.coverage_ci)}, "
                      f"mean width {cov.total.width:.2f} years {_fmt_ci(cov.total.width_ci)}", highlight=False)
    for attribute in next(iter(evaluation.coverage.values())).groups:
        table = Table(title=f"{attribute}: interval coverage ({pct} intervals)", title_justify="left")
        table.add_column("group")
        table.add_column("n", justify="right")
        for name in evaluation.coverage:
            table.add_column(f"{name} coverage", justify="right")
            table.add_column("width", justify="right")
        for group, row in next(iter(evaluation.coverage.values())).groups[attribute].items():
            cells = [group, str(row.n)]
            for cov in evaluation.coverage.values():
                g = cov.groups[attribute][group]
                cells += [f"{_fmt_pct(g.coverage)} {_fmt_pct_ci(g.coverage_ci)}", f"{g.width:.1f}"]
            table.add_row(*cells)
        gaps = [f"{name} {_fmt_pct(cov.gap[attribute])} {_fmt_pct_ci(cov.gap_ci[attribute])}"
                + (f" p = {cov.gap_p[attribute]:.3g}" if cov.gap_p.get(attribute) is not None else "")
                for name, cov in evaluation.coverage.items()]
        table.caption = "coverage gap: " + "; ".join(gaps)
        table.caption_justify = "left"
        console.print(table)


@app.command("compare")
def compare_command(
    predictions_a: Path = typer.Argument(..., help="Predictions CSV of A (the baseline)."),
    predictions_b: Path = typer.Argument(..., help="Predictions CSV of B; differences are B - A."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: str = typer.Option("test", "--split", help="Split the predictions are for."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, max=MAX_N_BOOT, help="Paired bootstrap resamples."),
    level: float = typer.Option(0.95, "--level", min=0.5, max=0.999, help="Confidence level of the intervals."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the bootstrap."),
    attribute: list[str] | None = typer.Option(None, "--attribute", help="Attribute to score (repeatable)."),
    age_edges: str = typer.Option("20,40,60", "--age-edges", help="Inner edges of the age groups, in years."),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """Paired comparison of two prediction sets on the same faces: B - A with bootstrap intervals."""
    import json

    from rich.table import Table

    from .metrics import compare

    faces = _split_faces(data, split, _data_options({}, skip_bad, extra_categories, allow_absolute_paths))
    df_a = _joined_predictions(predictions_a, faces, clip)
    df_b = _joined_predictions(predictions_b, faces, clip)
    from .config import EvalConfig

    defaults = EvalConfig().metric_settings(seed, df_a.columns)
    result = compare(df_a, df_b, attributes=attribute or None, age_edges=_parse_edges(age_edges),
                     n_boot=n_boot, level=level, seed=seed, intersections=defaults["intersections"],
                     min_group=defaults["min_group"], cs_k=defaults["cs_k"])
    if json_out:
        print(json.dumps(result.to_json()))
        return
    pct = f"{100 * level:g}%"
    table = Table(title=f"B - A on {result.n} {split} faces (A: {predictions_a}, B: {predictions_b})",
                  title_justify="left")
    for column in ("metric", "A", "B", "B - A", f"{pct} interval", "verdict"):
        table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
    for name, a, b, d in [*result.rows(), *result.field_rows()]:
        table.add_row(name, _fmt_value(a), _fmt_value(b), _fmt_value(d and d.estimate),
                      _fmt_ci(d and d.ci), d.verdict if d is not None else "n/a")
    console.print(table)


@app.command("submit")
def submit_command(
    predictions_or_run: Path = typer.Argument(..., help="Predictions CSV, or a run folder (its predictions_test.csv)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    out: Path = typer.Option(Path("predictions.zip"), "--out", help="Submission zip to write."),
    clip: bool = typer.Option(False, "--clip", help=_CLIP_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
) -> None:
    """Write the competition submission: a zip with predictions.csv, one age per line in test order."""
    from .data.predictions import read_predictions
    from .submission import write_submission

    predictions = predictions_or_run
    if predictions_or_run.is_dir():
        folder, predictions = _run_predictions(predictions_or_run)
        faces = _run_split_faces(folder, data, "test", skip_bad, extra_categories, allow_absolute_paths)
    elif data is None:
        fail("--data DIR is required with a predictions file")
    else:
        faces = _split_faces(data, "test", _data_options({}, skip_bad, extra_categories, allow_absolute_paths))
    ages = write_submission(out, faces, read_predictions(predictions, clip=clip), predictions)
    console.print(f"wrote {out} ({len(ages)} test predictions)", highlight=False)


# =========================================================================== weighting


@app.command("weights")
def weights_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder; weights are computed on its train split."),
    scheme: str | None = typer.Option(
        None, "--scheme", help="none, age, age_ethnicity (10 groups; the default), age_ethnicity_expression (48), "
                               "custom. With --formula lds the default is none (LDS alone)."),
    formula: str = typer.Option("inverse", "--formula",
                                help="inverse (N/(K n_j)), sqrt_inverse, effective_number, or lds (= --lds with inverse)."),
    lds: bool = typer.Option(False, "--lds", help="Multiply by label-distribution-smoothing weights of the age."),
    attributes: str | None = typer.Option(None, "--attributes", help="custom scheme: comma list, e.g. age,gender."),
    age_edges: str | None = typer.Option(None, "--age-edges", help="custom scheme: inner age edges, e.g. 20,40,60."),
    pseudo_count: float = typer.Option(0.0, "--pseudo-count", help="Added to every group count (the report used 1)."),
    beta: float = typer.Option(0.999, "--beta", help="effective_number's beta."),
    max_weight: float | None = typer.Option(None, "--max-weight", help="Clip weights (after mean-1 rescaling)."),
    layout: str | None = typer.Option(None, "--layout", help="Force a layout: appa, npy, utkface, csv."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path | None = typer.Option(None, "--plot", help="Also save a plot of group sizes against weights (PNG)."),
) -> None:
    """Group sizes and per-face weights of a weighting scheme on the training split (mean 1).

    ``--formula lds`` is shorthand for ``--lds`` (with the inverse group formula); without
    ``--scheme`` it means LDS alone, shown by the report's four age bins.
    """
    import json

    from rich.table import Table

    from .data import load_faces
    from .errors import ConfigError
    from .weighting import describe, summarize_weights, weighting_from_options

    cfg = weighting_from_options(
        scheme, formula, lds, attributes=[a.strip() for a in (attributes or "").split(",") if a.strip()],
        age_edges=_parse_edges(age_edges) if age_edges else None,
        pseudo_count=pseudo_count, beta=beta, max_weight=max_weight)
    faces = load_faces(data, layout=layout, **_data_options({}, skip_bad, extra_categories, allow_absolute_paths))
    train = faces[faces["split"] == "train"].reset_index(drop=True)
    if len(train) == 0:
        raise ConfigError(f"dataset {data} has no train faces to weight")
    summary = summarize_weights(train, cfg)
    table, heavy = summary.table, summary.heavy
    if plot is not None:
        from .plots import plot_group_weights

        plot_group_weights(table, plot, title=describe(cfg))
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
        return
    out = Table(title=f"weights on {len(train)} training faces: {describe(cfg)} (mean 1 per face)")
    out.add_column("group")
    out.add_column("n", justify="right")
    out.add_column("weight / face", justify="right")
    out.add_column("share of weight", justify="right")
    for r in table.itertuples():
        out.add_row(r.name, str(r.n), "-" if r.n == 0 else f"{r.weight:.3f}", f"{100 * r.share:.1f}%",
                    style="red" if r.name in heavy else None)
    console.print(out)
    for w in summary.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


# =========================================================================== training


def _train_summary(run_dir: Path, metrics) -> None:
    """One screen: where the run is, its stages, test MAE and bias scores (years)."""
    from rich.table import Table

    from .runs import RunFolder

    folder = RunFolder.open(run_dir)
    table = Table(title=f"finished: {run_dir} (test split, years)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("CI", justify="right")

    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair is not None else ""

    table.add_row("faces", str(metrics.n), "")
    table.add_row("MAE", f"{metrics.mae:.3f}", ci(metrics.mae_ci))
    for attr, value in metrics.bias.items():
        if value is not None:
            table.add_row(f"{attr} bias", f"{value:.3f}", ci(metrics.bias_ci.get(attr)))
    for stage, best in folder.best_epochs().items():
        val_mae = "n/a" if best["val_mae"] is None else f"{best['val_mae']:.3f}"
        table.add_row(f"{stage}: epochs / best val MAE", f"{best['epochs_run']} / {val_mae} (epoch {best['epoch']})", "")
    table.add_row("pretrained weights", "yes" if folder.record.weights_loaded else "no (random init)", "")
    for message in folder.warnings():
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    console.print(table)
    console.print(f"run folder: {run_dir} (predictions_test.csv, metrics_test.json, curves.png, history.csv)")


def _interruptible(run_dir: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; on Ctrl-C (which Lightning turns into SystemExit) print how to resume."""
    from .runs import is_rank_zero

    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        if is_rank_zero():
            err_console.print(f"interrupted: continue with `fairage train --resume {run_dir}`", highlight=False)
        raise


def _warn_full_scale(cfg, scale: str) -> None:
    """Loud warning when a full-scale preset runs without the VGGFace2 weights."""
    from .config import full_scale_warning

    message = full_scale_warning(cfg, scale)
    if message:
        err_console.print(f"[bold yellow]WARNING:[/bold yellow] {message}", highlight=False, soft_wrap=True)


@app.command("train")
def train_command(
    config: Path | None = typer.Option(None, "--config", help="Experiment config YAML (see docs/training.md)."),
    preset: str | None = typer.Option(None, "--preset", help="A shipped preset instead of --config (see `fairage presets`)."),
    scale: str = typer.Option("full", "--scale", help="Preset scale: full, cpu (resnet18, 64 px) or tiny."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (any layout fairage reads)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder to create, e.g. runs/NAME."),
    set_: list[str] | None = typer.Option(None, "--set", help="Config override, e.g. stage2.lr=5e-5 (repeatable)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
    devices: str | None = typer.Option(None, "--devices", help="Devices per node (Lightning), e.g. 2 or auto."),
    strategy: str | None = typer.Option(None, "--strategy", help="Lightning strategy, e.g. ddp."),
    num_nodes: int | None = typer.Option(None, "--num-nodes", min=1, help="Machines (Lightning num_nodes)."),
    accelerator: str | None = typer.Option(None, "--accelerator", help="cpu, gpu or auto."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Bitwise-repeatable kernels where torch allows."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=_TRACKING_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """Train a model (stage I and/or II), evaluate it on the test split, print a summary."""
    from .config import load_config, load_preset
    from .training import resume_run, train

    progress = not quiet
    data_overrides = _data_overrides(skip_bad, extra_categories, allow_absolute_paths)
    if resume is not None:
        if config or preset or data or out or set_ or data_overrides or tracking_uri:
            fail("--resume takes only the run folder (its config.yaml and run.json hold the rest)")
        from .runs import RunFolder

        if RunFolder.exists(resume):
            _check_trainers([RunFolder.open(resume).config()])
        with _sigterm_exits(f"continue with `fairage train --resume {resume}`", RunFolder(resume).file(RunFolder.RUN)):
            metrics = _interruptible(resume, resume_run, resume, progress=progress)
        if metrics:
            _train_summary(resume, metrics)
        return
    if (config is None) == (preset is None):
        fail("give exactly one of --config CFG.yaml and --preset NAME (or --resume runs/NAME)")
    if data is None or out is None:
        fail("--data DIR and --out runs/NAME are required (or --resume runs/NAME)")
    overrides = _tracking_overrides(tracking_uri) + list(set_ or []) + data_overrides
    for key, value in (("accelerator", accelerator), ("devices", devices), ("strategy", strategy),
                       ("num_nodes", num_nodes)):
        if value is not None:
            overrides.append(f"trainer.{key}={value}")
    if deterministic:
        overrides.append("trainer.deterministic=true")
    cfg = load_config(config, overrides) if config is not None else load_preset(preset, scale, overrides)
    _check_trainers([cfg])
    if preset is not None:
        _warn_full_scale(cfg, scale)
    with _sigterm_exits(f"continue with `fairage train --resume {out}`", out / "run.json"):
        metrics = _interruptible(out, train, cfg, data, out, progress=progress)
    if metrics:  # None on non-zero DDP ranks
        _train_summary(out, metrics)


@app.command("export-backbone")
def export_backbone_command(
    run: Path = typer.Argument(..., help="A finished run folder, or one of its checkpoint files (.ckpt)."),
    out: Path = typer.Option(..., "--out", help="Weights file to write (.safetensors or .pth)."),
) -> None:
    """Save a finished run's backbone for another config's model.weights (pretrain on one set, fine-tune on another)."""
    from .training import export_backbone

    path = export_backbone(run, out)
    console.print(f"wrote {path}: use it with --set model.weights={path}", highlight=False)


# =========================================================================== suite, report, demo


@app.command("presets")
def presets_command() -> None:
    """List the shipped presets (M1..M5 and variants) with a one-line description."""
    from rich.table import Table

    from .config import list_presets

    table = Table(title="presets (fairage suite --presets NAME,...; scale with --scale full|cpu|tiny)")
    table.add_column("name")
    table.add_column("description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    console.print(table)


def _print_comparison(run_dirs: list[Path], title: str, reference: str | None = None) -> None:
    from .report import comparison_table, rich_table

    console.print(rich_table(comparison_table(run_dirs), title=title))
    if reference is not None:
        from rich.table import Table

        from .reference import PUBLISHED_NOTE, reference_display

        published = reference_display(reference)
        table = Table(title=PUBLISHED_NOTE, title_style="bold yellow")
        for column in published.columns:
            table.add_column(column, justify="left" if column == "Model" else "right")
        for row in published.itertuples(index=False):
            table.add_row(*row)
        console.print(table)


def _suite_printer(quiet: bool):
    """The CLI's listener of suite events: steps unless ``quiet``, warnings always (stderr)."""

    def show(event) -> None:
        if event.failed:
            show.failed += 1
        if event.warning:
            err_console.print(f"[yellow]warning:[/yellow] {event.message}", highlight=False, soft_wrap=True)
        elif not quiet:
            console.print(event.message, highlight=False, soft_wrap=True)

    show.failed = 0  # runs that failed or collapsed: the command's exit code says so
    return show


@app.command("suite")
def suite_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (any layout fairage reads)."),
    out: Path = typer.Option(Path("runs/suite"), "--out", help="Output folder: one run folder per preset, plus the report."),
    presets: str = typer.Option("M1,M2,M3,M4,M5", "--presets", help="Comma-separated preset names (see `fairage presets`)."),
    scale: str = typer.Option("cpu", "--scale", help="full (as the report), cpu (resnet18, 64 px) or tiny (tests)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Runs per preset; K > 1 gives mean ± std over seeds."),
    set_: list[str] | None = typer.Option(None, "--set", help="Config override for every preset, e.g. stage2.lr=5e-5 (repeatable)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    extra_categories: str | None = typer.Option(None, "--extra-categories", help=_EXTRA_CATEGORIES_HELP),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help=_ABSOLUTE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Train each preset (reusing finished runs), evaluate on the test split, write the comparison report."""
    from .suite import run_suite, suite_configs

    names = [p.strip() for p in presets.split(",") if p.strip()]
    overrides = list(set_ or []) + _data_overrides(skip_bad, extra_categories, allow_absolute_paths)
    plan = suite_configs(names, scale, seeds, overrides)
    _check_trainers([cfg for _, cfg in plan])
    _warn_full_scale(plan[0][1], scale)
    printer = _suite_printer(quiet)
    with _sigterm_exits("run the same `fairage suite` command again: finished runs are reused, "
                        "the interrupted one resumes", None):
        report = run_suite(data, out, presets=names, scale=scale, seeds=seeds, overrides=overrides,
                           progress=not quiet, on_event=printer)
    from .runs import RunFolder

    finished = [out / n for n, _ in plan if (out / n / RunFolder.METRICS).is_file()]
    _print_comparison(finished, title=f"comparison ({data}, scale {scale}): MAE and bias scores in years, test split")
    console.print(f"report: {report}")
    if printer.failed:
        err_console.print(f"[red]{printer.failed} run(s) failed or collapsed (see the warnings above)[/red]",
                          highlight=False)
        raise typer.Exit(1)


@app.command("tune")
def tune_command(
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (any layout fairage reads); "
                                     "not needed with --pick on a finished study."),
    out: Path = typer.Option(..., "--out", help="Tune folder: study.db, trials.csv, front.csv, trials/trial-NNNN."),
    space: Path | None = typer.Option(None, "--space", help="Search space YAML over config keys "
                                      "(default: the shipped space of --scale)."),
    trials: int = typer.Option(20, "--trials", min=0, help="Trials in the study, all workers together."),
    storage: str | None = typer.Option(None, "--storage", help="Optuna storage URL shared by workers "
                                       "(postgresql://..., mysql://..., journal:///shared/tune.log); "
                                       "default sqlite:///OUT/study.db."),
    study: str = typer.Option("fairage-tune", "--study", help="Study name within the storage."),
    objectives: str = typer.Option("mae,age_bias", "--objectives",
                                   help="Validation objectives, all minimised: mae, <attr>_bias, worst_<attr>_mae."),
    scale: str = typer.Option("cpu", "--scale", help="Scale of the base preset and default space: full, cpu, tiny."),
    preset: str = typer.Option("M1", "--preset", help="Base preset every trial starts from."),
    config: Path | None = typer.Option(None, "--config", help="Base config YAML instead of --preset."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override of the base config (repeatable)."),
    sampler: str = typer.Option("nsga2", "--sampler", help="Optuna sampler: nsga2 or tpe."),
    seed: int | None = typer.Option(None, "--seed", help="Sampler seed (default: the base config's seed); "
                                    "give each machine its own."),
    pick: str | None = typer.Option(None, "--pick", help='Choose a trial on validation figures, e.g. '
                                    '"age_bias<=1.0" or "mae<=+0.3" (within 0.3 of the best MAE); '
                                    "writes OUT/picked.yaml."),
    reference: list[Path] | None = typer.Option(None, "--reference", help="A finished run folder (e.g. the "
                                                "suite's M1) drawn as a reference point in front.png (repeatable)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Log every trial to this MLflow "
                                            "tracking server or store (experiment: the study's name); sets "
                                            "trainer.logger=mlflow. Default with trainer.logger=mlflow: "
                                            "sqlite:///OUT/mlflow.db."),
) -> None:
    """Search a config space for the accuracy-fairness Pareto front (Optuna; several machines may share a study)."""
    from rich.table import Table

    from .tune import (
        FRONT,
        FRONT_PLOT,
        TRIALS,
        SearchSpace,
        default_storage,
        load_base,
        open_study,
        parse_objectives,
        pick_trial,
        run_tune,
    )

    names = parse_objectives(objectives)
    url = storage or default_storage(out)
    if data is not None:
        base = load_base(config, preset, scale, _tracking_overrides(tracking_uri) + list(set_ or []))
        _check_trainers([base])
        space_ = SearchSpace.from_file(space, base) if space else SearchSpace.default(scale, base)

        def show(event) -> None:
            if event.warning:
                err_console.print(f"[yellow]warning:[/yellow] {event.message}", highlight=False, soft_wrap=True)
            else:
                console.print(event.message, highlight=False, soft_wrap=True)

        with _sigterm_exits("run the same `fairage tune` command again: finished trials are kept, "
                            "the interrupted one is retried", None):
            tuner = run_tune(data, out, base, space_, names, trials, url, study, sampler, scale, seed, show,
                             references=list(reference or []))
        study_ = tuner.study
        front = tuner.write_tables()[1]
        table = Table(title=f"Pareto front of study '{study}' (validation; test beside), years")
        table.add_column("trial", justify="right")
        for name in names:
            table.add_column(f"val {name}", justify="right")
            table.add_column(f"test {name}", justify="right")
        for _, row in front.iterrows():
            cells = [str(int(row["number"]))]
            for name in names:
                cells.extend(_fmt_number(row[f"{split}_{name}"]) for split in ("val", "test"))
            table.add_row(*cells)
        console.print(table)
        console.print(f"trials: {out / TRIALS}  front: {out / FRONT}  plot: {out / FRONT_PLOT}")
        console.print(f"HTML report of the front: fairage report [BASELINE_RUN ...] --tune {out} --out DIR",
                      highlight=False)
    elif pick is None:
        fail("--data DIR is required to run trials (only --pick reads a finished study without it)")
    elif tracking_uri is not None:
        fail("--tracking-uri applies to trials run with --data DIR, not to --pick alone")
    else:
        if storage is None and not (out / "study.db").is_file():
            fail(f"{out} holds no study (no study.db); run `fairage tune --data DIR --out {out}` first")
        study_ = open_study(url, study)
    if pick is not None:
        chosen = pick_trial(study_, pick, out)
        values = ", ".join(f"validation {n} {v:.3f}" for n, v in chosen.values.items())
        console.print(f"picked trial {chosen.number} ({values}); run folder {chosen.run_dir}", highlight=False)
        console.print(chosen.config_path.read_text(encoding="utf-8"), highlight=False, markup=False)
        console.print(f"config written to {chosen.config_path}", highlight=False)


@app.command("report")
def report_command(
    run_dirs: list[Path] | None = typer.Argument(None, help="Finished run folders (each with metrics_test.json); "
                                                "with --tune, the reference models (the first: the baseline)."),
    out: Path = typer.Option(..., "--out", help="Folder for comparison.csv/.md, plots and report.html."),
    reference: str | None = typer.Option(
        None, "--reference", help="Also show a published table beside fairage's: 'seed' (the seed report's "
                                  "Table 1 on APPA-REAL, not measured by fairage)."),
    tune: Path | None = typer.Option(None, "--tune", help="A `fairage tune` folder: the report opens with its "
                                     "Pareto front (table and plot, the run folders as reference points) and "
                                     "compares the front's trials too."),
) -> None:
    """Build the comparison table, plots and report.html from existing run folders (and a tune's front)."""
    from .reference import REFERENCES
    from .report import build_report

    if reference is not None and reference not in REFERENCES:
        fail(f"--reference: unknown table {reference!r}; available: {', '.join(REFERENCES)}")
    if not run_dirs and tune is None:
        fail("give finished run folders to compare, or --tune TUNE_FOLDER")
    report = build_report(list(run_dirs or []), out, reference=reference, tune=tune)
    shown = list(run_dirs or [])
    if tune is not None:
        from .tune import read_tune_folder

        folder = read_tune_folder(tune)
        if "run_dir" in folder.front.columns:
            shown += [d for d in map(folder.run_dir, folder.front["run_dir"]) if d is not None]
    _print_comparison(shown, title="comparison: MAE and bias scores in years, test split", reference=reference)
    console.print(f"report: {report}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (synthetic data, runs, report)."),
    pretrain: bool = typer.Option(True, "--pretrain/--no-pretrain",
                                  help="Start every model from a backbone pretrained on other synthetic faces "
                                       "(the stand-in for VGGFace2), or from random init."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Synthetic benchmark + M1..M5 at CPU scale (minutes on a laptop); prints the table and report path."""
    from .suite import REPORT_PRESETS, run_demo

    report = run_demo(out, pretrain=pretrain, progress=not quiet, on_event=_suite_printer(quiet))
    _print_comparison([out / p for p in REPORT_PRESETS],
                      title="synthetic benchmark: MAE and bias scores in years, test split")
    console.print("[bold]The data is synthetic: these numbers say nothing about real faces.[/bold]")
    console.print(f"report: {report}")


# =========================================================================== Keras import


@app.command("import-keras")
def import_keras_command(
    file: Path = typer.Argument(..., help="Keras 2 HDF5 file (model.save or model.save_weights) of the VGGFace2 ResNet50."),
    out: Path = typer.Option(..., "--out", help="Model folder to create (config.yaml, model.safetensors, import.json)."),
    input_norm: str = typer.Option("vggface2", "--input-norm",
                                   help="Input the network was trained on: vggface2 (BGR 0-255 minus the VGGFace2 mean), "
                                        "caffe or imagenet."),
) -> None:
    """Convert the course kit's Keras VGGFace2 ResNet50 (optionally with a trained age head) to a fairage model folder."""
    from .importers.keras import import_keras

    result = import_keras(file, out, input_norm=input_norm)
    backbone = [k for k, v in result.mapping.items() if v.startswith("backbone.")]
    convs = sum(not k.endswith("/bn") for k in backbone)
    console.print(f"read {file} ({result.kind} Keras HDF5, keras {result.keras_version or 'version unknown'})",
                  highlight=False, soft_wrap=True)
    console.print(f"  backbone: {len(backbone)} layers ({convs} convolutions, {len(backbone) - convs} BatchNorms) "
                  "-> vggface2_resnet50", highlight=False, soft_wrap=True)
    cfg = result.config.model
    console.print(f"  dim_proj -> projection (2048 -> {cfg.projection_dim}, ReLU)", highlight=False, soft_wrap=True)
    if result.head:
        layers = ", ".join(f"{h.name} {h.units} {h.activation}" + (f" (dropout {h.dropout})" if h.dropout else "")
                           for h in result.head)
        console.print(f"  head: {layers} -> head (activations from {result.head_activations_from})", highlight=False, soft_wrap=True)
    for line in result.skipped:
        console.print(f"  skipped {line}", highlight=False, soft_wrap=True)
    for line in result.notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False, soft_wrap=True)
    console.print(f"input: {cfg.input_norm}, {result.config.data.image_size} px; wrote {out} (config.yaml, "
                  f"model.safetensors, import.json); train from it with --set model.weights={out}", highlight=False, soft_wrap=True)


# =========================================================================== predict and export


def _is_model_folder(path: Path) -> bool:
    """A model folder (config.yaml + model.safetensors, no run): evaluate predicts with it first."""
    from .models import MODEL_FOLDER_WEIGHTS
    from .runs import RunFolder

    return (path / MODEL_FOLDER_WEIGHTS).is_file() and not RunFolder.exists(path)


def _model_folder_predictions(folder: Path, faces, progress: bool):
    """``faces`` with a ``prediction`` column from the model in ``folder`` (a model or run folder;
    images decoded as for training) and, when it carries a calibration, ``age_lo``, ``age_hi``
    (the faces' own group labels used)."""
    from .predict import load_model, predict_faces

    loaded = load_model(folder)
    df = faces.copy()
    df["prediction"] = predict_faces(loaded, faces, progress=progress)
    if loaded.calibration is not None:
        df["age_lo"], df["age_hi"] = loaded.calibration.intervals(df["prediction"].to_numpy(), df)
    return df


@app.command("predict")
def predict_command(
    model: Path = typer.Argument(..., help="A run folder, a model folder (import-keras) or an exported .onnx file."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (recursive) and globs."),
    out: Path = typer.Option(..., "--out", help="CSV to write: image,face,x,y,w,h,score,age (image,age with --faces); "
                                                "then age_lo,age_hi (conformal interval) for a calibrated model."),
    faces: bool = typer.Option(False, "--faces", help="Inputs are already face crops: no detection, one row each."),
    annotate: Path | None = typer.Option(None, "--annotate", help="Folder for copies of the photos with boxes and ages drawn (detect mode)."),
    detector: str = typer.Option("auto", "--detector", help="auto (best installed), yunet, haar or dlib."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Faces per forward pass."),
    device: str | None = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda (default: GPU when present)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Ages of every face in photos (or of face crops with --faces), written as CSV."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from .predict import (
        AgePredictor,
        annotated_paths,
        draw_faces,
        expand_inputs,
        prediction_rows,
        write_prediction_csv,
    )

    files = expand_inputs(inputs)
    if not files:
        fail("no image files in the inputs")
    if any(Path(path).resolve() == out.resolve() for path, _ in files):
        fail(f"--out {out} is one of the input images; choose another file for the CSV")
    drawn = annotated_paths(annotate, files) if annotate is not None else {}
    predictor = AgePredictor(model, detector=detector, device=device, batch_size=batch_size)
    labels = dict(files)
    rows: list[dict] = []
    unreadable: list[str] = []
    n_photos = n_faces = n_empty = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=quiet, transient=True, console=Console(stderr=True)) as bar:
        job = bar.add_task("predicting" if faces else f"detecting ({predictor.detector.name}) and predicting",
                           total=len(files))
        for path, result, error, rgb in predictor.predict_files(labels, faces_only=faces,
                                                                     keep_images=annotate is not None):
            bar.advance(job)
            if result is None:
                unreadable.append(error)
                continue
            n_photos += 1
            n_faces += len(result.faces)
            n_empty += not result.faces
            rows += prediction_rows(labels[path], result, faces)
            if annotate is not None and rgb is not None:
                draw_faces(rgb, result, drawn[labels[path]])
    for message in unreadable:
        err_console.print(f"[yellow]skipped:[/yellow] {message}", highlight=False, soft_wrap=True)
    if n_photos == 0:
        fail(f"none of the {len(files)} input file(s) could be read as an image")
    write_prediction_csv(out, rows, faces, intervals=predictor.calibration is not None)
    what = f"{n_photos} face crops" if faces else (f"{n_photos} photos, {n_faces} faces, "
                                                   f"{n_empty} photos without a face")
    console.print(f"{what}, {len(unreadable)} unreadable files; model {predictor.loaded.name} "
                  f"({predictor.loaded.kind}, {predictor.image_size} px) -> {out}", highlight=False, soft_wrap=True)


@app.command("calibrate")
def calibrate_command(
    model: Path = typer.Argument(..., help="A run folder or a model folder (import-keras)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default for a run: its data_dir)."),
    split: str = typer.Option("valid", "--split", help="Split to calibrate on: faces the model did not train on."),
    alpha: float | None = typer.Option(None, "--alpha", min=0.001, max=0.5,
                                          help="Miscoverage: intervals aim at 1 - alpha (default: eval.conformal.alpha, 0.1)."),
    by: list[str] | None = typer.Option(None, "--by", help="Attribute calibrated separately (repeatable; 'age' = true "
                                                            "age bins; several = their intersection; 'none' = plain). "
                                                            "Default: eval.conformal.by."),
    min_group: int | None = typer.Option(None, "--min-group", min=0, help="Fewest faces a group needs for its own quantile."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fit the conformal age intervals of a model and store them in its folder (conformal.json).

    A finished run's predictions_test.csv and metrics_test.json are rewritten with the
    intervals (same predictions), so runs trained before intervals existed gain them.
    """
    from .training import calibrate_folder

    chosen = None if not by else ([] if by == ["none"] else by)
    calibration, messages = calibrate_folder(model, data, split, alpha=alpha, by=chosen, min_group=min_group,
                                             progress=not quiet)
    for message in messages:
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    what = " x ".join(calibration.by) or "plain"
    console.print(f"calibrated {model} on {calibration.n} {split} faces: {100 * calibration.level:g}% intervals, "
                  f"Mondrian by {what}; plain half-width {calibration.plain:.2f} years", highlight=False, soft_wrap=True)
    for group, q in calibration.groups.items():
        note = f" (too few faces: uses {'the plain quantile' if q.fallback == 'all' else q.fallback})" if q.fallback else ""
        if q.split_quantile is not None and q.quantile < q.split_quantile:
            note = f" (split conformal {q.split_quantile:.2f}, tightened for the interval's hull)"
        console.print(f"  {group}: n={q.n}, half-width {q.quantile:.2f} years{note}", highlight=False, soft_wrap=True)


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A run folder or a model folder."),
    format_: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", help="File to write, e.g. model.onnx or model.pt."),
    opset: int = typer.Option(17, "--opset", min=9, help="ONNX opset."),
) -> None:
    """Export a model: input RGB float [0, 1] NCHW (dynamic batch), output age in years; metadata inside."""
    from .export import export_model
    from .predict import load_model

    loaded = load_model(model)
    path = export_model(loaded, out, format_, opset=opset)
    console.print(f"wrote {path} ({format_}): input 'image' float32 (N, 3, {loaded.image_size}, "
                  f"{loaded.image_size}) RGB in [0, 1], output 'age' (N,) years", highlight=False, soft_wrap=True)


# =========================================================================== serving and model cards


@app.command("model-card")
def model_card_command(
    model: Path = typer.Argument(..., help="A run folder, an imported model folder or an exported model file."),
    out: Path | None = typer.Option(None, "--out", help="Write the card here (.md Markdown, .json JSON); "
                                                           "default: print Markdown."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder for the training-data summary "
                                                             "(default: the run's recorded data_dir)."),
) -> None:
    """The model card: training data by group, configuration, test MAE and bias scores with intervals, warnings."""
    from .modelcard import build_model_card, card_markdown, write_model_card

    if out is None:
        print(card_markdown(build_model_card(model, data)), end="")
        return
    card = write_model_card(model, out, data)
    console.print(f"wrote the model card of {card['name']} ({card['kind']}) to {out}", highlight=False)


@app.command("serve")
def serve_command(
    model: Path = typer.Argument(..., help="A run folder, an imported model folder or an exported model file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes, each with its own copy of the model."),
    detector: str = typer.Option("auto", "--detector", help="Face detector: auto, yunet, haar, dlib."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Largest upload, MiB (413 above)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Largest decoded image, pixels (413 above)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Faces of concurrent requests in one forward pass, "
                                                           "1-4096 (1: each request alone)."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="Milliseconds a request's faces wait for "
                                                                      "other requests' to share a pass, 0-1000."),
    prepare_threads: int = typer.Option(2, "--prepare-threads", help="Threads that decode, detect and crop "
                                                                      "uploads, 1-64 (with --prepare-processes 0)."),
    prepare_processes: int | None = typer.Option(None, "--prepare-processes", help="Worker processes that "
                                                 "decode, detect and crop uploads, 0-64 (default: the usable "
                                                 "CPUs; 0: the --prepare-threads of the server process)."),
    detect_side: int = typer.Option(0, "--detect-side", help="Longer side, px, photos are downscaled to for "
                                    "detection in the prepare processes (0: the detector's own, 960 for yunet, as "
                                    "fairage predict; smaller is faster and misses more small faces)."),
    detector_threads: int = typer.Option(1, "--detector-threads", help="OpenMP threads per YuNet call "
                                                                        "(0: OpenMP's default, every core)."),
    runtime: str = typer.Option("auto", "--runtime", help="Age model runtime: auto (the faster here, timed at "
                                                           "start), torch, onnxruntime."),
    model_threads: int = typer.Option(1, "--model-threads", min=1, max=256, help="CPU threads of each forward "
                                                                                 "pass (torch and onnxruntime)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
) -> None:
    """HTTP service and web page: POST /predict (photo -> faces, ages), GET /model (model card), GET / (page)."""
    import os

    import torch
    import uvicorn

    from .serve import ServeLimits, create_app, serve_protocol
    from .serve.app import limits_to_environment
    from .serve.prepare import usable_cpus

    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                         max_batch=max_batch, batch_wait_ms=batch_wait_ms, prepare_threads=prepare_threads,
                         prepare_processes=usable_cpus() if prepare_processes is None else prepare_processes,
                         detect_side=detect_side)
    # the service's process: its forward passes use this many threads (torch's default, every
    # core, waits for busy cores at every layer on a shared machine)
    torch.set_num_threads(model_threads)
    # the model and its card load here first, so a bad path is one message and exit 2, in any mode
    application = create_app(model, limits=limits, detector=detector, detector_threads=detector_threads,
                             runtime=runtime, model_threads=model_threads)
    pool = application.state.prepare_pool
    preparing = (f"{pool.processes} prepare process(es)" if pool is not None
                 else f"{limits.prepare_threads} prepare thread(s)")
    console.print(f"serving {model} on http://{host}:{port}/ with {workers} worker(s), {preparing}, age model on "
                  f"{getattr(application.state.predictor, 'runtime', 'its own runtime')}; Ctrl-C stops",
                  highlight=False)
    if workers == 1:
        uvicorn.run(application, host=host, port=port, log_level=log_level, http=serve_protocol())
        return
    del application
    os.environ.update(FAIRAGE_SERVE_MODEL=str(model.resolve()), FAIRAGE_SERVE_DETECTOR=detector,
                      FAIRAGE_SERVE_DETECTOR_THREADS=str(detector_threads), FAIRAGE_SERVE_RUNTIME=runtime,
                      FAIRAGE_SERVE_MODEL_THREADS=str(model_threads), **limits_to_environment(limits))
    uvicorn.run("fairage.serve.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, http=serve_protocol())


# =========================================================================== entry point


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
