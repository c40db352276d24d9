"""Hardening: what a hostile but realistic user tries against every command and the service, and what must hold.

Each test builds its hostile input here, runs the real command and checks the outcome (one
message and exit 2, nothing read from outside, nothing of the user's overwritten).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from fairage.cli import app

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import keras_vggface2_spec as spec

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- import-keras


@pytest.fixture(scope="module")
def zero_keras(tmp_path_factory) -> Path:
    """A valid weights-only Keras file of the VGGFace2 ResNet50 (all zeros, compressed)."""
    path = tmp_path_factory.mktemp("keras") / "zero.h5"
    spec.write_weights_only(path, spec.zero_weights(), "gzip")
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


STEM = "conv1/7x7_s2"
STEM_KERNEL = f"{STEM}/kernel:0"  # (7, 7, 3, 64) float32: 37632 bytes


def _import_refused(h5: Path, out: Path, needle: str) -> str:
    result = invoke("import-keras", h5, "--out", out)
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert needle in text and "Traceback" not in result.output
    assert not out.exists()
    return text


def _aged(path: Path) -> float:
    """Set ``path``'s access time well before its modification time (so a read moves it, even under
    relatime) and return it."""
    import os

    st = os.stat(path)
    os.utime(path, (st.st_mtime - 1000, st.st_mtime))
    return os.stat(path).st_atime


def _reads_move_atime(folder: Path) -> bool:
    """Whether this file system records reads in the access time (not mounted noatime)."""
    import os

    probe = folder / "atime-probe"
    probe.write_bytes(b"x" * 64)
    before = _aged(probe)
    probe.read_bytes()
    return os.stat(probe).st_atime != before


def test_import_keras_refuses_external_storage_and_never_imports_the_outside_bytes(zero_keras, tmp_path):
    import os

    from safetensors.numpy import load_file

    secret = np.arange(7 * 7 * 3 * 64, dtype=np.float32).reshape(7, 7, 3, 64) + 0.5
    # the control: the same bytes stored inside the file are imported (as the (out, in, h, w) stem)
    inside = _copy(zero_keras, tmp_path / "inside.h5")
    with h5py.File(inside, "a") as f:
        f[STEM][STEM_KERNEL][...] = secret
    assert invoke("import-keras", inside, "--out", tmp_path / "control").exit_code == 0
    stem = load_file(str(tmp_path / "control" / "model.safetensors"))["backbone.conv1.weight"]
    np.testing.assert_array_equal(stem, secret.transpose(3, 2, 0, 1))
    # stored outside the file (external storage): refused, and the outside file is never read
    outside = tmp_path / "outside" / "secret.bin"
    outside.parent.mkdir()
    outside.write_bytes(secret.tobytes())
    h5 = _copy(zero_keras, tmp_path / "external.h5")
    with h5py.File(h5, "a") as f:
        del f[STEM][STEM_KERNEL]
        f[STEM].create_dataset(
            STEM_KERNEL,
            shape=secret.shape,
            dtype="<f4",
            external=[(str(outside), 0, secret.nbytes)],
        )
        assert f[STEM][STEM_KERNEL].external  # h5py really wrote external storage
    tracks = _reads_move_atime(tmp_path)
    before = _aged(outside)
    text = _import_refused(h5, tmp_path / "model", "has external storage")
    assert f"dataset '/{STEM}/{STEM_KERNEL}'" in text
    assert str(outside) in text
    if tracks:
        assert os.stat(outside).st_atime == before, "the outside file was read"
    # the message is the same whether or not the outside file exists (no probing of the machine)
    outside.unlink()
    assert _import_refused(h5, tmp_path / "model", "has external storage") == text


def test_import_keras_refuses_external_links_without_opening_the_other_file(zero_keras, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("kernel", data=np.ones((7, 7, 3, 64), np.float32))
    h5 = _copy(zero_keras, tmp_path / "linked.h5")
    with h5py.File(h5, "a") as f:
        del f[STEM][STEM_KERNEL]
        f[STEM][STEM_KERNEL] = h5py.ExternalLink(str(other), "/kernel")
    tracks = _reads_move_atime(tmp_path)
    before = _aged(other)
    text = _import_refused(h5, tmp_path / "model", "is an external link to")
    assert str(other) in text
    if tracks:
        assert __import__("os").stat(other).st_atime == before, "the linked file was read"
    # a link target that cannot be opened gives the same message: the link was never followed
    other.write_text("not hdf5")
    assert _import_refused(h5, tmp_path / "model", "is an external link to") == text


def test_import_keras_refuses_virtual_datasets(zero_keras, tmp_path):
    other = tmp_path / "source.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("kernel", data=np.ones((7, 7, 3, 64), np.float32))
    h5 = _copy(zero_keras, tmp_path / "virtual.h5")
    with h5py.File(h5, "a") as f:
        del f[STEM][STEM_KERNEL]
        layout = h5py.VirtualLayout(shape=(7, 7, 3, 64), dtype="<f4")
        layout[...] = h5py.VirtualSource(str(other), "kernel", shape=(7, 7, 3, 64))
        f[STEM].create_virtual_dataset(STEM_KERNEL, layout)
    tracks = _reads_move_atime(tmp_path)
    before = _aged(other)
    text = _import_refused(h5, tmp_path / "model", "is a virtual dataset mapped from")
    assert str(other) in text
    if tracks:
        assert __import__("os").stat(other).st_atime == before, "the source file was read"


def test_import_keras_refuses_soft_links(zero_keras, tmp_path):
    h5 = _copy(zero_keras, tmp_path / "soft.h5")
    with h5py.File(h5, "a") as f:
        f["alias"] = h5py.SoftLink("/dim_proj")
    _import_refused(h5, tmp_path / "model", "'/alias' is a soft link to /dim_proj")


def test_import_keras_checks_declared_shapes_before_reading(zero_keras, tmp_path, monkeypatch):
    # a 10 GB conv kernel declared in a small file (chunked, never written): refused from its header
    h5 = _copy(zero_keras, tmp_path / "huge.h5")
    with h5py.File(h5, "a") as f:
        del f[STEM][STEM_KERNEL]
        f[STEM].create_dataset(
            STEM_KERNEL,
            shape=(7, 7, 3, 64 * 200_000),
            dtype="<f4",
            chunks=(7, 7, 3, 64),
            compression="gzip",
        )
        # and a (10^6, 10^6) Dense kernel in a layer of no fixed shape
        dense = f.create_group("dense_huge")
        dense.attrs["weight_names"] = np.array([b"dense_huge/kernel:0", b"dense_huge/bias:0"])
        dense.create_dataset("dense_huge/kernel:0", shape=(10**6, 10**6), dtype="<f4", chunks=(1, 1024))
        dense.create_dataset("dense_huge/bias:0", data=np.zeros(10**6, np.float32))
        f.attrs["layer_names"] = np.array(list(f.attrs["layer_names"]) + [b"dense_huge"])
    assert h5.stat().st_size < 200e6
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset,
        "__getitem__",
        lambda self, key: reads.append(self.name) or original(self, key),
    )
    text = _import_refused(h5, tmp_path / "model", f"layer '{STEM}': shape mismatch")
    assert "(7, 7, 3, 12800000)" in text and "needs (7, 7, 3, 64)" in text
    assert f"/{STEM_KERNEL}" not in reads
    with h5py.File(h5, "a") as f:  # the stem fixed: the Dense kernel is refused from its header
        del f[STEM][STEM_KERNEL]
        f[STEM].create_dataset(STEM_KERNEL, data=np.zeros((7, 7, 3, 64), np.float32))
    reads.clear()
    text = _import_refused(h5, tmp_path / "model", "declares shape (1000000, 1000000)")
    assert "dense_huge/kernel:0" in text and not any("dense_huge/kernel" in r for r in reads)


def test_import_keras_refuses_bytes_weights_and_odd_model_configs(zero_keras, tmp_path):
    h5 = _copy(zero_keras, tmp_path / "bytes.h5")
    with h5py.File(h5, "a") as f:
        name = f"{STEM}/bn/gamma:0"
        del f[f"{STEM}/bn"][name]
        f[f"{STEM}/bn"].create_dataset(name, data=np.array([b"x" * 10] * 64))
    _import_refused(
        h5,
        tmp_path / "model",
        "holds |S10 values; Keras weights are floating-point numbers",
    )
    # a full-model file whose model_config has a list where Keras writes a mapping: imports, the
    # head's activations then follow the kit's convention
    import json

    for config in (
        {"class_name": "Functional", "config": []},
        [1, 2],
        {"config": {"layers": {"a": 1}}},
        {"config": {"layers": [{"name": "dim_proj", "config": ["relu"]}]}},
    ):
        full = tmp_path / "full.h5"
        spec.write_full_model(full, spec.zero_weights(), "gzip")
        with h5py.File(full, "a") as f:
            f.attrs["model_config"] = json.dumps(config).encode()
        out = tmp_path / f"model-{abs(hash(json.dumps(config)))}"
        result = invoke("import-keras", full, "--out", out)
        assert result.exit_code == 0, (config, result.output)
        assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- train --out: the user's folder


def test_train_refuses_a_folder_that_is_not_a_run_and_touches_nothing(tmp_path, tiny_data):
    out = tmp_path / "mine"
    out.mkdir()
    files = {
        "config.yaml": "my: own config\n",
        "history.csv": "year,event\n1999,party\n",
        ".notes.tmp1": "notes",
    }
    for name, text in files.items():
        (out / name).write_text(text)
    result = invoke("train", "--preset", "M1", "--scale", "tiny", "--data", tiny_data, "--out", out)
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert f"--out {out} is a folder that is not a fairage run" in text and "config.yaml" in text
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_stale_temp_cleanup_removes_only_names_fairage_writes(tmp_path):
    from fairage.store.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    (folder.path / "checkpoints").mkdir(parents=True)
    ours = [
        folder.path / ".run.json.k2j_x9q1.tmp.json",
        folder.path / ".history.csv.abc.tmp.csv",
        folder.path / "checkpoints" / ".stage1-last.ckpt.q1w2e3r4.tmp.ckpt",
    ]
    theirs = [
        folder.path / ".notes.tmp1",
        folder.path / ".draft.txt.abc.tmp.txt",
        folder.path / "checkpoints" / ".mine.ckpt.abc.tmp.ckpt",
        folder.path / ".run.json.tmp",
    ]
    for p in ours + theirs:
        p.write_text("x")
    with folder.lock():
        pass
    assert [p.exists() for p in ours] == [False] * len(ours)
    assert [p.exists() for p in theirs] == [True] * len(theirs)


# --------------------------------------------------------------------------- predict --annotate


def test_annotate_never_writes_over_an_input_and_names_stay_unique(tiny_run, tmp_path, monkeypatch):
    from conftest import GRACE_HOPPER

    photos = tmp_path / "work" / "a"
    photos.mkdir(parents=True)
    (tmp_path / "a").mkdir()
    original = GRACE_HOPPER.read_bytes()
    (photos / "x.jpg").write_bytes(original)
    (tmp_path / "a" / "x.jpg").write_bytes(original)
    monkeypatch.chdir(tmp_path / "work")
    # --annotate names the input folder itself
    result = invoke(
        "predict",
        tiny_run,
        "a",
        "--out",
        "p.csv",
        "--quiet",
        "--detector",
        "haar",
        "--annotate",
        "a",
    )
    assert result.exit_code == 0, result.output
    assert (photos / "x.jpg").read_bytes() == original
    assert sorted(p.name for p in photos.iterdir()) == ["x.annotated.jpg", "x.jpg"]
    # two inputs whose labels differ only by "..": two rows, two drawn copies
    drawn = tmp_path / "drawn"
    result = invoke(
        "predict",
        tiny_run,
        "a/x.jpg",
        "../a/x.jpg",
        "--out",
        "q.csv",
        "--quiet",
        "--detector",
        "haar",
        "--annotate",
        drawn,
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    assert pd.read_csv("q.csv")["image"].tolist() == ["a/x.jpg", "../a/x.jpg"]
    assert sorted(p.relative_to(drawn).as_posix() for p in drawn.rglob("*.jpg")) == [
        "a/x.annotated.jpg",
        "a/x.jpg",
    ]
    # the CSV itself is never written over an input image
    result = invoke(
        "predict",
        tiny_run,
        "a/x.jpg",
        "--out",
        "a/x.jpg",
        "--quiet",
        "--detector",
        "haar",
    )
    assert result.exit_code == 2 and "is one of the input images" in one_line(result.output)
    assert (photos / "x.jpg").read_bytes() == original


# --------------------------------------------------------------------------- synth DIR


def test_synth_refuses_a_dataset_or_another_synthetic_set(tmp_path):
    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    (real / "gt_avg_train.csv").write_text("file_name,apparent_age_avg\n000000.jpg,31.5\n")
    (real / "train" / "000000.jpg_face.jpg").write_bytes(b"my photo")
    before = {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    small = (
        "--n-train",
        2,
        "--n-valid",
        1,
        "--n-test",
        1,
        "--size",
        16,
        "--workers",
        1,
        "--quiet",
    )
    result = invoke("synth", real, *small)
    assert result.exit_code == 2, result.output
    assert "holds no synthetic set" in one_line(result.output)
    assert {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()} == before
    # a synthetic set: the same command again is fine (byte-identical), other parameters are refused
    synth = tmp_path / "synth"
    assert invoke("synth", synth, *small).exit_code == 0
    table = (synth / "gt_avg_train.csv").read_bytes()
    assert invoke("synth", synth, *small).exit_code == 0
    assert (synth / "gt_avg_train.csv").read_bytes() == table
    result = invoke("synth", synth, *small, "--seed", 5)
    assert result.exit_code == 2 and "holds another synthetic set (version" in one_line(result.output)
    assert "seed 0" in one_line(result.output) and "seed 5" in one_line(result.output)
    assert (synth / "gt_avg_train.csv").read_bytes() == table


# --------------------------------------------------------------------------- one image decoder


def _kinds(folder: Path, size: int = 32) -> dict[str, tuple[Path, np.ndarray]]:
    """One file per kind of image, each with the RGB pixels it must decode to (worked out by hand)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    half = size // 2
    out = {}
    colour = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    # EXIF orientation 6 ("rotate 90 clockwise to display"): the stored pixels are turned counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(colour, 1).copy()).save(folder / "rotated.png", exif=exif)
    out["exif"] = (folder / "rotated.png", colour)
    # 16-bit grey: v * 257 in 16 bits is v in 8 bits (not 255: saturated)
    grey8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(folder / "deep.png")
    out["16-bit"] = (folder / "deep.png", np.repeat(grey8[..., None], 3, axis=2))
    # RGBA: opaque left half keeps its colour, transparent right half is white
    rgba = np.dstack([colour, np.full((size, size), 255, np.uint8)])
    rgba[:, half:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    expected = colour.copy()
    expected[:, half:] = 255
    out["RGBA"] = (folder / "alpha.png", expected)
    # grey + alpha
    la = np.dstack(
        [
            grey8,
            np.where(np.arange(size) < half, 255, 0).astype(np.uint8)[None].repeat(size, 0),
        ]
    )
    Image.fromarray(la, "LA").save(folder / "la.png")
    expected = np.repeat(grey8[..., None], 3, axis=2)
    expected[:, half:] = 255
    out["LA"] = (folder / "la.png", expected)
    # palette with a transparent index
    palette_rgb = [(200, 10, 10), (10, 200, 10), (0, 0, 0)]
    index = (np.arange(size)[None] // 11).repeat(size, 0).astype(np.uint8)  # 0, 1, 2 by column
    p = Image.fromarray(index, "P")
    p.putpalette([c for rgb in palette_rgb for c in rgb])
    p.save(folder / "palette.png", transparency=2)
    expected = np.array([palette_rgb[0], palette_rgb[1], (255, 255, 255)], np.uint8)[index]
    out["palette"] = (folder / "palette.png", expected)
    # CMYK (TIFF, lossless): C, M, Y, K = 0, 255, 255, 0 is red, all zero is white
    cmyk = np.zeros((size, size, 4), np.uint8)
    cmyk[:half, :, 1:3] = 255
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.tif")
    expected = np.full((size, size, 3), 255, np.uint8)
    expected[:half, :, 1:] = 0
    out["CMYK"] = (folder / "cmyk.tif", expected)
    # plain grey
    Image.fromarray(grey8, "L").save(folder / "grey.png")
    out["grey"] = (folder / "grey.png", np.repeat(grey8[..., None], 3, axis=2))
    return out


def test_cache_predict_and_serve_decode_every_kind_of_image_alike(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from fairage.data.cache import decode_image, load_images
    from fairage.inference.predictor import AgePredictor, read_face
    from fairage.serve import create_app

    kinds = _kinds(tmp_path)
    predictor = AgePredictor(tiny_run, device="cpu")
    assert predictor.image_size == 32
    faces = __import__("pandas").DataFrame({"path": [str(p) for p, _ in kinds.values()], "frame": -1, "split": "test"})
    cached = load_images(faces, 32, cache_dir=tmp_path / "cache", workers=1, progress=False)
    client = TestClient(create_app(predictor))
    for i, (kind, (path, expected)) in enumerate(kinds.items()):
        np.testing.assert_array_equal(decode_image(str(path), 32), expected, err_msg=kind)
        np.testing.assert_array_equal(cached[i], expected, err_msg=kind)
        np.testing.assert_array_equal(read_face(path, 32), expected, err_msg=kind)
        age = float(predictor.predict_crops(expected[None])[0])
        served = client.post(
            "/predict?faces_only=true",
            content=path.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert served.status_code == 200, (kind, served.text)
        assert served.json()["faces"][0]["age"] == pytest.approx(age, abs=1e-4), kind
        assert served.json()["image"] == {"width": 32, "height": 32}, kind


# --------------------------------------------------------------------------- bounded YAML


def _bomb(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels + 1):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: *l{levels}\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, tiny_data):
    from fairage.config.files import load_yaml
    from fairage.errors import ConfigError

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(6))  # 9^7 = 4.8 million strings once expanded
    result = invoke("train", "--config", bomb, "--data", tiny_data, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "expands to more than 100000 values" in one_line(result.output)
    assert len(result.output) < 1000 and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="recursive alias"):
        load_yaml("a: &a [1, *a]\n", "x")
    # a few anchors, as people share stage settings, still read; the bound is on the expanded size
    assert load_yaml("s: &s {lr: 0.1}\nt: *s\nu: [*s, *s]\n", "x") == {
        "s": {"lr": 0.1},
        "t": {"lr": 0.1},
        "u": [{"lr": 0.1}, {"lr": 0.1}],
    }
    assert len(load_yaml(_bomb(3), "x")["name"]) == 9  # 9^4 = 6561 values: fine


def test_validation_messages_cut_long_values(tmp_path, tiny_data):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("stage2: {lr: 0.001}\ndata:\n  image_size: " + "9" * 50_000 + "x\n")
    result = invoke("train", "--config", cfg, "--data", tiny_data, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "data.image_size" in text and "more characters)" in text and len(text) < 1000


# --------------------------------------------------------------------------- bounds of settings


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.image_size=100000",
            "data.image_size: Input should be less than or equal to 1024; allowed: 8 <= value <= 1024",
        ),
        (
            "eval.n_boot=1000000000",
            "eval.n_boot: Input should be less than or equal to 10000; allowed: 0 <= value <= 10000",
        ),
        ("eval.n_perm=1000000000", "allowed: 0 <= value <= 100000"),
        (
            "stage2.lr=inf",
            "stage2.lr: Input should be a finite number; allowed: 0 < value (got inf)",
        ),
        ("stage2.lr=.nan", "stage2.lr: Input should be a finite number"),
        ("stage2.max_epochs=" + "1" + "0" * 30, "allowed: 1 <= value <= 100000"),
        (
            "data.num_workers=200",
            "data.num_workers: Input should be less than or equal to 64; allowed: 0 <= value <= 64",
        ),
    ],
)
def test_unbounded_settings_are_refused_before_the_run_folder_exists(tmp_path, tiny_data, override, message):
    out = tmp_path / "run"
    result = invoke(
        "train",
        "--preset",
        "M1",
        "--scale",
        "tiny",
        "--data",
        tiny_data,
        "--out",
        out,
        "--set",
        override,
    )
    assert result.exit_code == 2, result.output
    assert message in one_line(result.output)
    assert not out.exists()


