"""Model cards: what a model is, what it was trained on, how accurate it is for whom.

``build_model_card(path)`` reads a run folder (``config.yaml``, ``run.json``,
``metrics_test.json``, ``predictions_test.csv``, ``history.csv``) or an imported model
folder (``config.yaml``, ``model.safetensors``, ``import.json``) and returns the card as a
JSON-ready dict; ``card_markdown(card)`` renders it as Markdown (Jinja2 template
``templates/model_card.md.j2``). Every error figure is in years, measured on the test split,
with the bootstrap interval the run recorded.

The card reads only the folder it is given, plus the dataset folder the run recorded in
``run.json`` (or the one passed as ``data_dir``) for the dataset summary; without it the
summary comes from the test predictions.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import DataError

#: a group MAE resting on fewer test faces than this gets a warning
MIN_GROUP_FACES = 30
#: the four bias scores, in the order the seed report's Table 1 lists them
BIAS_ORDER: tuple[str, ...] = ("gender", "expression", "ethnicity", "age")

INTENDED_USE: tuple[str, ...] = (
    "Estimating the apparent age of a face (the age it looks to human raters, in years) in photos "
    "like the training data, for research, teaching and demonstrations.",
    "Measuring and comparing how an age estimator's error differs across age, gender, ethnicity and "
    "expression groups, and how training strategies change those differences.",
)
OUT_OF_SCOPE: tuple[str, ...] = (
    "Decisions about a person: age verification, access control, hiring, insurance, policing or any "
    "other use where an error harms the person shown.",
    "Inferring a person's real (chronological) age, identity, gender or ethnicity.",
)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return value


def model_kind(path: str | Path) -> str:
    """``"run"`` (a training run folder), ``"folder"`` (an imported model folder) or ``"exported"`` (a file).

    Raises DataError when ``path`` is none of these.
    """
    path = Path(path)
    if path.is_file():
        return "exported"
    if not path.is_dir():
        raise DataError(f"model not found: {path}")
    if not (path / "config.yaml").is_file():
        raise DataError(f"{path} holds no config.yaml: not a fairage run or model folder")
    if (path / "run.json").is_file():
        return "run"
    if (path / "model.safetensors").is_file():
        return "folder"
    raise DataError(f"{path} has a config.yaml but neither run.json (a run folder) nor model.safetensors "
                    "(a model folder)")


def _config(path: Path):
    from .config import read_yaml, validate_config

    return validate_config(read_yaml(path / "config.yaml"), str(path / "config.yaml"))


def _ci(value) -> list[float] | None:
    return [float(value[0]), float(value[1])] if isinstance(value, (list, tuple)) and len(value) == 2 else None


def _evaluation(metrics: dict, source: Path) -> dict:
    """The card's evaluation section from a ``metrics_test.json`` object (``fairage.metrics.evaluate``)."""
    if "mae" not in metrics or "bias" not in metrics:
        raise DataError(f"{source} has no 'mae'/'bias' entries")
    bias_ci = metrics.get("bias_ci") or {}
    groups_ci = metrics.get("groups_ci") or {}
    order = [a for a in BIAS_ORDER if a in metrics["bias"]] + [a for a in metrics["bias"] if a not in BIAS_ORDER]
    return {
        "split": "test",
        "source": source.name,
        "n": int(metrics.get("n", 0)),
        "level": float(metrics.get("level", 0.95)),
        "n_boot": int(metrics.get("n_boot", 0)),
        "mae": {"value": float(metrics["mae"]), "ci": _ci(metrics.get("mae_ci"))},
        "bias": {a: {"value": None if metrics["bias"][a] is None else float(metrics["bias"][a]),
                     "ci": _ci(bias_ci.get(a))} for a in order},
        "groups": {a: [{"group": g, "n": int(row["n"]), "mae": float(row["mae"]),
                        "ci": _ci((groups_ci.get(a) or {}).get(g))}
                       for g, row in (metrics.get("groups") or {}).get(a, {}).items()]
                   for a in order if a in (metrics.get("groups") or {})},
        "skipped_groups": {a: list(v) for a, v in (metrics.get("skipped_groups") or {}).items() if v},
    }


def _summary_dict(tables: dict[str, pd.DataFrame]) -> dict:
    """``report.summarize_faces`` tables as JSON: attribute -> {"columns": [...], "rows": [{"value", col: n}]}."""
    out = {}
    for attr, t in tables.items():
        out[attr] = {"columns": [str(c) for c in t.columns],
                     "rows": [{"value": str(idx), **{str(c): int(t.at[idx, c]) for c in t.columns}} for idx in t.index]}
    return out


