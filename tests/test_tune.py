"""fairage tune: a multi-objective Optuna study of run folders on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import invoke, tiny_synthetic
from lightning.pytorch.callbacks import Callback

from fairage.config.files import load_config
from fairage.config.presets import load_preset
from fairage.errors import ConfigError
from fairage.workflows.tune import SearchSpace, Tuner, open_study, pick_trial

SRC = Path(__file__).resolve().parents[1] / "src"
#: every trial: one all-layers epoch of the tiny resnet18, a 20-resample bootstrap, no permutations
BASE_SET = ["eval.n_boot=20", "eval.n_perm=0", "stage2.max_epochs=1"]
SPACE = {
    "stage2.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "stage2.weighting.scheme": ["none", "age", "age_ethnicity"],
    "model.head.dropout": {"low": 0.0, "high": 0.3},
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


class FailTrial(Callback):
    """Raises in the run folder named ``name`` (a trial that fails)."""

    def __init__(self, name: str):
        self.name = name

    def on_train_epoch_start(self, trainer, pl_module):
        if Path(trainer.default_root_dir).name == self.name:
            raise RuntimeError("planted failure")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("tune-data") / "data")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, data, tiny_run) -> Path:
    """A finished 5-trial study (NSGA-II, seeded), trial 2 failing on purpose; a reference run in its plot."""
    out = tmp_path_factory.mktemp("tune") / "out"
    base = load_preset("M1", "tiny", BASE_SET)
    tuner = Tuner(
        data,
        out,
        SearchSpace(SPACE, base),
        ["mae", "age_bias"],
        n_trials=5,
        callbacks=[FailTrial("trial-0002")],
        references=[tiny_run],
    )
    tuner.run()
    return out


def _dominated(a, b) -> bool:
    """b dominates a: no worse in both, better in one (minimising)."""
    return b[0] <= a[0] and b[1] <= a[1] and (b[0] < a[0] or b[1] < a[1])


def test_front_is_non_dominated_and_failed_trial_recorded(study_dir):
    trials = pd.read_csv(study_dir / "trials.csv")
    assert list(trials["number"]) == [0, 1, 2, 3, 4]
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "planted failure" in trials.loc[2, "error"]
    assert trials.loc[trials["state"] == "COMPLETE", "error"].isna().all()
    # parameters inside the space
    assert trials["stage2.lr"].between(1e-4, 1e-2).all()
    assert set(trials["stage2.weighting.scheme"]) <= {"none", "age", "age_ethnicity"}

    done = trials[trials["state"] == "COMPLETE"]
    points = {int(r.number): (r.val_mae, r.val_age_bias) for r in done.itertuples()}
    expected = {n for n, p in points.items() if not any(_dominated(p, q) for m, q in points.items() if m != n)}
    front = pd.read_csv(study_dir / "front.csv")
    assert set(front["number"]) == expected and expected
    for row in front.itertuples():
        run = Path(row.run_dir)
        assert run.name == f"trial-{row.number:04d}" and run.parent == study_dir / "trials"
        metrics = json.loads((run / "metrics_test.json").read_text())
        assert row.test_mae == pytest.approx(metrics["mae"])
        assert row.test_age_bias == pytest.approx(metrics["bias"]["age"])
        assert row.test_mae_ci_low <= row.test_mae <= row.test_mae_ci_high
        # each trial trained the parameters it reports
        cfg = load_config(run / "config.yaml")
        trial = trials.set_index("number").loc[row.number]
        assert cfg.stage2.lr == pytest.approx(trial["stage2.lr"])
        assert cfg.stage2.weighting.scheme == trial["stage2.weighting.scheme"]
        assert all(b.dropout == pytest.approx(trial["model.head.dropout"]) for b in cfg.model.head)
    assert (study_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pick_chooses_on_validation_and_writes_a_config(study_dir):
    trials = pd.read_csv(study_dir / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    limit = float(done["val_age_bias"].median())
    ok = done[done["val_age_bias"] <= limit]
    expected = int(ok.sort_values(["val_mae", "number"]).iloc[0]["number"])

    result = invoke("tune", "--out", study_dir, "--pick", f"age_bias<={limit!r}")
    assert result.exit_code == 0, result.output
    assert f"picked trial {expected} " in result.output
    picked = load_config(study_dir / "picked.yaml")
    run_cfg = load_config(study_dir / "trials" / f"trial-{expected:04d}" / "config.yaml")
    assert picked.model_dump(exclude={"name", "description"}) == run_cfg.model_dump(exclude={"name", "description"})

    # within 0 of the best MAE: the trial with the lowest validation MAE
    study = open_study(f"sqlite:///{study_dir / 'study.db'}", "fairage-tune")
    assert pick_trial(study, "mae<=+0", study_dir).number == int(done.loc[done["val_mae"].idxmin(), "number"])
    result = invoke("tune", "--out", study_dir, "--pick", "age_bias<=1e-9")
    assert result.exit_code == 2 and "no finished trial" in result.output
    result = invoke("tune", "--out", study_dir, "--pick", "gender_bias<=1")
    assert result.exit_code == 2 and "gender_bias" in result.output


@pytest.mark.parametrize(
    "space, key, words",
    [
        ({"stage2.lrr": [1e-3]}, "stage2.lrr", "unknown key"),
        ({"stage2.lr": {"low": 1e-2, "high": 1e-3}}, "stage2.lr", "empty range"),
        ({"stage2.lr": {"low": "small", "high": 1e-3}}, "stage2.lr", "must be a number"),
        ({"stage2.weighting.scheme": {"low": 0, "high": 1}}, "stage2.weighting.scheme", "not a number setting"),
        ({"stage2.weighting.scheme": ["none", "agee"]}, "stage2.weighting.scheme", "'agee' is not valid"),
        ({"stage2.lr": []}, "stage2.lr", "empty list"),
        ({"stage1.lr": [1e-3]}, "stage1.lr", "has no stage1"),
    ],
)
def test_bad_space_exits_2_naming_the_key(tmp_path, data, space, key, words):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    result = invoke("tune", "--data", data, "--space", path, "--out", out, "--scale", "tiny", "--trials", "1")
    assert result.exit_code == 2, result.output
    assert f"'{key}'" in result.output and words in result.output
    assert not out.exists()  # refused before any trial


def test_space_sets_every_head_block_or_one():
    base = load_preset("M5", "tiny")
    space = SearchSpace({"model.head.dropout": [0.2], "model.head.1.units": {"low": 8, "high": 16}}, base)
    assert space.dimensions[1].integer
    cfg = space.config({"model.head.dropout": 0.2, "model.head.1.units": 9}, "t")
    assert [b.dropout for b in cfg.model.head] == [0.2] * len(base.model.head)
    assert [b.units for b in cfg.model.head] == [b.units if i != 1 else 9 for i, b in enumerate(base.model.head)]
    with pytest.raises(ConfigError, match="'model.head.1.units' is an integer setting"):
        SearchSpace({"model.head.1.units": {"low": 8.5, "high": 16}}, base)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lightning.pytorch.callbacks import Callback
    from fairage.config.presets import load_preset
    from fairage.workflows.tune import SearchSpace, Tuner

    class KillInTrial1(Callback):
        # SIGKILL, as a machine that dies: no handler runs, trial 1 stays RUNNING in the storage
        def on_train_epoch_end(self, trainer, pl_module):
            if Path(trainer.default_root_dir).name == "trial-0001":
                os.kill(os.getpid(), signal.SIGKILL)

    data, out, space = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    base = load_preset("M1", "tiny", ["eval.n_boot=20", "eval.n_perm=0", "stage2.max_epochs=2"])
    Tuner(data, out, SearchSpace(space, base), ["mae", "age_bias"], n_trials=2, callbacks=[KillInTrial1()]).run()
""")