def test_evaluate_counts_are_bounded_in_the_options_too(tmp_path, tiny_run):
    for args in (
        ("--n-boot", 10**9),
        ("--n-perm", 10**9),
        ("--n-perm", "1e9"),
        ("--seed", -1),
    ):
        result = invoke("evaluate", tiny_run, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value for" in one_line(result.output), result.output
    import pandas as pd

    from fairage.errors import ConfigError
    from fairage.fairness.metrics import evaluate

    df = pd.DataFrame({"age": [10.0, 20.0], "prediction": [11.0, 19.0], "gender": ["female", "male"]})
    with pytest.raises(ConfigError, match="n_boot 1000000000: bootstrap resamples must be 0 to 10000"):
        evaluate(df, attributes=["gender"], n_boot=10**9)


# --------------------------------------------------------------------------- devices, opsets, exported metadata


def test_predict_device_and_export_opset_mistakes_exit_2(tiny_run, tmp_path, monkeypatch):
    import torch
    from conftest import GRACE_HOPPER

    result = invoke(
        "predict",
        tiny_run,
        GRACE_HOPPER,
        "--out",
        tmp_path / "p.csv",
        "--faces",
        "--device",
        "quantum",
    )
    assert result.exit_code == 2 and "--device 'quantum' is not a torch device" in one_line(result.output)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = invoke(
        "predict",
        tiny_run,
        GRACE_HOPPER,
        "--out",
        tmp_path / "p.csv",
        "--faces",
        "--device",
        "cuda",
    )
    assert result.exit_code == 2 and "--device cuda: no CUDA GPU is available" in one_line(result.output)
    assert not (tmp_path / "p.csv").exists()
    result = invoke("export", tiny_run, "--out", tmp_path / "m.onnx", "--opset", 1000)
    assert result.exit_code == 2 and "--opset 1000: this torch exports ONNX opsets" in one_line(result.output)
    assert not (tmp_path / "m.onnx").exists()


def test_exported_metadata_out_of_bounds_is_refused(tiny_run, tmp_path):
    import onnx
    from conftest import GRACE_HOPPER

    good = tmp_path / "m.onnx"
    assert invoke("export", tiny_run, "--out", good).exit_code == 0
    for key, value, message in (
        (
            "fairage_image_size",
            "100000",
            "fairage_image_size '100000' is not an image side",
        ),
        ("fairage_image_size", "64", "its input has shape"),
        ("fairage_input_norm", "rot13", "fairage_input_norm 'rot13' is not"),
    ):
        proto = onnx.load(str(good))
        for entry in proto.metadata_props:
            if entry.key == key:
                entry.value = value
        bad = tmp_path / f"bad-{key}-{value}.onnx"
        onnx.save(proto, str(bad))
        result = invoke("predict", bad, GRACE_HOPPER, "--out", tmp_path / "p.csv", "--faces")
        assert result.exit_code == 2, result.output
        assert message in one_line(result.output)
    result = invoke("predict", good, GRACE_HOPPER, "--out", tmp_path / "p.csv", "--faces")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- --resume on damaged run folders


def _interrupted(tiny_run: Path, dest: Path) -> Path:
    """A copy of the finished tiny run made to look interrupted in its last stage."""
    import json
    import shutil

    shutil.copytree(tiny_run, dest)
    for name in ("metrics_test.json", "predictions_test.csv", ".lock"):
        (dest / name).unlink(missing_ok=True)
    record = json.loads((dest / "run.json").read_text())
    last = record["completed_stages"][-1]
    record.update(status="running", stage=last, completed_stages=record["completed_stages"][:-1])
    (dest / "run.json").write_text(json.dumps(record))
    assert (dest / "checkpoints" / f"{last}-last.ckpt").is_file()
    return dest


def test_resume_of_damaged_run_folders_is_one_message(tiny_run, tmp_path):
    import torch
    import yaml

    # the last checkpoint is a valid torch file without an epoch
    run = _interrupted(tiny_run, tmp_path / "no-epoch")
    last = next((run / "checkpoints").glob("*-last.ckpt"))
    torch.save({"state_dict": {}}, last)
    result = invoke("train", "--resume", run, "--quiet")
    assert result.exit_code == 2, result.output
    assert f"{last} holds no epoch number" in one_line(result.output) and "Traceback" not in result.output
    # history.csv with an epoch that is not a number
    run = _interrupted(tiny_run, tmp_path / "bad-history")
    lines = (run / "history.csv").read_text().splitlines()
    lines[1] = "one" + lines[1][lines[1].index(",") :]
    (run / "history.csv").write_text("\n".join(lines) + "\n")
    result = invoke("train", "--resume", run, "--quiet")
    assert result.exit_code == 2, result.output
    assert "history.csv: row 2: epoch 'one' is not an epoch number" in one_line(result.output)
    # config.yaml edited to another backbone
    run = _interrupted(tiny_run, tmp_path / "edited")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["backbone"] = "resnet34" if cfg["model"]["backbone"] != "resnet34" else "resnet18"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("train", "--resume", run, "--quiet")
    assert result.exit_code == 2, result.output
    assert "its weights do not fit the model of the run's config.yaml" in one_line(result.output)
    assert "was config.yaml edited?" in one_line(result.output)


# --------------------------------------------------------------------------- dataset files: exit codes, messages


def test_a_split_table_that_is_a_folder_is_an_error_not_a_missing_split(tmp_path):
    from test_data_loaders import write_appa

    root = write_appa(tmp_path / "appa")
    (root / "gt_avg_test.csv").unlink()
    (root / "gt_avg_test.csv").mkdir()
    result = invoke("data", "info", root)
    assert result.exit_code == 2, result.output
    assert f"{root / 'gt_avg_test.csv'} is a folder" in one_line(result.output)
    (root / "gt_avg_test.csv").rmdir()  # absent: the split is simply not there
    assert invoke("data", "info", root).exit_code == 0


def test_utkface_files_named_in_capitals_are_detected(tmp_path):
    from test_data_loaders import write_utk

    from fairage.data import detect_layout, load_faces

    names = [
        "26_0_0_20170116.JPG",
        "3_1_1_20161219.jpg.chip.JPG",
        "70_1_2_20170109.JPG",
    ]
    root = write_utk(tmp_path / "utk", names)
    assert detect_layout(root) == "utkface"
    assert sorted(load_faces(root)["age"].tolist()) == [3, 26, 70]


def test_messages_never_suggest_unpickling(tmp_path, tiny_run):
    import os
    import shutil

    import torch
    from test_data_loaders import write_npy

    root = tmp_path / "npy"
    write_npy(root)
    for kind in ("labels", "meta_data"):
        shutil.copy(root / f"{kind}_train.npy", root / f"{kind}_valid.npy")
    (root / "data_valid.npy").write_text("just some text\n")
    result = invoke("data", "info", root)
    text = one_line(result.output)
    assert result.exit_code == 2 and "data_valid.npy: not a .npy file (no NumPy header)" in text
    assert "pickle" not in text.lower()

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "payload-ran"),))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.x": Payload()}, "epoch": 0}, ckpt)
    result = invoke("export-backbone", ckpt, "--out", tmp_path / "b.safetensors")
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "holds pickled Python objects" in text and "fairage never unpickles" in text
    assert "corrupt" not in text and "weights_only" not in text and "will likely succeed" not in text
    assert not (tmp_path / "payload-ran").exists()


