"""Shared test helpers: the CLI runner, tiny synthetic datasets and configs, a tiny finished run,
real photos composed into a group photo."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from fairage.cli import app
from fairage.config.presets import load_preset
from fairage.data import write_synthetic


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The per-user decoded-image cache (used when a dataset folder is read-only) in a test folder, not ~/.cache."""
    monkeypatch.setenv("FAIRAGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "user-cache"))


def invoke(*args):
    """Run ``fairage ARGS...`` in-process (arguments converted to str); returns click's Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_synthetic(path: Path, n_train: int = 64, n_valid: int = 32, n_test: int = 32, seed: int = 0) -> Path:
    """A synthetic APPA-REAL-layout dataset of 32 px faces (one process, byte-identical for a seed)."""
    return write_synthetic(path, n_train=n_train, n_valid=n_valid, n_test=n_test, size=32, seed=seed, workers=1)


def tiny_config_file(
    folder: Path, preset: str = "M5", overrides: list[str] | None = None, name: str = "cfg.yaml"
) -> Path:
    """A config file of ``preset`` at tiny scale (20 bootstrap resamples) with ``overrides`` applied."""
    cfg = load_preset(preset, "tiny", ["eval.n_boot=20", *(overrides or [])])
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared by the tests of a session (64 / 32 / 32 faces)."""
    return tiny_synthetic(tmp_path_factory.mktemp("tiny-synthetic") / "data")


#: a real photo that ships with matplotlib (one face, 512 x 600 px)
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run folder: preset M2 at the tiny scale on 48/16/48 synthetic 32 px faces (seconds)."""
    from fairage.config.presets import load_preset
    from fairage.data import write_synthetic
    from fairage.training import train

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_synthetic(root / "data", n_train=48, n_valid=16, n_test=48, size=32, seed=0, workers=1)
    train(load_preset("M2", "tiny", ["eval.n_boot=50"]), data, root / "run", progress=False)
    return root / "run"


def group_photo(offsets: list[tuple[int, int]], size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3): grey canvas of ``size`` (width, height) with a copy of grace_hopper.jpg at each (x, y)."""
    face = np.asarray(Image.open(GRACE_HOPPER).convert("RGB"))
    canvas = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    for x, y in offsets:
        canvas[y : y + face.shape[0], x : x + face.shape[1]] = face
    return canvas


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def square_faces(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) images with a white square of side 4 + age/80 * (size - 6) px at the
    top left, so the age is readable from the image; ages (n,) float32 in [5, 80), seeded."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(5, 80, n).astype(np.float32)
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, age in enumerate(ages):
        side = int(4 + age / 80 * (size - 6))
        images[i, :side, :side] = 255
    return images, ages