def _dataset(run_dir: Path | None, data_dir: Path | None) -> tuple[dict | None, list[str]]:
    """Dataset section (folder, synthetic or not, counts by group and split) and warnings about it."""
    from .data.synthetic import synthetic_marker
    from .report import summarize_faces

    warnings: list[str] = []
    section: dict[str, Any] = {"dir": str(data_dir) if data_dir else None, "synthetic": False,
                               "synthetic_info": None, "summary": None, "summary_source": None}
    if data_dir is not None:
        marker = synthetic_marker(data_dir)
        # folders written before the marker existed: the demo names them synthetic-v<version>-...
        section["synthetic"] = marker is not None or data_dir.name.startswith("synthetic-v")
        section["synthetic_info"] = marker
        if data_dir.is_dir():
            from .data import load_faces

            try:
                section["summary"] = _summary_dict(summarize_faces(load_faces(data_dir)))
                section["summary_source"] = f"all splits, from {data_dir}"
            except DataError as err:
                warnings.append(f"the dataset summary could not be read from {data_dir}: {err}")
        else:
            warnings.append(f"the training data folder {data_dir} is not available; the summary covers the "
                            "test split only")
    if section["summary"] is None and run_dir is not None and (run_dir / "predictions_test.csv").is_file():
        p = run_dir / "predictions_test.csv"
        try:
            df = pd.read_csv(p)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise DataError(f"{p} is not a readable CSV: {err}") from None
        section["summary"] = _summary_dict(summarize_faces(df.assign(split="test")))
        section["summary_source"] = f"test split, from {p.name}"
    return section, warnings