# --------------------------------------------------------------------------- spreadsheet formulas in CSVs


def test_csv_cells_that_spreadsheets_run_as_formulas_are_quoted_and_read_back(tmp_path, tiny_run):
    import csv

    import pandas as pd
    from conftest import GRACE_HOPPER

    from fairage.store.predictions import read_predictions, write_predictions

    evil = '=HYPERLINK("x.example","y").jpg'
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in (evil, "+1.jpg", "@me.jpg", "-x.jpg", "'q.jpg", "plain.jpg"):
        (photos / name).write_bytes(GRACE_HOPPER.read_bytes())
    out = tmp_path / "p.csv"
    result = invoke("predict", tiny_run, photos, "--out", out, "--faces", "--quiet")
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert sorted(cells) == sorted(["'" + evil, "'+1.jpg", "'@me.jpg", "'-x.jpg", "''q.jpg", "plain.jpg"])
    # fairage reads its own file back to the names it was given
    back = read_predictions(out)
    assert sorted(back["image"]) == sorted([evil, "+1.jpg", "@me.jpg", "-x.jpg", "'q.jpg", "plain.jpg"])
    # the run's predictions file too, with numbers (negative ones included) untouched
    faces = pd.DataFrame({"image": [evil, "ok"], "gender": ["=1+1", "male"]})
    write_predictions(tmp_path / "pred.csv", faces, [-0.0, 42.5])
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1] == ["'" + evil, "-0.0", "'=1+1"] and rows[2] == [
        "ok",
        "42.5",
        "male",
    ]
    assert read_predictions(tmp_path / "pred.csv")["image"].tolist() == [evil, "ok"]


