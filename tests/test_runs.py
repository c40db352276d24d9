"""The run folder object: record, absolute paths, lock, stale temp files, corrupt files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import invoke, tiny_config_file

from fairage.config.presets import load_preset
from fairage.errors import DataError
from fairage.store.run_folder import (
    HISTORY_COLUMNS,
    RunFolder,
    RunInUseError,
    absolute_paths,
)


@pytest.fixture
def cfg():
    return load_preset("M5", "tiny")


def test_create_open_update_and_warnings(tmp_path, cfg):
    data = tmp_path / "data"
    data.mkdir()
    folder = RunFolder.create(tmp_path / "run", cfg, data, weights_loaded=False, precision="32-true")
    assert folder.record.stage == "stage1" and folder.record.status == "running"
    folder.update(
        completed_stages=["stage1"],
        stopped_stages={"stage1": "stage1: val_loss became nan"},
        warnings=["the model collapsed"],
    )
    again = RunFolder.open(tmp_path / "run")
    assert again.record == folder.record
    assert again.data_dir == data.resolve()
    assert again.warnings() == ["stage1: val_loss became nan", "the model collapsed"]  # stops first
    assert again.config() == cfg
    assert again.matches(cfg, data) and not again.matches(cfg, tmp_path)
    assert not again.matches(cfg.model_copy(update={"seed": 3}), data)
    assert not again.is_finished() and again.metrics() is None
    assert list(again.history().columns) == HISTORY_COLUMNS
    assert again.checkpoint("stage2", "last") == tmp_path / "run" / "checkpoints" / "stage2-last.ckpt"
    with pytest.raises(DataError, match="best checkpoint of stage1 is missing"):
        again.best_checkpoint()
    # the record of an older fairage ("stopped") still reads
    raw = json.loads((tmp_path / "run" / "run.json").read_text())
    raw["stopped"] = raw.pop("stopped_stages")
    (tmp_path / "run" / "run.json").write_text(json.dumps(raw))
    assert RunFolder.open(tmp_path / "run").record.stopped_stages == {"stage1": "stage1: val_loss became nan"}


def test_config_yaml_stores_absolute_paths(tmp_path, cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = cfg.model_copy(deep=True)
    relative.model.weights = "w/r18.pth"
    relative.data.cache_dir = "cache"
    fixed = absolute_paths(relative)
    assert fixed.model.weights == tmp_path / "w" / "r18.pth"
    assert fixed.data.cache_dir == tmp_path / "cache"
    folder = RunFolder.create(tmp_path / "run", relative, tmp_path)
    monkeypatch.chdir("/")
    stored = folder.config()
    assert stored.model.weights == tmp_path / "w" / "r18.pth" and stored.data.cache_dir == tmp_path / "cache"
    assert folder.matches(relative.model_copy(update={"model": fixed.model, "data": fixed.data}), tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "run.json is not valid JSON"),
        (b"\xff\xfe\x00binary", "run.json is not valid JSON"),
        (b"[1, 2]", "run.json does not hold a JSON object"),
        (b'{"status": "exploded", "data_dir": "/d"}', "run.json: 'status'"),
    ],
)
def test_a_corrupt_run_json_names_the_file(tmp_path, cfg, content, message):
    RunFolder.create(tmp_path / "run", cfg, tmp_path)
    (tmp_path / "run" / "run.json").write_bytes(content)
    with pytest.raises(DataError, match=message):
        RunFolder.open(tmp_path / "run")


def test_a_binary_history_names_the_file(tmp_path, cfg):
    folder = RunFolder.create(tmp_path / "run", cfg, tmp_path)
    (tmp_path / "run" / "history.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="history.csv"):
        folder.history()


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    import torch

    from fairage.store.checkpoint import read_checkpoint

    path = tmp_path / "stage2-last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 3}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="stage2-last.ckpt is corrupt or truncated"):
        read_checkpoint(path)


def test_the_lock_is_exclusive_and_dies_with_its_process(tmp_path, cfg):
    folder = RunFolder.create(tmp_path / "run", cfg, tmp_path)
    with folder.lock():
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
        # flock locks belong to an open file description: a second open in this process conflicts too
        with (
            pytest.raises(RunInUseError, match=f"run folder {tmp_path / 'run'} is in use by PID {os.getpid()}"),
            RunFolder(tmp_path / "run").lock(),
        ):
            pass
    with folder.lock():  # released on exit
        pass
    # a lock file left by a process that died (here: one that exited without unlocking) does not block
    code = (
        f"import fcntl, os; fd = os.open({str(tmp_path / 'run' / '.lock')!r}, os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'999999\\n', 0); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "run" / ".lock").read_text().strip() == "999999"
    with folder.lock():
        pass


def test_taking_the_lock_removes_stale_temp_files(tmp_path, cfg):
    folder = RunFolder.create(tmp_path / "run", cfg, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir()
    stale = [ckpts / ".stage2-last.ckpt.abc123.tmp.ckpt", tmp_path / "run" / ".run.json.x1.tmp.json"]
    for p in stale:
        p.write_bytes(b"half a file")
    kept = ckpts / "stage2-best.ckpt"
    kept.write_bytes(b"a checkpoint")
    with folder.lock():
        assert not any(p.exists() for p in stale)
    assert kept.is_file()


def test_a_second_train_on_a_locked_folder_exits_2(tmp_path, tiny_data):
    run = tmp_path / "run"
    with RunFolder(run).lock():
        res = invoke("train", "--config", tiny_config_file(tmp_path), "--data", tiny_data, "--out", run, "--quiet")
    assert res.exit_code == 2
    assert res.output.strip() == f"error: run folder {run} is in use by PID {os.getpid()}"
    assert not (run / "run.json").exists()


def test_resume_of_corrupt_run_files_exits_2_naming_the_file(tmp_path, cfg):
    run = tmp_path / "run"
    RunFolder.create(run, cfg, tmp_path)
    (run / "run.json").write_text("{broken")
    res = invoke("train", "--resume", run, "--quiet")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{run / 'run.json'} is not valid JSON" in res.output and len(res.output.strip().splitlines()) == 1

    res = invoke("export-backbone", run, "--out", tmp_path / "b.pth")
    assert res.exit_code == 2 and f"{run / 'run.json'}" in res.output


def test_a_full_disk_exits_1_with_one_line(tmp_path, tiny_data, monkeypatch):
    import errno

    import fairage.atomic

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the rename that ends every atomic write fails as on a full disk
    monkeypatch.setattr(fairage.atomic.os, "replace", no_space)
    plot = tmp_path / "w.png"
    res = invoke("weights", "--data", tiny_data, "--plot", plot, "--json")
    assert res.exit_code == 1
    assert res.output.strip() == f"error: {plot}: no space left on device; free some space and run the command again"
    assert not plot.exists() and not list(tmp_path.glob(".w.png.*"))