def _training(cfg, run_dir: Path | None, run_info: dict) -> dict:
    from .weighting import describe

    history = None
    if run_dir is not None and (run_dir / "history.csv").is_file():
        try:
            history = pd.read_csv(run_dir / "history.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise DataError(f"{run_dir / 'history.csv'} is not a readable CSV: {err}") from None
    stages = []
    for name, stage in cfg.stages():
        row: dict[str, Any] = {"name": name, "trains": "head only (backbone frozen)" if name == "stage1" else "all layers",
                               "lr": stage.lr, "batch_size": stage.batch_size, "max_epochs": stage.max_epochs,
                               "patience": stage.patience, "loss": stage.loss, "weighting": describe(stage.weighting),
                               "epochs_run": None, "best_val_mae": None}
        if history is not None and {"stage", "val_mae"} <= set(history.columns):
            rows = history[history["stage"] == name]
            if len(rows):
                row["epochs_run"] = int(len(rows))
                row["best_val_mae"] = float(rows["val_mae"].min()) if rows["val_mae"].notna().any() else None
        stages.append(row)
    return {"strategy": cfg.strategy, "seed": cfg.seed, "stages": stages,
            "status": run_info.get("status"), "device": run_info.get("device")}


def _warnings(evaluation: dict | None, run_info: dict, kind: str, synthetic: bool) -> list[str]:
    from .report import run_warnings

    out = list(run_warnings(run_info))
    if synthetic:
        out.append("trained and evaluated on fairage's synthetic (drawn) faces: the figures say nothing about "
                   "real photos, and ages predicted for real faces are not meaningful")
    if kind == "run" and run_info.get("weights_loaded") is False:
        out.append("trained from random initialisation (no pretrained weights were loaded)")
    if kind == "run" and run_info.get("status") != "finished":
        out.append(f"the run is not finished (run.json status {run_info.get('status')!r})")
    if evaluation is None:
        out.append("no test evaluation: accuracy and bias of this model are unknown")
        return out
    for attr, rows in evaluation["groups"].items():
        small = [f"{r['group']} ({r['n']})" for r in rows if r["n"] < MIN_GROUP_FACES]
        if small:
            out.append(f"{attr}: group MAEs resting on fewer than {MIN_GROUP_FACES} test faces are uncertain: "
                       + ", ".join(small))
    for attr, groups in evaluation["skipped_groups"].items():
        out.append(f"{attr}: no test faces in {', '.join(groups)}: not measured")
    return out


def _limitations(evaluation: dict | None, synthetic: bool) -> list[str]:
    from .data.schema import VOCABULARIES, age_bin_labels

    if evaluation is not None and evaluation["groups"]:
        measured = "; ".join(f"{a}: {', '.join(r['group'] for r in rows)}" for a, rows in evaluation["groups"].items())
    else:
        measured = "; ".join([f"age: {', '.join(age_bin_labels())}"]
                             + [f"{a}: {', '.join(v for v in vals if v != 'unknown')}" for a, vals in VOCABULARIES.items()])
    out = [
        "Predicts apparent age (what raters judged a face to look), not real age; the two differ by several "
        "years for many people.",
        f"Groups measured: {measured}. These are the dataset's annotation categories, assigned by annotators; "
        "people outside them (e.g. other ethnicities, non-binary gender) and other attributes (skin tone scale, "
        "make-up, glasses, image quality) are not measured.",
        "Errors are measured on the test split of the training dataset; on photos from elsewhere (other "
        "cameras, lighting, poses, crops or face detectors) they can be larger and differ by group in other ways.",
        "A bias score is the mean absolute difference between group MAEs; its bootstrap interval covers "
        "test-set sampling only, not a change of population.",
    ]
    if synthetic:
        out.insert(0, "The training and test faces are synthetic: procedurally drawn cartoon heads, not photos. "
                      "The model has never seen a real face.")
    return out


def build_model_card(model: str | Path, data_dir: str | Path | None = None) -> dict:
    """The model card of a run folder, an imported model folder or an exported model file, as a dict.

    ``data_dir`` overrides the dataset folder a run recorded (``run.json`` ``data_dir``) for the
    dataset summary. Keys: ``name``, ``description``, ``kind``, ``source``, ``model``,
    ``training``, ``configuration``, ``data``, ``evaluation`` (None without a test evaluation)
    and ``evaluation_note``, ``warnings``, ``intended_use``, ``out_of_scope``, ``limitations``.
    Error figures in years. Raises DataError/ConfigError naming the file that is missing or bad.
    """
    path = Path(model)
    kind = model_kind(path)
    if kind == "exported":
        return _exported_card(path)
    cfg = _config(path)
    run_dir = path if kind == "run" else None
    run_info = _read_json(path / "run.json") if run_dir else {}
    import_info = _read_json(path / "import.json") if kind == "folder" else {}
    metrics = _read_json(path / "metrics_test.json")
    evaluation = _evaluation(metrics, path / "metrics_test.json") if metrics else None
    if evaluation is not None:
        note = (f"test split, {evaluation['n']} faces, {100 * evaluation['level']:g}% bootstrap intervals "
                f"({evaluation['n_boot']} resamples)")
    elif kind == "folder":
        note = ("imported model: no evaluation was recorded with it; evaluate it on a labelled test split "
                "before relying on its accuracy or bias")
    else:
        note = "the run has no metrics_test.json yet (unfinished): no evaluation"
    recorded = run_info.get("data_dir") if run_dir else None
    data = Path(data_dir) if data_dir is not None else (Path(recorded) if recorded else None)
    dataset, data_warnings = _dataset(run_dir, data)
    weights = cfg.model.weights
    return {
        "name": cfg.name,
        "description": cfg.description.strip(),
        "kind": kind,
        "source": str(path),
        "model": {
            "backbone": cfg.model.backbone,
            "input_size": cfg.data.image_size,
            "input_norm": cfg.model.input_norm,
            "projection_dim": cfg.model.projection_dim,
            "head": [{"units": b.units, "dropout": b.dropout} for b in cfg.model.head],
            "output": cfg.model.output,
            "initial_weights": str(weights) if weights else None,
            "weights_loaded": run_info.get("weights_loaded") if run_dir else None,
            "imported_from": import_info.get("source") if import_info else None,
        },
        "training": _training(cfg, run_dir, run_info) if run_dir else None,
        "configuration": cfg.model_dump(mode="json"),
        "data": dataset,
        "evaluation": evaluation,
        "evaluation_note": note,
        "warnings": data_warnings + _warnings(evaluation, run_info, kind, dataset["synthetic"]),
        "intended_use": list(INTENDED_USE),
        "out_of_scope": list(OUT_OF_SCOPE),
        "limitations": _limitations(evaluation, dataset["synthetic"]),
    }


def _exported_card(path: Path) -> dict:
    """A model file carries no training record: the card says what it is and that nothing was measured."""
    return {
        "name": path.stem, "description": "", "kind": "exported", "source": str(path),
        "model": {"file": path.name}, "training": None, "configuration": None,
        "data": {"dir": None, "synthetic": False, "synthetic_info": None, "summary": None, "summary_source": None},
        "evaluation": None,
        "evaluation_note": "an exported model file carries no evaluation; make the card from its run folder",
        "warnings": ["no test evaluation: accuracy and bias of this model are unknown"],
        "intended_use": list(INTENDED_USE), "out_of_scope": list(OUT_OF_SCOPE),
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

    template = resources.files("fairage").joinpath("templates/model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["num"] = _fmt
    env.filters["ci"] = _fmt_ci
    config = {k: v for k, v in (card["configuration"] or {}).items() if k != "description"}  # shown at the top
    config_yaml = yaml.safe_dump(config, sort_keys=False, width=1000) if config else None
    return env.from_string(template).render(card=card, config_yaml=config_yaml)


def write_model_card(model: str | Path, out: str | Path, data_dir: str | Path | None = None) -> dict:
    """Write the card to ``out`` (Markdown; ``.json`` -> the JSON dict), atomically; return the card."""
    from .atomic import write_text

    card = build_model_card(model, data_dir)
    out = Path(out)
    text = json.dumps(card, indent=2) + "\n" if out.suffix.lower() == ".json" else card_markdown(card)
    write_text(out, text)
    return card
