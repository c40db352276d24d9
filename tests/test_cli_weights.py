"""`fairage weights`: table, JSON and warnings on a small dataset written by the test."""

import json

import pytest
from typer.testing import CliRunner

from fairage.cli import app
from fairage.data import load_faces, write_synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights") / "synth"
    write_synthetic(root, n_train=200, n_valid=10, n_test=10, size=16, seed=1, workers=1)
    return root


def test_json_matches_report_formula(dataset):
    result = runner.invoke(app, ["weights", "--data", str(dataset), "--scheme", "age", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["scheme"] == "age" and out["formula"] == "inverse"
    train = load_faces(dataset).query("split == 'train'")
    bins = [(0, 20), (20, 40), (40, 60), (60, 1e9)]
    counts = [int(((train.age >= lo) & (train.age < hi)).sum()) for lo, hi in bins]
    k = sum(c > 0 for c in counts)
    n = len(train)
    for group, c in zip(out["groups"], counts):
        assert group["n"] == c
        if c:
            assert group["weight"] == pytest.approx(n / (k * c))
    assert sum(g["share"] for g in out["groups"]) == pytest.approx(1.0)


def test_table_and_dominance_warning(dataset):
    result = runner.invoke(app, ["weights", "--data", str(dataset), "--scheme", "age_ethnicity"])
    assert result.exit_code == 0, result.output
    assert "[60,inf)" in result.stdout and "share of weight" in result.stdout
    # 200 faces and 10 groups: any group under 5 faces has faces above 1% of the weight
    assert "more than 1% of all weight" in result.output


def test_bad_scheme_exits_2(dataset):
    result = runner.invoke(app, ["weights", "--data", str(dataset), "--scheme", "agee"])
    assert result.exit_code == 2
    assert "scheme" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["weights", "--data", str(dataset), "--scheme", "custom", "--attributes", "makeupx"])
    assert result.exit_code == 2 and "makeupx" in result.output


def test_formula_lds_shorthand_and_plot(dataset, tmp_path):
    png = tmp_path / "weights.png"
    result = runner.invoke(app, ["weights", "--data", str(dataset), "--formula", "lds", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["formula"] == "lds" and out["lds"] is True and out["scheme"] == "none"
    # LDS alone is shown by the report's four age bins; group means average to 1 per face
    assert [g["name"] for g in out["groups"]] == ["[0,20)", "[20,40)", "[40,60)", "[60,inf)"]
    n = sum(g["n"] for g in out["groups"])
    assert sum(g["n"] * (g["weight"] or 0) for g in out["groups"]) / n == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
