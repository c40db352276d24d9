"""Abuse cases: what a hostile but realistic user tries against the CLI, and what must hold.

Each case runs the real command on small files made here. Security cases place real files
outside the dataset folder and check, through spies on the functions that open or stat
files, that fairage never touches them, and that the message is the same whether or not
the outside file exists (so it cannot be used to probe the machine).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
import yaml
from PIL import Image
from test_data_loaders import (
    CSV_ROWS,
    write_appa,
    write_csv_dataset,
    write_image,
    write_npy,
    write_utk,
)
from typer.testing import CliRunner

from fairage.cli import app
from fairage.config.presets import load_preset
from fairage.config.schema import DataConfig
from fairage.data import load_faces, load_images, write_synthetic
from fairage.data.loaders import resolve_inside
from fairage.errors import DataError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- spies


class FileSpy:
    """Records every path given to open / Image.open / np.load / stat-like calls."""

    def __init__(self, monkeypatch, with_lstat: bool = True):
        self.paths: list[str] = []
        wrap = self._wrap
        monkeypatch.setattr(builtins, "open", wrap(builtins.open))
        monkeypatch.setattr(io, "open", wrap(io.open))
        monkeypatch.setattr(Image, "open", wrap(Image.open))
        monkeypatch.setattr(np, "load", wrap(np.load))
        monkeypatch.setattr(os, "stat", wrap(os.stat))
        monkeypatch.setattr(os.path, "isfile", wrap(os.path.isfile))
        monkeypatch.setattr(os.path, "exists", wrap(os.path.exists))
        if with_lstat:
            monkeypatch.setattr(os, "lstat", wrap(os.lstat))

    def _wrap(self, fn):
        def spy(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)):
                self.paths.append(os.path.abspath(os.fspath(path)))
            return fn(path, *args, **kwargs)

        return spy

    def touched(self, folder: Path) -> list[str]:
        folder = os.path.realpath(folder)
        return [
            p for p in self.paths if os.path.realpath(p).startswith(folder + os.sep) or p.startswith(folder + os.sep)
        ]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder next to the dataset holding real image files (x.png, x.jpg_face.jpg)."""
    folder = tmp_path / "outside"
    write_image(folder / "x.png", fmt="PNG")
    write_image(folder / "x.jpg_face.jpg")
    (folder / "secret.txt").write_text("root:x:0:0\n")
    return folder


def info_error(root, *extra) -> str:
    res = invoke("data", "info", root, *extra)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return one_line(res.stderr)


# --------------------------------------------------------------------------- 1. reads outside the dataset


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_csv_image_outside_the_folder_is_refused_unopened(tmp_path, monkeypatch, outside, kind):
    messages = {}
    for target in ("x.png", "missing.png"):  # an outside file that exists, one that does not
        root = write_csv_dataset(tmp_path / f"csv-{target}", CSV_ROWS)
        name = f"../outside/{target}" if kind == "dotdot" else str(outside / target)
        table = pd.read_csv(root / "faces.csv")
        table.loc[1, "image"] = name
        table.to_csv(root / "faces.csv", index=False)
        with monkeypatch.context() as m:
            spy = FileSpy(m)
            message = info_error(root)
        assert spy.touched(outside) == []
        assert f"row 3: image {name!r} is not a path inside the dataset folder" in message
        messages[target] = message.replace(target, "NAME").replace(str(root), "ROOT")
    assert messages["x.png"] == messages["missing.png"]
    if kind == "absolute":
        assert "--allow-absolute-paths" in messages["x.png"] and "data.allow_absolute_paths" in messages["x.png"]


def test_appa_file_name_outside_the_folder_is_refused_unopened(tmp_path, monkeypatch, outside):
    messages = []
    for name in ("../../outside/x.jpg", "../../outside/missing.jpg", "../../../../../../etc/passwd", "/etc/passwd"):
        root = write_appa(tmp_path / f"appa{len(messages)}")
        gt = pd.read_csv(root / "gt_avg_test.csv")
        gt.loc[1, "file_name"] = name
        gt.to_csv(root / "gt_avg_test.csv", index=False)
        for extra in ((), ("--full-images",)):
            with monkeypatch.context() as m:
                spy = FileSpy(m)
                message = info_error(root, *extra)
            assert spy.touched(outside) == [] and spy.touched(Path("/etc")) == []
            assert f"gt_avg_test.csv: row 3: file_name {name!r} is not a path inside the dataset folder" in message
        messages.append(message.replace(name, "NAME").replace(str(root), "ROOT"))
    assert len(set(messages)) == 1


