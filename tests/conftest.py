"""Shared test helpers: the CLI runner and tiny synthetic datasets and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fairage.cli import app
from fairage.config import load_preset
from fairage.data import write_synthetic


def invoke(*args):
    """Run ``fairage ARGS...`` in-process (arguments converted to str); returns click's Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_synthetic(path: Path, n_train: int = 64, n_valid: int = 32, n_test: int = 32, seed: int = 0) -> Path:
    """A synthetic APPA-REAL-layout dataset of 32 px faces (one process, byte-identical for a seed)."""
    return write_synthetic(path, n_train=n_train, n_valid=n_valid, n_test=n_test, size=32, seed=seed, workers=1)


def tiny_config_file(folder: Path, preset: str = "M5", overrides: list[str] | None = None,
                     name: str = "cfg.yaml") -> Path:
    """A config file of ``preset`` at tiny scale (20 bootstrap resamples) with ``overrides`` applied."""
    cfg = load_preset(preset, "tiny", ["eval.n_boot=20", *(overrides or [])])
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared by the tests of a session (64 / 32 / 32 faces)."""
    return tiny_synthetic(tmp_path_factory.mktemp("tiny-synthetic") / "data")
