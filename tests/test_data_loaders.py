"""Loaders: each layout on tiny hand-written fixtures, auto-detection, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fairage.data import detect_layout, load_faces, load_images, stratified_split
from fairage.data.schema import FACE_COLUMNS, UNKNOWN
from fairage.errors import DataError

# --------------------------------------------------------------------------- fixture writers
# (also imported by test_data_cache.py and test_cli_data.py)


def write_image(path: Path, rgb=(200, 100, 50), size: int = 16, fmt: str | None = None) -> Path:
    """A solid-colour image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), tuple(rgb)).save(path, format=fmt)
    return path


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


APPA_GT = {
    "train": [("000000.jpg", 30, 25.5, 3.1, 24), ("000001.jpg", 41, 61.0, 5.0, 65), ("000002.jpg", 25, 8.25, 1.0, 8)],
    "valid": [("000000.jpg", 35, 40.0, 4.0, 38)],
    "test": [("000000.jpg", 38, 19.0, 2.0, 20), ("000001.jpg", 22, 33.5, 3.5, 30)],
}
APPA_CATS = {
    # file, gender, race, makeup, time, happiness (capitals and spaces as users have them)
    "train": [
        ("000000.jpg", "male", "caucasian", "nomakeup", "modernphoto", "neutral"),
        ("000001.jpg", "Female", " asian", "makeup", "modernphoto", "happy"),
        ("000002.jpg", "male", "afroamerican", "nomakeup", "oldphoto", "slightlyhappy"),
    ],
    "valid": [("000000.jpg", "female", "caucasian", "makeup", "modernphoto", "other")],
    "test": [
        ("000000.jpg", "male", "caucasian", "nomakeup", "modernphoto", "happy"),
        ("000001.jpg", "female", "asian", "nomakeup", "modernphoto", "neutral"),
    ],
}