def _refused_unopened_and_alike(monkeypatch, roots: list[Path], outside: Path, expected: str) -> None:
    """``data info`` refuses every root with ``expected`` in its message, never opens anything in
    ``outside`` (resolving a symlink reads the link, never its target), and says the same for a
    link to an existing file (first root) as for one to a missing file (second root)."""
    messages = []
    for root in roots:
        with monkeypatch.context() as m:
            spy = FileSpy(m, with_lstat=False)
            message = info_error(root)
        assert spy.touched(outside) == []
        assert expected in message
        messages.append(message.replace(str(root), "ROOT"))
    assert messages[0] == messages[1]


def test_symlinks_leading_out_are_refused_whether_or_not_the_target_exists(tmp_path, monkeypatch, outside):
    # csv layout: an image that is a symlink to a file outside
    roots = []
    for target in ("x.png", "missing.png"):
        root = write_csv_dataset(tmp_path / f"csv-{target}", CSV_ROWS)
        (root / "a" / "2.png").unlink()
        (root / "a" / "2.png").symlink_to(outside / target)
        roots.append(root)
    _refused_unopened_and_alike(
        monkeypatch, roots, outside, "row 3: image 'a/2.png' is not a path inside the dataset folder"
    )

    # utkface: a face file that is a symlink leading out
    roots = []
    for target in ("x.png", "missing.png"):
        root = write_utk(tmp_path / f"utk-{target}", ["26_0_0_20170116.jpg", "30_1_1_20170116.jpg"])
        (root / "40_1_2_20170116.jpg").symlink_to(outside / target)
        roots.append(root)
    _refused_unopened_and_alike(monkeypatch, roots, outside, "40_1_2_20170116.jpg: resolves outside the dataset folder")

    # npy layout: the image array is a symlink leading out
    real = tmp_path / "outside-npy"
    write_npy(real)
    roots = []
    for target in ("data_train.npy", "missing.npy"):
        root = tmp_path / f"npy-{target}"
        write_npy(root)
        (root / "data_train.npy").unlink()
        (root / "data_train.npy").symlink_to(real / target)
        roots.append(root)
    _refused_unopened_and_alike(monkeypatch, roots, real, "data_train.npy: resolves outside the dataset folder")


def test_symlinks_inside_the_folder_and_opted_in_absolute_paths_work(tmp_path, outside):
    root = write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    (root / "a" / "2.png").rename(root / "store.png")
    (root / "a" / "2.png").symlink_to(root / "store.png")  # a link that stays inside
    faces = load_faces(root)
    assert faces.set_index("image").loc["a/2.png", "path"] == str((root / "store.png").resolve())

    table = pd.read_csv(root / "faces.csv")
    table.loc[1, "image"] = str(outside / "x.png")
    table.to_csv(root / "faces.csv", index=False)
    res = invoke("data", "info", root, "--json", "--allow-absolute-paths")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["splits"]["test"]["n"] == 1
    # the opt-in covers absolute paths only: '..' still stays inside
    table.loc[1, "image"] = "../outside/x.png"
    table.to_csv(root / "faces.csv", index=False)
    assert "is not a path inside" in info_error(root, "--allow-absolute-paths")
    assert DataConfig(allow_absolute_paths=True).loader_options()["allow_absolute_paths"] is True