# --------------------------------------------------------------------------- read-only datasets


def test_evaluate_on_a_read_only_dataset_caches_in_the_user_cache(tmp_path, tiny_run, monkeypatch):
    import errno
    import os
    import tempfile

    from conftest import tiny_synthetic

    data = tiny_synthetic(tmp_path / "readonly", n_train=4, n_valid=4, n_test=8, seed=3)
    user = tmp_path / "user-cache"
    monkeypatch.setenv("FAIRAGE_CACHE_DIR", str(user))
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # root ignores chmod: refuse writes under the dataset instead
        if dir is not None and str(dir).startswith(str(data)):
            raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, ".x.tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = invoke("evaluate", tiny_run, "--data", data, "--json", "--n-boot", 0, "--n-perm", 0)
    assert result.exit_code == 0, result.output
    assert not (data / ".fairage_cache").exists() or not any((data / ".fairage_cache").iterdir())
    assert len(list(user.glob("readonly-*/*.npy"))) == 1
    # with the user cache unwritable too, the message names both and what evaluate can set
    monkeypatch.setenv("FAIRAGE_CACHE_DIR", str(data / "also-read-only"))
    for p in user.glob("readonly-*/*.npy"):
        p.unlink()
    result = invoke("evaluate", tiny_run, "--data", data, "--json", "--n-boot", 0, "--n-perm", 0)
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "cannot write the decoded-image cache (Read-only file system); nor the user cache" in text
    assert "set FAIRAGE_CACHE_DIR (any command)" in text


