"""Synthetic benchmark: determinism, proportions, visible age cues and bias mechanisms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fairage.data import load_faces, render_face, sample_face_params, write_synthetic
from fairage.data.synthetic import sample_labels


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    a = write_synthetic(tmp_path / "a", n_train=6, n_valid=3, n_test=3, size=32, seed=7, workers=1)
    b = write_synthetic(tmp_path / "b", n_train=6, n_valid=3, n_test=3, size=32, seed=7, workers=1)
    c = write_synthetic(tmp_path / "c", n_train=6, n_valid=3, n_test=3, size=32, seed=8, workers=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 6 + 2 * 12 + 1  # 6 CSVs, a face crop and a full photo per face, the marker
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["gt_avg_train.csv"] != fc["gt_avg_train.csv"]
    assert sum(fa[k] != fc[k] for k in fa if k.endswith("_face.jpg")) == 12


def test_the_folder_is_marked_synthetic(tmp_path):
    from fairage.data.synthetic import SYNTH_VERSION, synthetic_marker

    root = write_synthetic(tmp_path / "s", n_train=2, n_valid=1, n_test=1, size=16, seed=3, workers=1)
    assert synthetic_marker(root) == {
        "generator": "fairage.data.synthetic",
        "version": SYNTH_VERSION,
        "seed": 3,
        "size": 16,
        "faces": {"train": 2, "valid": 1, "test": 1},
    }
    (tmp_path / "photos").mkdir()
    assert synthetic_marker(tmp_path / "photos") is None


def test_output_does_not_depend_on_workers(tmp_path, monkeypatch):
    from fairage.data import synthetic

    monkeypatch.setattr(synthetic, "_CHUNK", 3)  # several tasks, so the process pool is used
    one = write_synthetic(tmp_path / "one", n_train=7, n_valid=2, n_test=4, size=24, seed=2, workers=1)
    two = write_synthetic(tmp_path / "two", n_train=7, n_valid=2, n_test=4, size=24, seed=2, workers=2)
    assert _files(one) == _files(two)


def test_written_layout_reads_back(tmp_path):
    root = write_synthetic(tmp_path / "s", n_train=8, n_valid=2, n_test=4, size=40, seed=0, workers=1)
    faces = load_faces(root)
    assert faces["split"].value_counts().to_dict() == {"train": 8, "test": 4, "valid": 2}
    gt = pd.read_csv(root / "gt_avg_test.csv")
    assert list(gt.columns) == ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]
    assert list(pd.read_csv(root / "allcategories_test.csv").columns) == [
        "file",
        "gender",
        "race",
        "makeup",
        "time",
        "happiness",
    ]
    assert gt["file_name"].tolist() == ["000000.jpg", "000001.jpg", "000002.jpg", "000003.jpg"]
    assert (root / "test" / "000003.jpg").is_file() and (root / "test" / "000003.jpg_face.jpg").is_file()
    from PIL import Image

    with Image.open(root / "test" / "000003.jpg_face.jpg") as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_label_proportions_are_appa_like():
    labels = pd.DataFrame([sample_labels(np.random.default_rng([0, 0, i])) for i in range(800)])
    eth = labels["ethnicity"].value_counts(normalize=True)
    assert 0.80 <= eth["caucasian"] <= 0.92
    assert 0.05 <= eth["asian"] <= 0.14
    assert 0.02 <= eth["afroamerican"] <= 0.09
    assert 0.42 <= (labels["gender"] == "male").mean() <= 0.58
    age = labels["apparent_age_avg"]
    assert ((age >= 15) & (age <= 45)).mean() >= 0.7
    assert 0.03 <= (age >= 60).mean() <= 0.10
    assert 0.01 <= (age < 13).mean() <= 0.06
    assert age.max() > 75 and age.max() <= 95
    expr = labels["expression"].value_counts()
    assert set(expr.index) == {"neutral", "slightlyhappy", "happy", "other"}
    assert set(expr.index[:2]) == {"neutral", "happy"}
    # apparent age is close to the real age; the rating spread grows with age
    assert (labels["apparent_age_avg"] - labels["real_age"]).abs().mean() < 4
    assert labels.loc[age > 50, "apparent_age_std"].mean() > labels.loc[age < 30, "apparent_age_std"].mean()


def _face_detail(img: np.ndarray) -> float:
    """Mean absolute Laplacian over the central face area (eyes to mouth): lines and texture."""
    g = img.astype(float).mean(axis=2)
    s = g.shape[0]
    c = g[int(0.3 * s) : int(0.75 * s), int(0.3 * s) : int(0.7 * s)]
    lap = 4 * c[1:-1, 1:-1] - c[:-2, 1:-1] - c[2:, 1:-1] - c[1:-1, :-2] - c[1:-1, 2:]
    return float(np.abs(lap).mean())


def _detail_by_age(ethnicity: str, age: float, n: int = 12) -> float:
    out = []
    for i in range(n):
        p = sample_face_params(np.random.default_rng(i), age, "male", ethnicity, "neutral")
        out.append(_face_detail(render_face(p, 96)))
    return float(np.mean(out))


def test_age_cues_are_visible_and_weaker_on_dark_skin():
    young_c, old_c = _detail_by_age("caucasian", 22), _detail_by_age("caucasian", 72)
    young_a, old_a = _detail_by_age("afroamerican", 22), _detail_by_age("afroamerican", 72)
    assert old_c > 1.5 * young_c
    assert old_a > young_a
    # the same ageing shows less on darker skin
    assert old_a - young_a < 0.6 * (old_c - young_c)


def test_ageing_shows_later_on_the_rare_skins():
    def mean_params(ethnicity, age):
        ps = [sample_face_params(np.random.default_rng(i), age, "female", ethnicity, "neutral") for i in range(200)]
        grey = [np.mean(p.hair) for p in ps]  # greying lightens the (dark) hair of both groups
        return np.mean([p.wrinkles for p in ps]), np.mean(grey)

    # wrinkles grow by 1/40 per year after onset: at 50 the lag is ~9.5 years, ~0.24 of wrinkles
    wr_c, _ = mean_params("caucasian", 50)
    wr_a, _ = mean_params("afroamerican", 50)
    assert 0.15 < wr_c - wr_a < 0.35
    # a 60-year-old afroamerican shows about the wrinkles of a 50-year-old caucasian
    wr_a60, _ = mean_params("afroamerican", 60)
    assert abs(wr_a60 - wr_c) < 0.05
    # greying is half done at 50 (symmetric noise): with the ~6-year lag an asian 56-year-old's
    # hair is a half mix of black (mean 28 grey levels) and grey (206): about 117, where the
    # undelayed ~73% grey would give about 158
    _, hair_a56 = mean_params("asian", 56)
    assert 100 < hair_a56 < 135
    # the lag only builds up from the mid-thirties: at 30 it is 10 * sigmoid(-1) = 2.7 years,
    # ~0.07 of wrinkles (times the mean person factor exp(0.25**2 / 2) = 1.03)
    wr_c30, _ = mean_params("caucasian", 30)
    wr_a30, _ = mean_params("afroamerican", 30)
    assert 0.05 < wr_c30 - wr_a30 < 0.09


def test_children_have_bigger_eyes_and_rounder_heads():
    kids = [sample_face_params(np.random.default_rng(i), 4, "female", "asian", "neutral") for i in range(20)]
    adults = [sample_face_params(np.random.default_rng(i), 30, "female", "asian", "neutral") for i in range(20)]
    assert np.mean([p.eye_size / p.head_w for p in kids]) > 1.3 * np.mean([p.eye_size / p.head_w for p in adults])
    assert np.mean([p.head_aspect for p in kids]) < np.mean([p.head_aspect for p in adults]) - 0.1


def test_smile_lines_look_like_wrinkles():
    p = sample_face_params(np.random.default_rng(3), 25, "female", "caucasian", "slightlyhappy")
    p = dataclasses.replace(p, texture=0.0, angle=0.0, light_strength=0.0)
    flat = render_face(dataclasses.replace(p, smile_lines=0.0), 96)
    lined = render_face(dataclasses.replace(p, smile_lines=1.0), 96)
    assert _face_detail(lined) > _face_detail(flat)
    # the lines are darker strokes on the skin
    assert lined.astype(float).mean() < flat.astype(float).mean()


def test_render_face_is_pure_and_sized():
    p = sample_face_params(np.random.default_rng(0), 50, "female", "asian", "happy")
    a, b = render_face(p, 64), render_face(p, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert render_face(p, 224).shape == (224, 224, 3)


def test_too_small_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        write_synthetic(tmp_path / "x", n_train=1, n_valid=1, n_test=1, size=8)
