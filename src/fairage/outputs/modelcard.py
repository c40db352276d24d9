"""Model cards: what a model is, what it was trained on, how accurate it is for whom.

``build_model_card(path)`` reads a run folder (through ``fairage.store.run_folder.RunFolder``: its
config, record, test metrics, test predictions and history) or an imported model folder
(``config.yaml``, ``model.safetensors``, ``import.json``) and returns the card as a
JSON-ready dict; ``card_markdown(card)`` renders it as Markdown (Jinja2 template
``templates/model_card.md.j2``). Every error figure is in years, measured on the test split,
with the bootstrap interval the run recorded.

The card reads only the folder it is given, plus the dataset folder the run recorded in
its record (or the one passed as ``data_dir``) for the dataset summary, loaded with the
config's ``data.*`` settings; without it the summary comes from the test predictions.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import DataError
from ..fairness.conformal import CONFORMAL, read_calibration

if TYPE_CHECKING:
    from ..config.schema import ExperimentConfig
    from ..fairness.metrics import EvaluationResult
    from ..store.run_folder import RunFolder

#: the files of an imported model folder (``fairage import-keras``) the card reads
#: a group MAE resting on fewer test faces than this gets a warning
MIN_GROUP_FACES = 30
#: the four bias scores, in the order the seed report's Table 1 lists them
BIAS_ORDER: tuple[str, ...] = ("gender", "expression", "ethnicity", "age")

INTENDED_USE: tuple[str, ...] = (
    (
        "Estimating the apparent age of a face (the age it looks to human raters, in years) in photos "
        "like the training data, for research, teaching and demonstrations."
    ),
    (
        "Measuring and comparing how an age estimator's error differs across age, gender, ethnicity and "
        "expression groups, and how training strategies change those differences."
    ),
)
OUT_OF_SCOPE: tuple[str, ...] = (
    (
        "Decisions about a person: age verification, access control, hiring, insurance, policing or any "
        "other use where an error harms the person shown."
    ),
    "Inferring a person's real (chronological) age, identity, gender or ethnicity.",
)


def read_model_folder(path: Path):
    """An imported model folder's validated config and its ``import.json`` object (``{}`` when absent).

    A model folder (``fairage import-keras``) is not a run folder: it has no record, history or
    evaluation. DataError/ConfigError naming the file when one is unreadable.
    """
    from ..store.model_folder import read_config, read_import_info

    return read_config(path), read_import_info(path)


def _ci(value) -> list[float] | None:
    return [float(value[0]), float(value[1])] if isinstance(value, (list, tuple)) and len(value) == 2 else None


def _evaluation(metrics: EvaluationResult, source: str) -> dict:
    """The card's evaluation section from a run's test metrics (``fairage.fairness.metrics.evaluate``)."""
    singles = [a for a in metrics.bias if a not in metrics.intersections]
    order = (
        [a for a in BIAS_ORDER if a in singles]
        + [a for a in singles if a not in BIAS_ORDER]
        + [a for a in metrics.intersections if a in metrics.bias]
    )
    return {
        "split": "test",
        "source": source,
        "n": int(metrics.n),
        "level": float(metrics.level),
        "n_boot": int(metrics.n_boot),
        "n_perm": int(metrics.n_perm),
        "mae": {"value": float(metrics.mae), "ci": _ci(metrics.mae_ci)},
        "bias": {
            a: {
                "value": None if metrics.bias[a] is None else float(metrics.bias[a]),
                "ci": _ci(metrics.bias_ci.get(a)),
                "p": metrics.bias_p.get(a),
            }
            for a in order
        },
        "groups": {
            a: [
                {"group": g, "n": int(score.n), "mae": float(score.mae), "ci": _ci(score.ci)}
                for g, score in metrics.groups[a].items()
            ]
            for a in order
            if a in metrics.groups
        },
        "skipped_groups": {a: list(v) for a, v in metrics.skipped_groups.items() if v},
        "min_group": int(metrics.min_group),
        "small_groups": {a: list(metrics.small_groups.get(a, [])) for a in order},
        "age_bins": [
            {"group": g, "n": int(score.n), "mae": None if score.n == 0 else float(score.mae), "ci": _ci(score.ci)}
            for g, score in metrics.age_bins.items()
        ],
        "cs": {k: {"value": float(v.value), "ci": _ci(v.ci)} for k, v in metrics.cs.items()},
        "epsilon_error": (
            None
            if metrics.epsilon_error is None
            else {"value": float(metrics.epsilon_error.value), "ci": _ci(metrics.epsilon_error.ci)}
        ),
        "worst_group": {
            a: (
                None
                if (w := metrics.worst_group.get(a)) is None
                else {"group": w.group, "mae": float(w.mae), "ci": _ci(w.ci)}
            )
            for a in order
        },
        "group_mae_std": {
            a: (None if (v := metrics.group_mae_std.get(a)) is None else {"value": float(v.value), "ci": _ci(v.ci)})
            for a in order
        },
        "intervals": _intervals(metrics, order),
    }


def _intervals(metrics: EvaluationResult, order: list[str]) -> dict | None:
    # ``build_model_card`` adds "calibration": {by, alpha, n, split, tightened, fallbacks} from conformal.json
    """The card's interval section: per interval set (``conformal``, ``plain``) coverage (fraction)
    and mean width (years) overall and per group, and the coverage gap; None without intervals."""
    if not metrics.coverage:
        return None

    def group(name, score):
        return {
            "group": name,
            "n": int(score.n),
            "coverage": score.coverage,
            "ci": _ci(score.coverage_ci),
            "width": score.width,
            "width_ci": _ci(score.width_ci),
        }

    return {
        "target": metrics.coverage_target,
        "calibration": None,
        "sets": {
            name: {
                "coverage": c.total.coverage,
                "ci": _ci(c.total.coverage_ci),
                "width": c.total.width,
                "width_ci": _ci(c.total.width_ci),
                "gap": {
                    a: {"value": c.gap.get(a), "ci": _ci(c.gap_ci.get(a)), "p": c.gap_p.get(a)}
                    for a in order
                    if a in c.gap
                },
                "groups": {a: [group(g, v) for g, v in c.groups[a].items()] for a in order if a in c.groups},
            }
            for name, c in metrics.coverage.items()
        },
    }


def _summary_dict(tables: dict[str, pd.DataFrame]) -> dict:
    """``report.summarize_faces`` tables as JSON: attribute -> {"columns": [...], "rows": [{"value", col: n}]}."""
    out = {}
    for attr, t in tables.items():
        out[attr] = {
            "columns": [str(c) for c in t.columns],
            "rows": [{"value": str(idx), **{str(c): int(t.at[idx, c]) for c in t.columns}} for idx in t.index],
        }
    return out


def _dataset(cfg: ExperimentConfig, run: RunFolder | None, data_dir: Path | None) -> tuple[dict, list[str]]:
    """Dataset section (folder, synthetic or not, counts by group and split) and warnings about it.

    The dataset is loaded with ``cfg``'s ``data.*`` settings, as the run loaded it; without it,
    the counts come from the run's test predictions.
    """
    from ..data.synthetic import synthetic_marker
    from ..store.predictions import read_predictions
    from ..store.run_folder import RunFolder, config_faces
    from .report import summarize_faces

    warnings: list[str] = []
    section: dict[str, Any] = {
        "dir": str(data_dir) if data_dir else None,
        "synthetic": False,
        "synthetic_info": None,
        "summary": None,
        "summary_source": None,
    }
    if data_dir is not None:
        marker = synthetic_marker(data_dir)
        # folders written before the marker existed: the demo names them synthetic-v<version>-...
        section["synthetic"] = marker is not None or data_dir.name.startswith("synthetic-v")
        section["synthetic_info"] = marker
        if data_dir.is_dir():
            try:
                section["summary"] = _summary_dict(summarize_faces(config_faces(cfg, data_dir)))
                section["summary_source"] = f"all splits, from {data_dir}"
            except DataError as err:
                warnings.append(f"the dataset summary could not be read from {data_dir}: {err}")
        else:
            warnings.append(
                f"the training data folder {data_dir} is not available; the summary covers the test split only"
            )
    predictions = run.file(RunFolder.PREDICTIONS) if run is not None else None
    if section["summary"] is None and predictions is not None and predictions.is_file():
        df = read_predictions(predictions)
        section["summary"] = _summary_dict(summarize_faces(df.assign(split="test")))
        section["summary_source"] = f"test split, from {RunFolder.PREDICTIONS}"
    return section, warnings


def _training(cfg: ExperimentConfig, run: RunFolder) -> dict:
    from ..fairness.weighting import describe

    best_epochs = run.best_epochs()
    stages = []
    for name, stage in cfg.stages():
        row: dict[str, Any] = {
            "name": name,
            "trains": "head only (backbone frozen)" if name == "stage1" else "all layers",
            "lr": stage.lr,
            "batch_size": stage.batch_size,
            "max_epochs": stage.max_epochs,
            "patience": stage.patience,
            "loss": stage.loss,
            "weighting": describe(stage.weighting),
            "epochs_run": None,
            "best_val_mae": None,
            "best_epoch": None,
        }
        if name in best_epochs:
            best = best_epochs[name]
            row.update(epochs_run=best["epochs_run"], best_val_mae=best["val_mae"], best_epoch=best["epoch"])
        stages.append(row)
    return {
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "stages": stages,
        "status": run.record.status,
        "device": run.record.device or None,
    }


def _warnings(evaluation: dict | None, run: RunFolder | None, synthetic: bool) -> list[str]:
    from ..store.run_folder import RunFolder

    out = run.warnings() if run is not None else []
    if synthetic:
        out.append(
            "trained and evaluated on fairage's synthetic (drawn) faces: the figures say nothing about "
            "real photos, and ages predicted for real faces are not meaningful"
        )
    if run is not None and run.record.weights_loaded is False:
        out.append("trained from random initialisation (no pretrained weights were loaded)")
    if run is not None and run.record.status != "finished":
        out.append(f"the run is not finished ({RunFolder.RUN} status {run.record.status!r})")
    if evaluation is None:
        out.append("no test evaluation: accuracy and bias of this model are unknown")
        return out
    for attr, rows in evaluation["groups"].items():
        small = [f"{r['group']} ({r['n']})" for r in rows if r["n"] < MIN_GROUP_FACES]
        if small:
            out.append(
                f"{attr}: group MAEs resting on fewer than {MIN_GROUP_FACES} test faces are uncertain: "
                + ", ".join(small)
            )
    for attr, groups in evaluation["skipped_groups"].items():
        out.append(f"{attr}: no test faces in {', '.join(groups)}: not measured")
    intervals = evaluation.get("intervals")
    conformal = (intervals or {}).get("sets", {}).get("conformal")
    if conformal and intervals["target"] is not None:
        target = intervals["target"]
        low = [
            f"{attr} {r['group']} ({100 * r['coverage']:.1f}%)"
            for attr, rows in conformal["groups"].items()
            for r in rows
            if r["ci"] is not None and r["ci"][1] < target
        ]
        if low:
            out.append(
                f"age intervals cover fewer than {100 * target:g}% of the test faces (the whole bootstrap "
                "interval below) in: " + ", ".join(low)
            )
    return out


def _limitations(evaluation: dict | None, synthetic: bool) -> list[str]:
    from ..data.schema import VOCABULARIES, age_bin_labels

    if evaluation is not None and evaluation["groups"]:
        measured = "; ".join(f"{a}: {', '.join(r['group'] for r in rows)}" for a, rows in evaluation["groups"].items())
    else:
        measured = "; ".join(
            [f"age: {', '.join(age_bin_labels())}"]
            + [f"{a}: {', '.join(v for v in vals if v != 'unknown')}" for a, vals in VOCABULARIES.items()]
        )
    out = [
        (
            "Predicts apparent age (what raters judged a face to look), not real age; the two differ by several "
            "years for many people."
        ),
        (
            f"Groups measured: {measured}. These are the dataset's annotation categories, assigned by annotators; "
            "people outside them (e.g. other ethnicities, non-binary gender) and other attributes (skin tone scale, "
            "make-up, glasses, image quality) are not measured."
        ),
        (
            "Errors are measured on the test split of the training dataset; on photos from elsewhere (other "
            "cameras, lighting, poses, crops or face detectors) they can be larger and differ by group in other ways."
        ),
        (
            "A bias score is the mean absolute difference between group MAEs; its bootstrap interval covers "
            "test-set sampling only, not a change of population."
        ),
    ]
    if synthetic:
        out.insert(
            0,
            "The training and test faces are synthetic: procedurally drawn cartoon heads, not photos. "
            "The model has never seen a real face.",
        )
    return out


def build_model_card(model: str | Path, data_dir: str | Path | None = None) -> dict:
    """The model card of a run folder, an imported model folder or an exported model file, as a dict.

    ``data_dir`` overrides the dataset folder a run recorded (its record's ``data_dir``) for the
    dataset summary. Keys: ``name``, ``description``, ``kind``, ``source``, ``model``,
    ``training``, ``configuration``, ``data``, ``evaluation`` (None without a test evaluation)
    and ``evaluation_note``, ``warnings``, ``intended_use``, ``out_of_scope``, ``limitations``.
    Error figures in years. Raises DataError/ConfigError naming the file that is missing or bad.
    """
    from ..store.run_folder import RunFolder

    path = Path(model)
    from ..store.model_folder import model_kind

    kind = model_kind(path)
    if kind == "exported":
        return _exported_card(path)
    run = RunFolder.open(path) if kind == "run" else None
    if run is not None:
        cfg, import_info = run.config(), {}
        metrics = run.metrics()
    else:
        cfg, import_info = read_model_folder(path)
        metrics = None  # an imported model carries no evaluation
    evaluation = _evaluation(metrics, RunFolder.METRICS) if metrics is not None else None
    calibration = run.calibration() if run is not None else read_calibration(path / CONFORMAL)
    if evaluation is not None and evaluation["intervals"] is not None and calibration is not None:
        evaluation["intervals"]["calibration"] = _calibration_summary(calibration)
    note = _evaluation_note(evaluation, kind)
    data = Path(data_dir) if data_dir is not None else (run.data_dir if run is not None else None)
    dataset, data_warnings = _dataset(cfg, run, data)
    return {
        "name": cfg.name,
        "description": cfg.description.strip(),
        "kind": kind,
        "source": str(path),
        "model": _model_summary(cfg, run, import_info),
        "training": _training(cfg, run) if run is not None else None,
        "configuration": cfg.model_dump(mode="json"),
        "data": dataset,
        "evaluation": evaluation,
        "evaluation_note": note,
        "warnings": data_warnings + _warnings(evaluation, run, dataset["synthetic"]),
        "intended_use": list(INTENDED_USE),
        "out_of_scope": list(OUT_OF_SCOPE),
        "limitations": _limitations(evaluation, dataset["synthetic"]),
    }


def _calibration_summary(calibration) -> dict:
    """The card's account of the conformal calibration behind the intervals."""
    return {
        "by": list(calibration.by),
        "alpha": calibration.alpha,
        "n": calibration.n,
        "split": calibration.split,
        "tightened": calibration.tightened,
        "fallbacks": calibration.fallbacks(),
    }


def _evaluation_note(evaluation: dict | None, kind: str) -> str:
    """What the card's evaluation is (or why there is none)."""
    from ..store.run_folder import RunFolder

    if evaluation is not None:
        return (
            f"test split, {evaluation['n']} faces, {100 * evaluation['level']:g}% bootstrap intervals "
            f"({evaluation['n_boot']} resamples)"
        )
    if kind == "folder":
        return (
            "imported model: no evaluation was recorded with it; evaluate it on a labelled test split "
            "before relying on its accuracy or bias"
        )
    return f"the run has no {RunFolder.METRICS} yet (unfinished): no evaluation"


def _model_summary(cfg, run, import_info: dict) -> dict:
    """The network: backbone, input (pixels, normalisation), projection, head, output, initial weights."""
    weights = cfg.model.weights
    return {
        "backbone": cfg.model.backbone,
        "input_size": cfg.data.image_size,
        "input_norm": cfg.model.input_norm,
        "projection_dim": cfg.model.projection_dim,
        "head": [{"units": b.units, "dropout": b.dropout} for b in cfg.model.head],
        "output": cfg.model.output,
        "initial_weights": str(weights) if weights else None,
        "weights_loaded": run.record.weights_loaded if run is not None else None,
        "imported_from": import_info.get("source") if import_info else None,
    }


def _exported_card(path: Path) -> dict:
    """A model file carries no training record: the card says what it is and that nothing was measured."""
    return {
        "name": path.stem,
        "description": "",
        "kind": "exported",
        "source": str(path),
        "model": {"file": path.name},
        "training": None,
        "configuration": None,
        "data": {"dir": None, "synthetic": False, "synthetic_info": None, "summary": None, "summary_source": None},
        "evaluation": None,
        "evaluation_note": "an exported model file carries no evaluation; make the card from its run folder",
        "warnings": ["no test evaluation: accuracy and bias of this model are unknown"],
        "intended_use": list(INTENDED_USE),
        "out_of_scope": list(OUT_OF_SCOPE),
        "limitations": _limitations(None, False),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: list[float] | None, digits: int = 2) -> str:
    return "" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def card_markdown(card: dict) -> str:
    """The card as a Markdown document (figures in years, two decimals)."""
    import jinja2
    import yaml

    template = resources.files("fairage.outputs").joinpath("templates/model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.filters["num"] = _fmt
    env.filters["ci"] = _fmt_ci
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    env.filters["pctci"] = lambda ci: "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    config = {k: v for k, v in (card["configuration"] or {}).items() if k != "description"}  # shown at the top
    config_yaml = yaml.safe_dump(config, sort_keys=False, width=1000) if config else None
    return env.from_string(template).render(card=card, config_yaml=config_yaml)


def write_model_card(model: str | Path, out: str | Path, data_dir: str | Path | None = None) -> dict:
    """Write the card to ``out`` (Markdown; ``.json`` -> the JSON dict), atomically; return the card."""
    from ..atomic import write_text

    card = build_model_card(model, data_dir)
    out = Path(out)
    text = json.dumps(card, indent=2) + "\n" if out.suffix.lower() == ".json" else card_markdown(card)
    write_text(out, text)
    return card