# --------------------------------------------------------------------------- full disk while checkpointing


def test_full_disk_while_checkpointing_is_one_line_exit_1_and_resume_works(tmp_path, monkeypatch):
    import builtins
    import errno

    from conftest import tiny_synthetic

    import fairage.atomic

    data = tiny_synthetic(tmp_path / "data", n_train=16, n_valid=8, n_test=8)

    class FullDisk:
        """A file whose writes fail with ENOSPC after a few kilobytes, as on a full disk."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(*args, **kwargs):
        return FullDisk(builtins.open(*args, **kwargs))

    monkeypatch.setattr(fairage.atomic, "open", full_open, raising=False)
    out = tmp_path / "run"
    args = (
        "--preset",
        "M1",
        "--scale",
        "tiny",
        "--data",
        data,
        "--quiet",
        "--set",
        "eval.n_boot=0",
        "--set",
        "eval.n_perm=0",
        "--set",
        "stage2.max_epochs=1",
        "--set",
        "data.image_size=16",
    )
    result = invoke("train", *args, "--out", out)
    assert result.exit_code == 1, result.output
    text = one_line(result.output)
    assert "no space left on device; free some space and run the command again" in text
    assert ".ckpt" in text and "Traceback" not in result.output and "unexpected pos" not in text
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written
    monkeypatch.delattr(fairage.atomic, "open")  # space freed
    result = invoke("train", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "metrics_test.json").is_file()


# --------------------------------------------------------------------------- serve: slow clients


def _read_until_closed(sock) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (socket timeout: fail)."""
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


