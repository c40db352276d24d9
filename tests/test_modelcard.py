"""Model cards of a finished run and of an imported model folder: values, Markdown, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fairage.cli import app
from fairage.data import load_faces
from fairage.outputs.modelcard import build_model_card, card_markdown


@pytest.fixture(scope="module")
def card(tiny_run) -> dict:
    return build_model_card(tiny_run)


@pytest.fixture()
def model_folder(tiny_run, tmp_path) -> Path:
    """An imported model folder (config.yaml + model.safetensors + import.json), no evaluation."""
    from safetensors.torch import save_file

    from fairage.inference.predictor import load_model

    folder = tmp_path / "imported"
    folder.mkdir()
    loaded = load_model(tiny_run)
    shutil.copy(tiny_run / "config.yaml", folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "import.json").write_text(json.dumps({"source": "kit/weights.h5"}))
    return folder


def test_evaluation_matches_the_predictions_worked_out_by_hand(card, tiny_run):
    df = pd.read_csv(tiny_run / "predictions_test.csv")
    err = (df["prediction"] - df["age"]).abs()
    ev = card["evaluation"]
    assert ev["n"] == len(df) == 48
    assert ev["mae"]["value"] == pytest.approx(err.mean())
    by_gender = err.groupby(df["gender"]).mean()
    assert ev["bias"]["gender"]["value"] == pytest.approx(abs(by_gender["male"] - by_gender["female"]))
    assert {g["group"]: g["mae"] for g in ev["groups"]["gender"]} == pytest.approx(by_gender.to_dict())
    assert {g["group"]: g["n"] for g in ev["groups"]["ethnicity"]} == df["ethnicity"].value_counts().to_dict()
    assert list(ev["bias"]) == ["gender", "expression", "ethnicity", "age", "age*ethnicity", "gender*ethnicity"]
    for b in ev["bias"].values():
        assert b["ci"] is not None and b["ci"][0] <= b["ci"][1]


def test_dataset_summary_and_synthetic_flag(card, tiny_run):
    data_dir = Path(json.loads((tiny_run / "run.json").read_text())["data_dir"])
    faces = load_faces(data_dir)
    assert card["data"]["synthetic"] is True and card["data"]["dir"] == str(data_dir)
    eth = {r["value"]: r for r in card["data"]["summary"]["ethnicity"]["rows"]}
    for split in ("train", "valid", "test"):
        counts = faces.loc[faces["split"] == split, "ethnicity"].value_counts()
        assert {v: eth[v][split] for v in counts.index} == counts.to_dict()
    assert sum(r["total"] for r in eth.values()) == len(faces)
    assert any("synthetic" in w for w in card["warnings"])
    assert card["limitations"][0].startswith("The training and test faces are synthetic")


def test_photo_data_is_not_called_synthetic(tiny_run, tmp_path):
    data_dir = Path(json.loads((tiny_run / "run.json").read_text())["data_dir"])
    photos = tmp_path / "photos"
    shutil.copytree(data_dir, photos, ignore=shutil.ignore_patterns("synthetic.json", ".fairage_cache"))
    card = build_model_card(tiny_run, data_dir=photos)
    assert card["data"]["synthetic"] is False
    assert not any("synthetic" in w for w in card["warnings"])


def test_markdown_holds_the_figures(card):
    md = card_markdown(card)
    ev = card["evaluation"]
    lo, hi = ev["mae"]["ci"]
    assert f"| MAE | {ev['mae']['value']:.2f} | [{lo:.2f}, {hi:.2f}] |" in md
    for attr, b in ev["bias"].items():
        assert f"| {attr} bias | {b['value']:.2f} |" in md
        assert f" | {b['p']:.3g} |" in md.split(f"| {attr} bias |")[1].split("\n")[0]
    assert ev["n_perm"] == 200 and "| measure | value | interval | permutation p |" in md
    for g in ev["groups"]["age"]:
        assert f"| {g['group']} | {g['n']} | {g['mae']:.2f} |" in md
    for heading in (
        "## Evaluation",
        "### MAE by group",
        "## Training data",
        "## Training",
        "## Warnings",
        "## Intended use",
        "## Limitations",
        "## Configuration",
    ):
        assert heading in md
    assert "Synthetic data." in md
    config = yaml.safe_load(md.split("```yaml\n")[1].split("```")[0])
    assert config["name"] == "M2" and config["model"]["backbone"] == card["model"]["backbone"]


def test_imported_folder_says_it_has_no_evaluation(model_folder):
    card = build_model_card(model_folder)
    assert card["kind"] == "folder" and card["evaluation"] is None
    assert card["model"]["imported_from"] == "kit/weights.h5"
    md = card_markdown(card)
    assert "no evaluation was recorded" in md
    assert "Not recorded: an imported model carries no record of its training data." in md
    assert "| MAE |" not in md


def test_server_serves_an_imported_folder(model_folder):
    import httpx
    from test_serve import LiveServer

    from fairage.serve import create_app

    live = LiveServer(create_app(model_folder))
    try:
        assert httpx.get(f"{live.url}/model").json()["evaluation"] is None
        assert "no evaluation" in httpx.get(f"{live.url}/model.md").text
    finally:
        live.close()


def test_cli_writes_markdown_and_json(tiny_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["model-card", str(tiny_run), "--out", str(tmp_path / "card.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "card.md").read_text().startswith("# Model card: M2")
    result = runner.invoke(app, ["model-card", str(tiny_run), "--out", str(tmp_path / "card.json")])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["evaluation"]["mae"]["value"] == pytest.approx(
        json.loads((tiny_run / "metrics_test.json").read_text())["mae"]
    )


def test_cli_bad_model_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["model-card", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no config.yaml" in result.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("name: x\nstage2: {lr: 1e-3}\n")
    (tmp_path / "bad" / "run.json").write_text("{not json")
    result = CliRunner().invoke(app, ["model-card", str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert "run.json" in result.output


def test_card_and_cli_quote_the_epoch_the_best_checkpoint_keeps(tiny_run, tmp_path, capsys, monkeypatch):
    """The best checkpoint monitors val_loss: the quoted val MAE is the one at the lowest val_loss,
    even when another epoch had a lower val_mae."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "stage": ["stage1"] * 4,
            "train_loss": [9.0, 8.0, 7.0, 6.5],
            "val_loss": [30.0, 20.0, 25.0, 20.0],
            "train_mae": [5.0, 4.0, 3.0, 3.0],
            "val_mae": [6.0, 4.5, 4.25, 4.0],
            "lr": [1e-3] * 4,
        }
    )
    history.to_csv(run / "history.csv", index=False)
    card = build_model_card(run)
    stages = {s["name"]: s for s in card["training"]["stages"]}
    # lowest val_loss 20.0 first at epoch 1 (val_mae 4.5; epoch 3 ties and is not kept), not the
    # lowest val_mae 4.0 at epoch 3
    assert (stages["stage1"]["best_epoch"], stages["stage1"]["best_val_mae"]) == (1, 4.5)
    assert stages["stage1"]["epochs_run"] == 4
    markdown = card_markdown(card)
    assert "4.5" in markdown and "(epoch 1)" in markdown

    from fairage.cli.train import _train_summary
    from fairage.fairness.metrics import EvaluationResult

    metrics = EvaluationResult.from_json(json.loads((run / "metrics_test.json").read_text()), "metrics_test.json")
    monkeypatch.setenv("COLUMNS", "200")
    _train_summary(run, metrics)
    text = capsys.readouterr().out
    assert "4 / 4.500 (epoch 1)" in text