def test_resolve_inside_is_decided_on_the_name(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    assert resolve_inside(root, "a/b.jpg") == str(root.resolve() / "a" / "b.jpg")
    assert resolve_inside(root, "a/../b.jpg") == str(root.resolve() / "b.jpg")
    for name in ("../x", "/etc/passwd", "a/../../x", "", "a\0b"):
        assert resolve_inside(root, name) is None


# --------------------------------------------------------------------------- 2. presets


def test_preset_name_is_never_a_path(tmp_path, monkeypatch):
    data = write_appa(tmp_path / "appa")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evil.yaml").write_text(yaml.safe_dump(load_preset("M5", "tiny").model_dump(mode="json")))
    from fairage.config.presets import _preset_dir

    relative = os.path.relpath(elsewhere / "evil", str(_preset_dir()))
    for name in (relative, str(elsewhere / "evil")):
        with monkeypatch.context() as m:
            spy = FileSpy(m, with_lstat=False)
            res = invoke("train", "--preset", name, "--scale", "tiny", "--data", data, "--out", tmp_path / "run")
        assert res.exit_code == 2, res.output
        assert "unknown preset" in one_line(res.stderr) and "available: M1" in one_line(res.stderr)
        assert spy.touched(elsewhere) == []
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- training fixtures


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(
        tmp_path_factory.mktemp("abuse") / "data", n_train=32, n_valid=16, n_test=16, size=32, seed=0, workers=1
    )


#: a quick single-stage run: tiny scale, stage II only, 2 epochs, 20 bootstrap resamples
QUICK = ("--preset", "M1", "--scale", "tiny", "--quiet", "--set", "eval.n_boot=20")


# --------------------------------------------------------------------------- 6. SIGTERM


def _sigterm_after_first_epoch(monkeypatch):
    """Send this process SIGTERM once Lightning has finished the first epoch of a fit."""
    from lightning.pytorch.loops.fit_loop import _FitLoop

    original = _FitLoop.on_advance_end

    def on_advance_end(self, *args, **kwargs):
        original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(_FitLoop, "on_advance_end", on_advance_end)


def test_sigterm_during_train_exits_143_with_the_resume_hint(synthetic, tmp_path, monkeypatch):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _sigterm_after_first_epoch(m)
        res = invoke("train", *QUICK, "--data", synthetic, "--out", run)
    assert res.exit_code == 143, res.output
    assert one_line(res.stderr).count(f"continue with `fairage train --resume {run}`") == 1
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "metrics_test.json").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    res = invoke("train", "--resume", run, "--quiet")
    assert res.exit_code == 0, res.output
    assert (run / "metrics_test.json").is_file()


def test_sigterm_before_the_run_folder_exists(synthetic, tmp_path, monkeypatch):
    import fairage.data

    original = fairage.data.load_faces

    def load_then_sigterm(*args, **kwargs):
        faces = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return faces

    monkeypatch.setattr(fairage.data, "load_faces", load_then_sigterm)
    res = invoke("train", *QUICK, "--data", synthetic, "--out", tmp_path / "run")
    assert res.exit_code == 143, res.output
    assert "the run folder was not written yet" in one_line(res.stderr)
    assert not (tmp_path / "run" / "run.json").exists()


def test_sigterm_during_suite_exits_143(synthetic, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _sigterm_after_first_epoch(m)
        res = invoke(
            "suite",
            "--data",
            synthetic,
            "--out",
            tmp_path / "suite",
            "--presets",
            "M1",
            "--scale",
            "tiny",
            "--quiet",
            "--set",
            "eval.n_boot=20",
        )
    assert res.exit_code == 143, res.output
    assert "run the same `fairage suite` command again" in one_line(res.stderr)
    assert not (tmp_path / "suite" / "report.html").exists()


# --------------------------------------------------------------------------- 7. image cache


def test_truncated_or_foreign_cache_file_is_rebuilt(tmp_path):
    root = write_appa(tmp_path / "appa")
    faces = load_faces(root)
    first = np.array(load_images(faces, 16, workers=1, progress=False))
    (cached,) = (root / ".fairage_cache").glob("*.npy")
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:20], lambda b: b"\x00" * len(b), lambda b: b[:-1]):
        cached.write_bytes(damage(cached.read_bytes()) if cached.stat().st_size else b"")
        again = load_images(faces, 16, workers=1, progress=False)
        np.testing.assert_array_equal(again, first)
    # another array of the right size under the same name (a shape mismatch) is rebuilt too
    np.save(cached, np.zeros((len(faces), 8, 8, 3), np.uint8))
    np.testing.assert_array_equal(load_images(faces, 16, workers=1, progress=False), first)