def write_appa(root: Path, cats: dict | None = None) -> Path:
    """Tiny APPA-REAL release layout: 3 train, 1 valid, 2 test faces (16 px crops, 24 px photos)."""
    cats = APPA_CATS if cats is None else cats
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in APPA_GT.items():
        pd.DataFrame(
            rows, columns=["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]
        ).to_csv(root / f"gt_avg_{split}.csv", index=False)
        if split in cats:
            pd.DataFrame(cats[split], columns=["file", "gender", "race", "makeup", "time", "happiness"]).to_csv(
                root / f"allcategories_{split}.csv", index=False
            )
        for k, row in enumerate(rows):
            write_image(root / split / f"{row[0]}_face.jpg", (10 * k, 100, 200), 16)
            write_image(root / split / row[0], (10 * k, 100, 200), 24)
    return root


NPY_META = {
    "train": [["male", "caucasian", "neutral"], ["female", "asian", "happy"], ["female", "afroamerican", "other"]],
    "test": [["male", "asian", "slightlyhappy"], ["female", "caucasian", "neutral"]],
}


def write_npy(root: Path, size: int = 8) -> dict[str, np.ndarray]:
    """Tiny course-npy layout (train 3, test 2); returns the BGR arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s, meta in NPY_META.items():
        n = len(meta)
        data = np.random.default_rng(len(s)).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        np.save(root / f"data_{s}.npy", data)
        np.save(root / f"labels_{s}.npy", np.arange(n, dtype=np.float32) * 10 + 5)
        np.save(root / f"meta_data_{s}.npy", np.array(meta))
        arrays[s] = data
    return arrays


# --------------------------------------------------------------------------- appa


def test_appa_release_layout(tmp_path):
    root = write_appa(tmp_path / "appa")
    assert detect_layout(root) == "appa"
    faces = load_faces(root)
    assert list(faces.columns[: len(FACE_COLUMNS)]) == list(FACE_COLUMNS)
    assert faces["split"].tolist() == ["train"] * 3 + ["valid"] + ["test"] * 2
    assert faces["image"].tolist() == [
        "000000.jpg",
        "000001.jpg",
        "000002.jpg",
        "000000.jpg",
        "000000.jpg",
        "000001.jpg",
    ]
    assert faces["age"].tolist() == [25.5, 61.0, 8.25, 40.0, 19.0, 33.5]  # apparent_age_avg
    assert faces["real_age"].tolist() == [24, 65, 8, 38, 20, 30]
    assert faces["age_std"].tolist() == [3.1, 5.0, 1.0, 4.0, 2.0, 3.5]
    assert faces["gender"].tolist() == ["male", "female", "male", "female", "male", "female"]
    # race -> ethnicity, happiness -> expression, normalised to lower case without spaces
    assert faces["ethnicity"].tolist() == ["caucasian", "asian", "afroamerican", "caucasian", "caucasian", "asian"]
    assert faces["expression"].tolist() == ["neutral", "happy", "slightlyhappy", "other", "happy", "neutral"]
    assert faces["makeup"].tolist()[:2] == ["nomakeup", "makeup"]
    assert faces["frame"].tolist() == [-1] * 6
    assert faces["path"].iloc[1] == str((root / "train" / "000001.jpg_face.jpg").resolve())

    real = load_faces(root, target="real")
    assert real["age"].tolist() == [24, 65, 8, 38, 20, 30]
    full = load_faces(root, full_images=True)
    assert full["path"].iloc[1] == str((root / "train" / "000001.jpg").resolve())
    assert load_images(full.iloc[:1], 24, progress=False, workers=1).shape == (1, 24, 24, 3)


def test_appa_without_categories_is_unknown(tmp_path):
    root = write_appa(tmp_path / "appa", cats={})
    faces = load_faces(root)
    for attribute in ("gender", "ethnicity", "expression"):
        assert set(faces[attribute]) == {UNKNOWN}


def test_appa_unknown_attribute_value(tmp_path):
    cats = {k: list(v) for k, v in APPA_CATS.items()}
    cats["test"] = [cats["test"][0], ("000001.jpg", "female", "hispanic", "nomakeup", "modernphoto", "neutral")]
    root = write_appa(tmp_path / "appa", cats=cats)
    with pytest.raises(DataError, match=r"allcategories_test\.csv: row 3: ethnicity value 'hispanic'"):
        load_faces(root, extra_categories="error")
    assert load_faces(root)["ethnicity"].iloc[-1] == "hispanic"  # groups come from the data by default
    kept = load_faces(root, extra_categories="keep")
    assert kept["ethnicity"].iloc[-1] == "hispanic"
    mapped = load_faces(root, extra_categories="unknown")
    assert mapped["ethnicity"].iloc[-1] == UNKNOWN
    assert load_faces(root, extra_categories={"hispanic": "caucasian"})["ethnicity"].iloc[-1] == "caucasian"


@pytest.mark.parametrize("age, shown", [("", "nan"), ("121", "121"), ("-1", "-1"), ("abc", "abc")])
def test_appa_bad_age(tmp_path, age, shown):
    root = write_appa(tmp_path / "appa")
    gt = pd.read_csv(root / "gt_avg_valid.csv", dtype=str)
    gt.loc[0, "apparent_age_avg"] = age
    gt.to_csv(root / "gt_avg_valid.csv", index=False)
    with pytest.raises(DataError, match=rf"gt_avg_valid\.csv: row 2: apparent_age_avg .*{shown}"):
        load_faces(root)


def test_appa_missing_column_and_missing_image(tmp_path):
    root = write_appa(tmp_path / "appa")
    pd.read_csv(root / "gt_avg_test.csv").drop(columns="apparent_age_avg").to_csv(root / "gt_avg_test.csv", index=False)
    with pytest.raises(DataError, match=r"gt_avg_test\.csv: missing required column\(s\) apparent_age_avg"):
        load_faces(root)

    root = write_appa(tmp_path / "appa2")
    (root / "train" / "000001.jpg_face.jpg").unlink()
    with pytest.raises(DataError, match=r"000001\.jpg_face\.jpg: file not found"):
        load_faces(root)
    faces = load_faces(root, skip_bad=True)
    assert len(faces) == 5 and "000001.jpg" not in faces.loc[faces["split"] == "train", "image"].tolist()
    assert len(faces.attrs["skipped"]) == 1 and "000001.jpg_face.jpg" in faces.attrs["skipped"][0]


def test_corrupt_and_truncated_images(tmp_path):
    root = write_appa(tmp_path / "appa")
    (root / "train" / "000000.jpg_face.jpg").write_bytes(b"this is not a jpeg")
    whole = jpeg_bytes()
    (root / "test" / "000001.jpg_face.jpg").write_bytes(whole[: len(whole) // 2])
    faces = load_faces(root)  # files exist: decoding happens in load_images
    with pytest.raises(DataError, match=r"train/000000\.jpg_face\.jpg: cannot decode image"):
        load_images(faces[faces["split"] == "train"], 16, workers=1, progress=False, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"test/000001\.jpg_face\.jpg: cannot decode image.*truncated"):
        load_images(faces[faces["split"] == "test"], 16, workers=1, progress=False, cache_dir=tmp_path / "c")
    kept = load_faces(root, skip_bad=True)
    assert len(kept) == 4
    assert sorted(s.split(":")[0] for s in kept.attrs["skipped"]) == sorted(
        [
            str((root / "train" / "000000.jpg_face.jpg").resolve()),
            str((root / "test" / "000001.jpg_face.jpg").resolve()),
        ]
    )
    assert load_images(kept, 16, workers=1, progress=False).shape == (4, 16, 16, 3)


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="nope: dataset folder not found"):
        load_faces(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown layout 'foo'"):
        load_faces(tmp_path / "empty", layout="foo")


# --------------------------------------------------------------------------- npy


def test_npy_layout_memmaps_and_serves_rgb(tmp_path):
    root = tmp_path / "npy"
    arrays = write_npy(root)
    assert detect_layout(root) == "npy"
    faces = load_faces(root)
    assert faces["split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert faces["image"].tolist() == ["0", "1", "2", "0", "1"]
    assert faces["frame"].tolist() == [0, 1, 2, 0, 1]
    assert faces["age"].tolist() == [5, 15, 25, 5, 15]
    assert faces["ethnicity"].tolist() == ["caucasian", "asian", "afroamerican", "asian", "caucasian"]
    assert faces["path"].iloc[3] == str((root / "data_test.npy").resolve())
    test = faces[faces["split"] == "test"]
    images = load_images(test, 8, progress=False)
    # channel order reversed: BGR in the file, RGB served
    np.testing.assert_array_equal(images[:, :, :, 0], arrays["test"][:, :, :, 2])
    np.testing.assert_array_equal(images[:, :, :, 2], arrays["test"][:, :, :, 0])
    small = load_images(test, 4, progress=False)
    assert small.shape == (2, 4, 4, 3)
    # area interpolation by 2 = mean of each 2x2 block (rounded)
    block = arrays["test"][0, :2, :2, ::-1].reshape(4, 3).mean(axis=0)
    np.testing.assert_allclose(small[0, 0, 0], block, atol=1)


def test_npy_length_mismatch_and_bad_values(tmp_path):
    root = tmp_path / "npy"
    write_npy(root)
    np.save(root / "labels_test.npy", np.array([10.0, 20.0, 30.0]))
    with pytest.raises(
        DataError, match=r"different lengths: data_test\.npy 2, labels_test\.npy 3, meta_data_test\.npy 2"
    ):
        load_faces(root)
    np.save(root / "labels_test.npy", np.array([10.0, np.nan]))
    with pytest.raises(DataError, match=r"labels_test\.npy: row 1: age"):
        load_faces(root)
    np.save(root / "labels_test.npy", np.array([10.0, 20.0]))
    np.save(root / "meta_data_test.npy", np.array([["male", "asian", "neutral"], ["man", "asian", "neutral"]]))
    with pytest.raises(DataError, match=r"meta_data_test\.npy: row 1: gender value 'man'"):
        load_faces(root, extra_categories="error")
    np.save(root / "meta_data_test.npy", np.array([["male", "asian", "neutral"], ["x", 1, None]], dtype=object))
    with pytest.raises(DataError, match=r"meta_data_test\.npy: cannot read without unpickling"):
        load_faces(root)
    (root / "labels_test.npy").unlink()
    with pytest.raises(DataError, match=r"labels_test\.npy: file not found"):
        load_faces(root)


# --------------------------------------------------------------------------- utkface


def write_utk(root: Path, names: list[str]) -> Path:
    for k, name in enumerate(names):
        write_image(root / name, (k % 256, 0, 0), 16)
    return root


def test_utkface_layout(tmp_path):
    names = ["26_0_0_20170116.jpg.chip.jpg", "3_1_1_20161219.jpg", "70_1_2_20170109.jpg"]
    root = write_utk(tmp_path / "utk", names)
    assert detect_layout(root) == "utkface"
    faces = load_faces(root).set_index("image")
    assert faces.loc[names[0], ["age", "gender", "ethnicity", "expression"]].tolist() == [
        26,
        "male",
        "caucasian",
        UNKNOWN,
    ]
    assert faces.loc[names[1], ["age", "gender", "ethnicity"]].tolist() == [3, "female", "afroamerican"]
    assert faces.loc[names[2], ["age", "gender", "ethnicity"]].tolist() == [70, "female", "asian"]


def test_utkface_extra_races_and_bad_names(tmp_path):
    root = write_utk(tmp_path / "utk", ["30_0_3_2017.jpg", "40_1_4_2017.jpg", "50_1_2_2017.jpg"])
    with pytest.raises(DataError, match=r"30_0_3_2017\.jpg: ethnicity 'indian'"):
        load_faces(root, extra_categories="error")
    kept = load_faces(root).set_index("image")  # all five race codes load with no flag
    assert kept.loc["30_0_3_2017.jpg", "ethnicity"] == "indian" and kept.loc["40_1_4_2017.jpg", "ethnicity"] == "others"
    unk = load_faces(root, extra_categories="unknown").set_index("image")
    assert unk.loc["40_1_4_2017.jpg", "ethnicity"] == UNKNOWN
    mapped = load_faces(root, extra_categories={"indian": "asian", "others": "unknown"}).set_index("image")
    assert mapped.loc["30_0_3_2017.jpg", "ethnicity"] == "asian"

    write_image(root / "30_2_0_2017.jpg")
    with pytest.raises(DataError, match=r"30_2_0_2017\.jpg: not a UTKFace file name"):
        load_faces(root, layout="utkface", extra_categories="keep")
    skipped = load_faces(root, extra_categories="keep", skip_bad=True)
    assert len(skipped) == 3 and len(skipped.attrs["skipped"]) == 1
    assert "30_2_0_2017.jpg: not a UTKFace file name" in skipped.attrs["skipped"][0]
    (root / "30_2_0_2017.jpg").unlink()
    write_image(root / "150_0_0_2017.jpg")
    with pytest.raises(DataError, match=r"150_0_0_2017\.jpg.*'150' is not an age"):
        load_faces(root, extra_categories="keep")


def test_stratified_split_is_seeded_and_stratified():
    ages = np.array([10.0] * 100 + [30.0] * 50)
    eth = np.array(["asian"] * 50 + ["caucasian"] * 50 + ["caucasian"] * 50)
    split = stratified_split(ages, eth, seed=0)
    for stratum in (slice(0, 50), slice(50, 100), slice(100, 150)):
        counts = pd.Series(split[stratum]).value_counts()
        assert counts.to_dict() == {"train": 35, "test": 10, "valid": 5}  # 70/10/20 of 50
    np.testing.assert_array_equal(split, stratified_split(ages, eth, seed=0))
    assert (split != stratified_split(ages, eth, seed=1)).any()


# --------------------------------------------------------------------------- csv


def write_csv_dataset(root: Path, rows: list[dict], name: str = "faces.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, row in enumerate(rows):
        write_image(root / row["image"], (20 * k, 50, 90), 16, fmt="PNG")
    pd.DataFrame(rows).to_csv(root / name, index=False)
    return root


CSV_ROWS = [
    {"image": "a/1.png", "age": 12, "gender": "female", "ethnicity": "asian", "split": "train"},
    {"image": "a/2.png", "age": 45.5, "gender": "male", "ethnicity": "caucasian", "split": "test"},
    {"image": "b/3.png", "age": 80, "gender": "", "ethnicity": "caucasian", "split": "train"},
    {"image": "b/4.png", "age": 33, "gender": "male", "ethnicity": "afroamerican", "split": "valid"},
]


def test_csv_layout(tmp_path):
    root = write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    assert detect_layout(root) == "csv"
    faces = load_faces(root)
    assert faces["image"].tolist() == ["a/1.png", "b/3.png", "b/4.png", "a/2.png"]  # train, valid, test
    assert faces["age"].tolist() == [12, 80, 33, 45.5]
    assert faces["gender"].tolist() == ["female", UNKNOWN, "male", "male"]
    assert set(faces["expression"]) == {UNKNOWN}
    assert faces["path"].iloc[1] == str((root / "b" / "3.png").resolve())
    # the CSV file itself, under another name
    (root / "faces.csv").rename(root / "mine.csv")
    assert detect_layout(root / "mine.csv") == "csv"
    assert load_faces(root / "mine.csv")["image"].tolist() == faces["image"].tolist()


def test_csv_without_split_column_gets_stratified_split(tmp_path):
    rows = [{"image": f"{k}.png", "age": 20 + k % 30} for k in range(40)]
    root = write_csv_dataset(tmp_path / "csv", rows, name="labels.csv")
    faces = load_faces(root, seed=3)
    assert faces["split"].value_counts().to_dict() == {"train": 28, "test": 8, "valid": 4}
    assert load_faces(root, seed=3)["image"].tolist() == faces["image"].tolist()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda df: df.drop(columns="age"), r"faces\.csv: missing required column\(s\) age"),
        (lambda df: df.assign(age=[12, None, 80, 33]), r"faces\.csv: row 3: age"),
        (lambda df: df.assign(age=[12, 45, 130, 33]), r"faces\.csv: row 4: age '130' is not an age"),
        (
            lambda df: df.assign(ethnicity=["asian", "martian", "asian", "asian"]),
            r"faces\.csv: row 3: ethnicity value 'martian'",
        ),
        (lambda df: df.assign(split=["train", "training", "test", "test"]), r"faces\.csv: row 3: split 'training'"),
    ],
)
def test_csv_bad_input(tmp_path, edit, message):
    root = write_csv_dataset(tmp_path / "csv", CSV_ROWS)
    edit(pd.read_csv(root / "faces.csv")).to_csv(root / "faces.csv", index=False)
    with pytest.raises(DataError, match=message):
        load_faces(root, extra_categories="error")