@pytest.mark.slow
def test_resume_after_kill_keeps_finished_trials(tmp_path, data):
    out = tmp_path / "out"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(data), str(out), repr(SPACE)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    storage = f"sqlite:///{out / 'study.db'}"
    before = open_study(storage, "fairage-tune").get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    first_metrics = out / "trials" / "trial-0000" / "metrics_test.json"
    stamp = first_metrics.stat().st_mtime_ns

    base = load_preset("M1", "tiny", ["eval.n_boot=20", "eval.n_perm=0", "stage2.max_epochs=2"])
    Tuner(data, out, SearchSpace(SPACE, base), ["mae", "age_bias"], n_trials=2).run()
    after = open_study(storage, "fairage-tune").get_trials()
    states = [t.state.name for t in after]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert after[0].values == before[0].values and first_metrics.stat().st_mtime_ns == stamp  # not retrained
    assert "ended" in after[1].user_attrs["interrupted"]
    retry = after[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == before[1].params
    assert Path(retry.user_attrs["run_dir"]).name == "trial-0001"  # the interrupted run folder, resumed
    history = pd.read_csv(out / "trials" / "trial-0001" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["state"]) == states and trials.loc[2, "retry_of"] == 1


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, data):
    out = tmp_path / "out"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    storage = f"journal://{tmp_path / 'shared' / 'tune.log'}"
    args = [
        "-m",
        "fairage.cli",
        "tune",
        "--data",
        str(data),
        "--space",
        str(space),
        "--out",
        str(out),
        "--trials",
        "4",
        "--storage",
        storage,
        "--study",
        "shared",
        "--scale",
        "tiny",
        # a trial whose tiny run saturates would be recorded as failed: this test counts finished ones
        *[a for s in [*BASE_SET, "stage2.stop_on_collapse=false"] for a in ("--set", s)],
    ]
    workers = [
        subprocess.Popen(
            [sys.executable, *args, "--seed", str(k)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (1, 2)
    ]
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    study = open_study(storage, "shared")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    failed = [t.user_attrs.get("error", "") for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert sorted(t.number for t in complete) == [0, 1, 2, 3], (failed, outputs[0][-2000:] + outputs[1][-2000:])
    assert {t.user_attrs["pid"] for t in complete} <= {w.pid for w in workers}
    run_dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(run_dirs)) == 4 and all((Path(r) / "metrics_test.json").is_file() for r in run_dirs)


@pytest.mark.parametrize("logger", ["tensorboard", "csv"])
def test_trainer_logger_writes_in_the_run_folder(tmp_path, data, logger):
    from fairage.training import train

    run = tmp_path / "run"
    train(
        load_preset("M1", "tiny", [*BASE_SET, "stage2.max_epochs=2", f"trainer.logger={logger}"]),
        data,
        run,
        progress=False,
    )
    history = pd.read_csv(run / "history.csv")
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        events = list((run / "logs").glob("version_0/events.out.tfevents.*"))
        assert len(events) == 1
        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        logged = [e.value for e in acc.Scalars("val_mae")]
    else:
        logged = pd.read_csv(run / "logs" / "version_0" / "metrics.csv")["val_mae"].dropna().tolist()
    assert logged == pytest.approx(history["val_mae"].tolist(), rel=1e-5)


def test_bad_options_exit_2(tmp_path, data):
    result = invoke("tune", "--data", data, "--out", tmp_path / "a", "--scale", "tiny", "--objectives", "mae,age_bais")
    assert result.exit_code == 2 and "unknown objective 'age_bais'" in result.output
    result = invoke("tune", "--data", data, "--out", tmp_path / "b", "--scale", "tiny", "--storage", "nosuch://x")
    assert result.exit_code == 2 and "--storage nosuch://x" in result.output
    result = invoke("tune", "--out", tmp_path / "c", "--pick", "mae<=+0.3")
    assert result.exit_code == 2 and "holds no study" in result.output


def test_mlflow_logger_groups_the_trials_under_their_study(tmp_path, data):
    """trainer.logger: mlflow through Lightning's MLFlowLogger: a tune's trials in one store, one
    experiment named after the study, each stage's epoch metrics as its history.csv holds them."""
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "out"
    base = load_preset(
        "M1", "tiny", [*BASE_SET, "stage2.max_epochs=2", "stage2.stop_on_collapse=false", "trainer.logger=mlflow"]
    )
    Tuner(data, out, SearchSpace(SPACE, base), ["mae", "age_bias"], n_trials=2, study_name="gap-study").run()
    assert (out / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gap-study")
    assert experiment.artifact_location == (out / "mlartifacts").as_uri()
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: int(r.data.tags["fairage.trial"]))
    trials = pd.read_csv(out / "trials.csv")
    assert [r.data.tags["fairage.trial"] for r in runs] == ["0", "1"]
    for run, trial in zip(runs, trials.to_dict("records")):
        assert run.info.run_name == f"trial-{trial['number']:04d}/stage2"
        assert run.info.status == "FINISHED"
        assert run.data.tags["fairage.study"] == "gap-study" and run.data.tags["fairage.stage"] == "stage2"
        assert float(run.data.params["stage2.lr"]) == pytest.approx(trial["stage2.lr"])  # the trial's parameters
        history = pd.read_csv(out / "trials" / f"trial-{trial['number']:04d}" / "history.csv")
        logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_mae"), key=lambda m: m.step)]
        assert logged == pytest.approx(history["val_mae"].tolist(), rel=1e-5)
        assert len(logged) == 2
    # nothing of MLflow's in the working directory or the run folders
    assert not (out / "trials" / "trial-0000" / "logs").exists()


def test_mlflow_logger_default_store_is_in_the_run_folder(tmp_path, data, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from fairage.training import train

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(
        load_preset("M2", "tiny", [*BASE_SET, "stage1.max_epochs=1", "stage2.max_epochs=2", "trainer.logger=mlflow"]),
        data,
        run,
        progress=False,
    )
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fairage")
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert [r.info.run_name for r in runs] == ["M2/stage1", "M2/stage2"]  # one MLflow run per stage
    history = pd.read_csv(run / "history.csv")
    for r in runs:
        stage = r.data.tags["fairage.stage"]
        logged = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val_mae"), key=lambda m: m.step)]
        assert logged == pytest.approx(history.loc[history["stage"] == stage, "val_mae"].tolist(), rel=1e-5)
    assert not (tmp_path / "mlruns").exists()


def test_mlflow_missing_is_one_message_before_any_folder(tmp_path, data, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    out = tmp_path / "run"
    result = invoke(
        "train", "--preset", "M1", "--scale", "tiny", "--data", data, "--out", out, "--set", "trainer.logger=mlflow"
    )
    assert result.exit_code == 2, result.output
    assert "trainer.logger 'mlflow'" in result.output and "pip install 'fairage[mlflow]'" in result.output
    assert not out.exists()
    result = invoke(
        "tune",
        "--data",
        data,
        "--out",
        tmp_path / "tune",
        "--scale",
        "tiny",
        "--trials",
        "1",
        "--tracking-uri",
        "http://127.0.0.1:5000",
    )
    assert result.exit_code == 2 and "pip install 'fairage[mlflow]'" in result.output
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "uri, words",
    [
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("http://", "no host"),
        ("mlruns", "is not a URL"),
        ("sqlite://", "a SQLite URI is"),
        ("http://host:5000/a b", "spaces"),
    ],
)
def test_bad_tracking_uri_exits_2_naming_the_key(tmp_path, data, uri, words):
    out = tmp_path / "run"
    result = invoke("train", "--preset", "M1", "--scale", "tiny", "--data", data, "--out", out, "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    assert "trainer.tracking_uri" in result.output and words in result.output
    assert not out.exists()


def test_tracking_uri_sets_the_mlflow_logger_and_is_made_absolute(tmp_path, data, monkeypatch):
    from fairage.config.schema import normalize_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert normalize_tracking_uri("sqlite:///store/m.db") == f"sqlite:///{tmp_path.resolve() / 'store' / 'm.db'}"
    assert normalize_tracking_uri("file:mlruns") == (tmp_path.resolve() / "mlruns").as_uri()
    assert normalize_tracking_uri("postgresql+psycopg2://u@db/x") == "postgresql+psycopg2://u@db/x"
    cfg = load_preset("M1", "tiny", ["trainer.logger=mlflow", "trainer.tracking_uri=http://127.0.0.1:5000"])
    assert cfg.trainer.tracking_uri == "http://127.0.0.1:5000"
    # a tracking setting without the mlflow logger is refused, naming the keys
    with pytest.raises(ConfigError, match="tracking_uri only apply to trainer.logger: mlflow"):
        load_preset("M1", "tiny", ["trainer.tracking_uri=http://127.0.0.1:5000"])
    result = invoke(
        "train",
        "--preset",
        "M1",
        "--scale",
        "tiny",
        "--data",
        data,
        "--out",
        tmp_path / "r",
        "--tracking-uri",
        "http://127.0.0.1:5000",
        "--set",
        "trainer.logger=csv",
    )
    assert result.exit_code == 2 and "trainer.logger is 'csv'" in result.output
    # a pick retrains outside the trial: the trial's tags are dropped, the study's experiment kept
    from fairage.workflows.tune import Tuner as _Tuner

    tuner = _Tuner(
        data,
        tmp_path / "t",
        SearchSpace(SPACE, load_preset("M1", "tiny", ["trainer.logger=mlflow"])),
        ["mae", "age_bias"],
        n_trials=0,
        study_name="s1",
    )
    cfg = tuner.tracked(load_preset("M1", "tiny", ["trainer.logger=mlflow"]), tmp_path / "t" / "trials" / "trial-0012")
    assert cfg.trainer.tracking_tags == {"fairage.study": "s1", "fairage.trial": "12"}
    assert cfg.trainer.experiment_name == "s1"
    assert cfg.trainer.tracking_uri == f"sqlite:///{(tmp_path / 't').resolve() / 'mlflow.db'}"