def test_unwritable_cache_names_data_cache_dir(tmp_path, monkeypatch):
    root = write_appa(tmp_path / "appa")
    faces = load_faces(root)

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".tmp-file-name"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(DataError, match=r"\.fairage_cache: cannot write the decoded-image cache.*data\.cache_dir"):
        load_images(faces, 16, workers=1, progress=False)


# --------------------------------------------------------------------------- 10. Lightning settings


@pytest.mark.parametrize(
    "args, key",
    [
        (("--set", "trainer.precision=bogus"), "trainer.precision 'bogus'"),
        (("--accelerator", "tpuu"), "trainer.accelerator 'tpuu' is not known (did you mean 'tpu'?)"),
        (("--strategy", "foo"), "trainer.strategy 'foo' is not known"),
        (("--devices", "abc"), "trainer.devices 'abc'"),
        (("--devices", "0"), "trainer.devices 0"),
        pytest.param(
            ("--accelerator", "gpu"),
            "no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_lightning_typos_exit_2_before_a_run_folder_exists(tmp_path, args, key):
    data = write_appa(tmp_path / "appa")
    res = invoke("train", *QUICK, "--data", data, "--out", tmp_path / "run", *args)
    assert res.exit_code == 2, res.output
    assert key in one_line(res.stderr) and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
    res = invoke(
        "suite",
        "--data",
        data,
        "--out",
        tmp_path / "suite",
        "--presets",
        "M1",
        "--scale",
        "tiny",
        "--set",
        args[1] if args[0] == "--set" else f"trainer.{args[0][2:]}={args[1]}",
    )
    assert res.exit_code == 2 and key in one_line(res.stderr)
    assert not (tmp_path / "suite").exists()


# --------------------------------------------------------------------------- 11. duplicates


def test_duplicate_faces_are_refused_naming_the_rows(tmp_path):
    root = write_appa(tmp_path / "appa")
    gt = pd.read_csv(root / "gt_avg_train.csv")
    pd.concat([gt, gt.iloc[[0]]]).to_csv(root / "gt_avg_train.csv", index=False)
    assert "gt_avg_train.csv: rows 2, 5: file_name '000000.jpg' is listed 2 times" in info_error(root)

    root = write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    table = pd.read_csv(root / "faces.csv")
    extra = table.iloc[[0]].assign(image="./a//1.png", age=50)  # the same file, spelt differently
    pd.concat([table, extra]).to_csv(root / "faces.csv", index=False)
    message = info_error(root)
    assert "faces.csv: rows 2, 6 name the same image" in message and "'a/1.png'" in message


# --------------------------------------------------------------------------- 12, 13. data options everywhere


def shown_warnings(res, caplog, text: str) -> int:
    """How often ``text`` reached the user: printed by the CLI, or logged (stderr outside pytest)."""
    return one_line(res.stderr).count(text) + sum(text in r.getMessage() for r in caplog.records)


def test_utkface_with_race_codes_3_and_4_trains_with_the_mapping(tmp_path, caplog):
    # ten faces per race code, all in one age bin: every stratum reaches the test split
    names = [f"{20 + k}_{k % 2}_{race}_2017{k:02d}{race}.jpg" for race in (0, 1, 3, 4) for k in range(10)]
    root = write_utk(tmp_path / "utk", names)
    (root / "30_0_0_20179999.jpg").write_bytes(b"not a jpeg")
    # race codes 3 and 4 load by default (groups come from the data); a strict vocabulary names the option
    res = invoke("train", *QUICK, "--data", root, "--out", tmp_path / "r0", "--extra-categories", "error")
    assert res.exit_code == 2
    message = one_line(res.stderr)
    assert "--extra-categories (config data.extra_categories)" in message and "indian=asian" in message
    assert not (tmp_path / "r0").exists()
    res = invoke("train", *QUICK, "--data", root, "--out", tmp_path / "r0")
    assert res.exit_code == 2 and "--skip-bad (config data.skip_bad: true)" in one_line(res.stderr)
    assert not (tmp_path / "r0").exists()
    # every option a message names exists: on each command that reads a dataset, and in the config
    group = typer.main.get_command(app)
    for command in (("data", "info"), ("train",), ("suite",), ("evaluate",), ("compare",), ("submit",), ("weights",)):
        cmd = group
        for name in command:
            cmd = cmd.commands[name]
        options = {opt for param in cmd.params for opt in param.opts}
        assert {"--extra-categories", "--skip-bad", "--allow-absolute-paths"} <= options, command
    assert {"extra_categories", "skip_bad", "allow_absolute_paths"} <= set(DataConfig.model_fields)

    res = invoke(
        "train", *QUICK, "--data", root, "--out", tmp_path / "r1", "--extra-categories", "indian=asian,others=unknown"
    )
    assert res.exit_code == 2 and "--skip-bad (config data.skip_bad: true)" in one_line(res.stderr)
    run = tmp_path / "r2"
    res = invoke(
        "train",
        *QUICK,
        "--data",
        root,
        "--out",
        run,
        "--extra-categories",
        "indian=asian,others=unknown",
        "--skip-bad",
        "--set",
        "stage2.max_epochs=1",
    )
    assert res.exit_code == 0, res.output
    assert shown_warnings(res, caplog, "skipped 1 bad image(s)") == 1
    resolved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert resolved["extra_categories"] == {"indian": "asian", "others": "unknown"} and resolved["skip_bad"] is True
    # evaluating the run uses its data options: same faces, same mapping
    res = invoke("evaluate", run, "--json", "--n-boot", 0)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    test = load_faces(root, extra_categories={"indian": "asian", "others": "unknown"}, skip_bad=True)
    test = test[test["split"] == "test"]
    assert result["n"] == len(test)
    # race code 3 (indian) counted as asian; 4 (others) unknown, which the scores leave out
    expected = test["ethnicity"].value_counts().drop("unknown").to_dict()
    assert {g: v["n"] for g, v in result["groups"]["ethnicity"].items()} == expected
    assert expected["asian"] == (test["image"].str.split("_").str[2] == "3").sum() > 0
    # a dataset folder named directly takes the same options
    res = invoke(
        "evaluate",
        "--data",
        root,
        "--predictions",
        run / "predictions_test.csv",
        "--json",
        "--n-boot",
        0,
        "--skip-bad",
        "--extra-categories",
        "indian=asian,others=unknown",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mae"] == pytest.approx(result["mae"])


# a mapping may rename a value to any new one ("indian=martian" merges or renames groups), so it is not here
@pytest.mark.parametrize("value", ["indian=asian,others", "bogus", "=asian", "a=b=c"])
def test_extra_categories_syntax_errors(tmp_path, value):
    root = write_utk(tmp_path / "utk", ["30_0_0_2017.jpg", "40_1_1_2017.jpg"])
    message = info_error(root, "--extra-categories", value)
    assert f"extra categories {value!r}" in message and "Traceback" not in message
    res = invoke("train", *QUICK, "--data", root, "--out", tmp_path / "run", "--extra-categories", value)
    assert res.exit_code == 2 and f"extra categories {value!r}" in one_line(res.stderr)
    res = invoke("train", *QUICK, "--data", root, "--out", tmp_path / "run", "--set", f"data.extra_categories={value}")
    assert res.exit_code == 2 and "data.extra_categories" in one_line(res.stderr)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 14. config files


@pytest.mark.parametrize(
    "content",
    [
        b"- a\n- b\n",
        b"42\n",
        b"just text\n",
        b"\xff\xfe\x00binary\x00\x01",
        "stage2: {lr: 1e-3}  # caf\xe9\n".encode("latin-1"),
    ],
)
@pytest.mark.parametrize("with_set", [False, True])
def test_config_that_is_not_a_mapping_or_not_text(tmp_path, content, with_set):
    data = write_appa(tmp_path / "appa")
    config = tmp_path / "cfg.yaml"
    config.write_bytes(content)
    extra = ("--set", "stage2.lr=1e-4") if with_set else ()
    res = invoke("train", "--config", config, "--data", data, "--out", tmp_path / "run", *extra)
    assert res.exit_code == 2, res.output
    assert f"config file {config}" in one_line(res.stderr)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 15. implausible predictions


def _predictions(tmp_path, faces, values) -> Path:
    path = tmp_path / "preds.csv"
    pd.DataFrame({"image": faces["image"], "prediction": values}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("bad", [-500.0, 1e300, 150.5])
def test_predictions_outside_0_150_years_are_refused_or_clipped(tmp_path, bad):
    root = write_appa(tmp_path / "appa")
    test = load_faces(root).query("split == 'test'")
    preds = _predictions(tmp_path, test, [bad, 30.0])
    good = tmp_path / "good.csv"
    pd.DataFrame({"image": test["image"], "prediction": [20.0, 30.0]}).to_csv(good, index=False)
    for args in (
        ("evaluate", "--data", root, "--predictions", preds),
        ("compare", good, preds, "--data", root),
        ("submit", preds, "--data", root, "--out", tmp_path / "sub.zip"),
    ):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert f"row 2 (image 000000.jpg): prediction {bad:g} years is outside 0 to 150" in one_line(res.stderr)
        assert "--clip" in one_line(res.stderr)
        assert invoke(*args, "--clip").exit_code == 0
    with zipfile.ZipFile(tmp_path / "sub.zip") as archive:
        ages = np.loadtxt(io.StringIO(archive.read("predictions.csv").decode()))
    np.testing.assert_allclose(ages, [0.0 if bad < 0 else 150.0, 30.0])
    res = json.loads(
        invoke("evaluate", "--data", root, "--predictions", preds, "--clip", "--json", "--n-boot", 0).stdout
    )
    expected = (abs((0.0 if bad < 0 else 150.0) - 19.0) + abs(30.0 - 33.5)) / 2  # APPA_GT test ages 19, 33.5
    assert res["mae"] == pytest.approx(expected)


# --------------------------------------------------------------------------- smaller items


def test_skip_bad_warns_once(tmp_path, caplog):
    root = write_appa(tmp_path / "appa")
    (root / "train" / "000001.jpg_face.jpg").write_bytes(b"garbage")
    res = invoke("data", "info", root, "--skip-bad", "--json")
    assert res.exit_code == 0, res.output
    assert shown_warnings(res, caplog, "skipped 1 bad image(s)") == 1
    assert "000001.jpg_face.jpg: cannot decode image" in one_line(res.stderr)


def test_messages_show_plain_numbers(tmp_path):
    root = tmp_path / "npy"
    write_npy(root)
    labels = np.load(root / "labels_train.npy")
    labels[1] = np.nan
    np.save(root / "labels_train.npy", labels)
    message = info_error(root)
    assert "row 1: age nan is not an age" in message and "np.float" not in message
    test = load_faces(write_appa(tmp_path / "appa")).query("split == 'test'")
    res = invoke("evaluate", "--data", tmp_path / "appa", "--predictions", _predictions(tmp_path, test, [np.inf, 3]))
    assert res.exit_code == 2 and "prediction inf is missing or not a finite number" in one_line(res.stderr)
    assert "np.float" not in res.output


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_weights_are_refused_without_advice_to_unpickle(tmp_path):
    data = write_appa(tmp_path / "appa")
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    res = invoke("train", *QUICK, "--data", data, "--out", tmp_path / "run", "--set", f"model.weights={weights}")
    assert res.exit_code == 2, res.output
    message = one_line(res.stderr)
    assert "never unpickles" in message and "weights_only" not in message and "trusted source" not in message
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_messages_keep_their_square_brackets(tmp_path):
    res = invoke("weights", "--data", write_appa(tmp_path / "appa"), "--scheme", "custom")
    assert res.exit_code == 2
    assert "(e.g. [age, ethnicity])" in one_line(res.stderr)


def test_out_errors_name_the_out_path_not_a_temp_file(tmp_path):
    root = write_appa(tmp_path / "appa")
    preds = _predictions(tmp_path, load_faces(root).query("split == 'test'"), [20.0, 30.0])
    out = tmp_path / "taken.zip"
    (out / "inside").mkdir(parents=True)  # --out is a folder
    res = invoke("submit", preds, "--data", root, "--out", out)
    assert res.exit_code == 2, res.output
    assert f"{out}: Is a directory" in one_line(res.stderr)
    assert ".tmp" not in res.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_nan_loss_gives_one_message(synthetic, tmp_path, caplog):
    res = invoke(
        "train",
        *QUICK,
        "--data",
        synthetic,
        "--out",
        tmp_path / "run",
        "--set",
        "stage2.lr=1e30",
        "--set",
        "model.output=linear",
    )
    assert res.exit_code == 2, res.output
    assert shown_warnings(res, caplog, "no finite validation loss to keep") == 1
    assert shown_warnings(res, caplog, "keeping its best checkpoint") == 0


# --------------------------------------------------------------------------- cases that already held


def test_held_pickled_npy_arrays_are_refused(tmp_path):
    root = tmp_path / "npy"
    write_npy(root)
    np.save(root / "meta_data_train.npy", np.array([["male", object(), "x"]] * 3, dtype=object), allow_pickle=True)
    assert "meta_data_train.npy: cannot read without unpickling" in info_error(root)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda gt: gt.assign(apparent_age_avg=["abc", 30, 20]),
            "gt_avg_train.csv: row 2: apparent_age_avg 'abc' is not an age",
        ),
        (
            lambda gt: gt.assign(apparent_age_avg=[20, -3, 20]),
            "gt_avg_train.csv: row 3: apparent_age_avg '-3' is not an age",
        ),
        (lambda gt: gt.drop(columns="real_age"), "gt_avg_train.csv: missing required column(s) real_age"),
        (
            lambda gt: gt.assign(file_name=["000000.jpg", None, "000002.jpg"]),
            "gt_avg_train.csv: row 3: empty file_name",
        ),
        (lambda gt: gt.assign(file_name=["000000.jpg", "nope.jpg", "000002.jpg"]), "nope.jpg_face.jpg: file not found"),
    ],
)
def test_held_bad_tables_are_refused_naming_the_row(tmp_path, edit, message):
    root = write_appa(tmp_path / "appa")
    edit(pd.read_csv(root / "gt_avg_train.csv")).to_csv(root / "gt_avg_train.csv", index=False)
    assert message in info_error(root)


def test_held_bad_prediction_files(tmp_path):
    root = write_appa(tmp_path / "appa")
    cases = {
        "dup.csv": ("image,prediction\n000000.jpg,20\n000000.jpg,21\n000001.jpg,30\n", "more than one prediction"),
        "nan.csv": ("image,prediction\n000000.jpg,\n000001.jpg,30\n", "row 2 (image 000000.jpg)"),
        "extra.csv": ("image,prediction\n000000.jpg,20\n000001.jpg,30\nzzz.jpg,4\n", "not in the split: zzz.jpg"),
        "cols.csv": ("file,age\n000000.jpg,20\n", "missing column(s) image, prediction"),
        "binary.csv": (b"\x89PNG\x00\xff\xfe", "not a readable CSV"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        res = invoke("evaluate", "--data", root, "--predictions", path)
        assert res.exit_code == 2, (name, res.output)
        assert message in one_line(res.stderr), name


@pytest.mark.parametrize(
    "args, message",
    [
        (("--set", "stage2.lrr=1"), "unknown key 'stage2.lrr' (did you mean 'lr'?)"),
        (("--set", "stage2.lr"), "must look like key.sub=value"),
        (("--set", "stage2.lr=-1"), "stage2.lr"),
        (("--scale", "huge"), "unknown scale 'huge'"),
    ],
)
def test_held_config_mistakes(tmp_path, args, message):
    res = invoke("train", "--preset", "M1", "--data", write_appa(tmp_path / "appa"), "--out", tmp_path / "run", *args)
    assert res.exit_code == 2, res.output
    assert message in one_line(res.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "--resume", "{tmp}/nowhere"), "run folder not found"),
        (("export-backbone", "{tmp}", "--out", "{tmp}/b.pth"), "is not a fairage run folder"),
        (("report", "{tmp}/nowhere", "--out", "{tmp}/rep"), "run folder not found"),
        (("evaluate", "{tmp}"), "is not a fairage run folder (no run.json)"),
        (("data", "info", "{tmp}/nowhere"), "dataset folder not found"),
    ],
)
def test_held_missing_folders(tmp_path, args, message):
    res = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert message in one_line(res.stderr) and "Traceback" not in res.output