@contextlib.contextmanager
def _served(app, http, backlog: int):
    """``app`` under a real uvicorn server (``http``: its protocol class) on 127.0.0.1, an ephemeral
    port with a listen ``backlog``: yields ``(address, url)``; the server stops on leaving."""
    import socket
    import threading

    import uvicorn

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    address = listener.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield address, f"http://127.0.0.1:{address[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def test_slow_clients_are_cut_off_and_do_not_block_normal_uploads(tiny_run):
    import socket

    import httpx
    from conftest import GRACE_HOPPER

    from fairage.inference.predictor import AgePredictor
    from fairage.serve import ServeLimits, create_app, serve_protocol

    limits = ServeLimits(max_pending=2, max_uploading=16, body_timeout=2.0, chunk_timeout=0.5)
    app = create_app(AgePredictor(tiny_run, device="cpu"), limits=limits)
    with _served(app, serve_protocol(0.5), backlog=128) as (address, url):
        slow = []
        try:
            # more slow uploads than the inference queue holds: each declares 100000 bytes and sends one
            for _ in range(6):
                sock = socket.create_connection(address, timeout=20)
                sock.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: 100000\r\n\r\n\xff"
                )
                slow.append(sock)
            trickle = socket.create_connection(address, timeout=20)  # headers that never end
            trickle.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
            # a normal client is served meanwhile: the slow bodies hold no place in the inference queue
            normal = httpx.post(
                f"{url}/predict",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert normal.status_code == 200, normal.text
            assert httpx.get(f"{url}/health", timeout=20).json() == {"status": "ok"}
            # every slow body gets 408 and its connection closed; the slow headers get the connection closed
            for sock in slow:
                answer = _read_until_closed(sock)
                assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
                assert b"the upload arrived too slowly (1 bytes" in answer
            assert _read_until_closed(trickle) == b""
            # and the service still serves
            again = httpx.post(
                f"{url}/predict?faces_only=true",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert again.status_code == 200
        finally:
            for sock in slow:
                sock.close()


def test_uploads_being_received_are_bounded_apart_from_the_queue(tiny_run):
    import socket

    import httpx
    from conftest import GRACE_HOPPER

    from fairage.inference.predictor import AgePredictor
    from fairage.serve import ServeLimits, create_app, serve_protocol

    limits = ServeLimits(max_pending=8, max_uploading=1, body_timeout=3.0, chunk_timeout=3.0)
    app = create_app(AgePredictor(tiny_run, device="cpu"), limits=limits)
    with _served(app, serve_protocol(), backlog=16) as (address, url):
        sock = socket.create_connection(address, timeout=20)
        try:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n\xff"
            )
            # a round trip: the server has taken the slow upload's headers and started receiving its body
            assert httpx.get(f"{url}/health", timeout=20).status_code == 200
            busy = httpx.post(
                f"{url}/predict",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert busy.status_code == 503 and "1 uploads are being received" in busy.json()["detail"]
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
            # its place is free again
            done = httpx.post(
                f"{url}/predict",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert done.status_code == 200
        finally:
            sock.close()
