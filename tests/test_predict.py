"""fairage predict / export and the fairage.inference.predictor API on a tiny trained run and real photos.

Real photo: matplotlib's sample ``grace_hopper.jpg`` (one face, box marked by hand:
``GRACE_BOX``). Group pictures are composed from it; EXIF-rotated copies carry the
pixels rotated with the orientation tag that undoes the rotation.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from typer.testing import CliRunner

from fairage.cli import app
from fairage.config.presets import load_preset
from fairage.data import write_synthetic
from fairage.errors import ConfigError, DataError
from fairage.inference.detect import available_detectors, detect_faces, make_detector
from fairage.inference.predictor import (
    AgePredictor,
    annotated_path,
    crop_box,
    crop_face,
    expand_inputs,
    load_model,
    read_face,
    read_image,
)
from fairage.training import train

GRACE = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
#: the face in grace_hopper.jpg (x, y, w, h), marked by hand
GRACE_BOX = (180, 121, 175, 211)


def near(box, truth, tol: float = 0.3) -> bool:
    """Same face: centres within ``tol`` of the true side, sides within a factor 1.6."""
    side, tside = np.sqrt(box[2] * box[3]), np.sqrt(truth[2] * truth[3])
    dist = np.hypot(box[0] + box[2] / 2 - truth[0] - truth[2] / 2, box[1] + box[3] / 2 - truth[1] - truth[3] / 2)
    return dist <= tol * tside and 1 / 1.6 <= side / tside <= 1.6


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (M1: stage II only, resnet18 at 32 px) and its synthetic dataset (48 px JPEGs)."""
    root = tmp_path_factory.mktemp("predict")
    data = write_synthetic(root / "data", n_train=48, n_valid=16, n_test=16, size=48, seed=0, workers=1)
    cfg = load_preset("M1", "tiny", ["eval.n_boot=10", "stage2.max_epochs=1"])
    train(cfg, data, root / "run", progress=False)
    return root / "run", data


@pytest.fixture(scope="module")
def predictor(run) -> AgePredictor:
    return AgePredictor(run[0], detector="haar", device="cpu", batch_size=8)


def plain_torch_ages(model, crops: np.ndarray) -> np.ndarray:
    """Reference: the model on (N, S, S, 3) uint8 crops, one batch, written out by hand."""
    x = torch.from_numpy(crops.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return np.clip(model.years(model(x)).double().numpy(), 0.0, 150.0)


# --------------------------------------------------------------------------- images


def test_read_image_modes_exif_and_bad_input(tmp_path, monkeypatch):
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    # EXIF orientation 6 = "rotate 90 degrees clockwise to display": store the picture rotated counter-clockwise
    stored = Image.fromarray(np.rot90(rgb, 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "rotated.png"), rgb)
    # grayscale, transparency (on white), CMYK, 16-bit, bytes
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png")[0], [[0, 0, 0], [128, 128, 128], [255, 255, 255]])
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_image(tmp_path / "alpha.png")[0], [[10, 20, 30], [255, 255, 255]])
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure red
    red = read_image(tmp_path / "cmyk.jpg")
    assert red.shape == (2, 2, 3) and (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png")[0], [[0, 0, 0], [255, 255, 255]])
    np.testing.assert_array_equal(read_image((tmp_path / "gray.png").read_bytes()), read_image(tmp_path / "gray.png"))
    # bad input: one DataError naming the file
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match="text.jpg"):
        read_image(tmp_path / "text.jpg")
    good = io.BytesIO()
    Image.fromarray(rgb).resize((64, 64)).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="<bytes>"):
        read_image(b"\x89PNG garbage")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")
    # decompression bombs: refused above Pillow's pixel limit (lowered here to 100 pixels)
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="bomb.png.*too many pixels"):
        read_image(tmp_path / "bomb.png")


def test_crop_box_and_crop_face_by_hand():
    # box 30 x 40 at (10, 20): side 40 * (1 + 2 * 0.4) = 72, centred on (25, 40)
    assert crop_box((10, 20, 30, 40)) == (25 - 36, 40 - 36, 72)
    rgb = np.zeros((100, 100, 3), np.uint8)
    rgb[40:60, 40:60] = 200  # a 20 px square "face", box exactly on it
    crop = crop_face(rgb, (40, 40, 20, 20), size=36)  # side 36 = the crop size: no resampling
    expected = np.zeros((36, 36, 3), np.uint8)
    expected[8:28, 8:28] = 200
    np.testing.assert_array_equal(crop, expected)
    # a box at the corner: the outside of the photo is black
    corner = crop_face(np.full((50, 50, 3), 255, np.uint8), (0, 0, 10, 10), size=18)
    assert (corner[:4, :4] == 0).all() and (corner[4:, 4:] == 255).all()


def test_expand_inputs_folders_globs_and_labels(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt", "z.webp"):
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([tmp_path / "a", str(tmp_path / "*.webp"), tmp_path / "a" / "x.jpg"])
    assert [label for _, label in files] == ["b/y.PNG", "x.jpg", str(tmp_path / "z.webp")]
    with pytest.raises(DataError, match="no such file"):
        expand_inputs([tmp_path / "nothing.jpg"])
    with pytest.raises(DataError, match="no files match"):
        expand_inputs([str(tmp_path / "*.gif")])


def test_expand_inputs_keeps_labels_unique(tmp_path, monkeypatch):
    # two camera folders with the same file names: the second folder's labels carry the folder
    for name in ("cam1/IMG_1.jpg", "cam1/IMG_2.jpg", "cam2/IMG_1.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    cam1, cam2 = tmp_path / "cam1", tmp_path / "cam2"
    files = expand_inputs([cam1, cam2])
    assert [label for _, label in files] == ["IMG_1.jpg", "IMG_2.jpg", f"{cam2.as_posix()}/IMG_1.jpg"]
    assert len({annotated_path(tmp_path / "out", label) for _, label in files}) == 3
    # a label that stays taken is refused, naming both files: A's cam2/IMG_1.jpg, then cam2's own
    (tmp_path / "A" / "cam2").mkdir(parents=True)
    (tmp_path / "A" / "cam2" / "IMG_1.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"cam2/IMG_1.jpg and A/cam2/IMG_1.jpg would both be labelled 'cam2/IMG_1.jpg'"):
        expand_inputs(["A", "cam1", "cam2"])


# --------------------------------------------------------------------------- detectors


@pytest.mark.parametrize("name", ["haar", "yunet", "dlib"])
def test_detectors_find_the_real_face(name):
    if name not in available_detectors():
        pytest.skip(f"{name} not installed")
    rgb = read_image(GRACE)
    boxes = make_detector(name).detect(rgb)
    assert len(boxes) == 1 and near(boxes[0], GRACE_BOX)
    # a large photo is downscaled for detection; boxes come back in its own pixels
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 3, rgb.shape[0] * 3)))
    (box,) = detect_faces(make_detector(name), big, max_side=600)
    assert near(box, tuple(3 * v for v in GRACE_BOX))


def test_unknown_detector_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown detector 'retina'"):
        make_detector("retina")


# --------------------------------------------------------------------------- predictor


def test_faces_mode_on_the_test_split_equals_the_runs_predictions(run):
    run_dir, data = run
    out = run_dir.parent / "faces.csv"
    result = CliRunner().invoke(
        app, ["predict", str(run_dir), str(data / "test" / "*_face.jpg"), "--faces", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "16 face crops, 0 unreadable" in result.output
    table = pd.read_csv(out)
    # the run carries a conformal calibration, so its interval follows the age
    assert list(table.columns) == ["image", "age", "age_lo", "age_hi"]
    table["id"] = [Path(p).name.removesuffix("_face.jpg") for p in table["image"]]
    reference = pd.read_csv(run_dir / "predictions_test.csv", dtype={"image": str})
    joined = reference.merge(
        table.rename(columns={"image": "path", "age": "predicted"}), left_on="image", right_on="id"
    )
    assert len(joined) == len(reference) == 16
    np.testing.assert_allclose(joined["predicted"], joined["prediction"], atol=1e-4)
    # the file plugs into evaluate: APPA-REAL crop names <id>_face.jpg are matched to the faces
    import json

    scores = CliRunner().invoke(
        app, ["evaluate", "--data", str(data), "--predictions", str(out), "--json", "--n-boot", "0"]
    )
    assert scores.exit_code == 0, scores.output
    expected_mae = np.abs(joined["predicted"] - joined["age"]).mean()
    assert json.loads(scores.stdout)["mae"] == pytest.approx(expected_mae, abs=1e-6)


def test_predict_crops_matches_a_plain_torch_loop(predictor, run):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, size=(11, 32, 32, 3), dtype=np.uint8)
    expected = plain_torch_ages(predictor.loaded.model, crops)
    np.testing.assert_allclose(predictor.predict_crops(crops), expected, atol=1e-4)  # batches of 8: 8 + 3
    np.testing.assert_allclose(predictor.predict_crops(list(crops)), expected, atol=1e-4)
    # crops of another size are resized as the training cache resizes (Pillow bilinear)
    big = [np.asarray(Image.fromarray(c).resize((64, 64), Image.Resampling.NEAREST)) for c in crops[:3]]
    resized = np.stack([np.asarray(Image.fromarray(b).resize((32, 32), Image.Resampling.BILINEAR)) for b in big])
    np.testing.assert_allclose(
        predictor.predict_crops(big), plain_torch_ages(predictor.loaded.model, resized), atol=1e-4
    )


def test_predict_image_on_a_real_photo(predictor):
    result = predictor.predict_image(GRACE)
    assert (result.width, result.height) == (512, 600)
    (face,) = result.faces
    assert near(face.box, GRACE_BOX)
    # the age is the model's on the 40%-enlarged square crop around that box
    x, y, w, h = face.box
    x0, y0 = round(x + w / 2 - 0.9 * max(w, h)), round(y + h / 2 - 0.9 * max(w, h))
    side = round(1.8 * max(w, h))
    rgb = read_image(GRACE)
    assert 0 <= x0 and 0 <= y0 and x0 + side <= 512 and y0 + side <= 600  # inside: no padding
    crop = np.asarray(Image.fromarray(rgb[y0 : y0 + side, x0 : x0 + side]).resize((32, 32), Image.Resampling.BILINEAR))
    assert face.age == pytest.approx(plain_torch_ages(predictor.loaded.model, crop[None])[0], abs=1e-4)
    # numpy array, PIL image and bytes give the same answer
    for image in (rgb, Image.open(GRACE), GRACE.read_bytes()):
        assert predictor.predict_image(image).faces == result.faces
    # as a face crop: one face, the whole image, in its own pixels
    crop_result = predictor.predict_image(GRACE, faces_only=True)
    assert (crop_result.width, crop_result.height) == (512, 600) and crop_result.faces[0].box == (0, 0, 512, 600)
    from fairage.data.cache import decode_image  # the training cache's decoding

    expected = plain_torch_ages(predictor.loaded.model, decode_image(str(GRACE), 32)[None])[0]
    assert crop_result.faces[0].age == pytest.approx(expected, abs=1e-4)


def test_group_picture_and_exif_rotated_copy(predictor, tmp_path):
    rgb = read_image(GRACE)
    canvas = np.full((700, 1400, 3), 90, np.uint8)
    canvas[0:600, 0:512] = rgb
    small = np.asarray(Image.fromarray(rgb).resize((307, 360), Image.Resampling.LANCZOS))  # x0.6
    canvas[50:410, 600:907] = small
    canvas[0:600, 900 : 1412 - 12] = rgb[:, ::-1][:, :500]  # mirrored, its right edge cut off
    truth = [
        GRACE_BOX,
        (600 + 0.6 * GRACE_BOX[0], 50 + 0.6 * GRACE_BOX[1], 0.6 * GRACE_BOX[2], 0.6 * GRACE_BOX[3]),
        (900 + 512 - GRACE_BOX[0] - GRACE_BOX[2], GRACE_BOX[1], GRACE_BOX[2], GRACE_BOX[3]),
    ]
    Image.fromarray(canvas).save(tmp_path / "group.png")
    result = predictor.predict_image(tmp_path / "group.png")
    assert len(result.faces) == 3
    for box in truth:
        assert sum(near(f.box, box) for f in result.faces) == 1
    # stored rotated with the tag that undoes it: same boxes and ages in the corrected orientation
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    Image.fromarray(np.rot90(canvas, -1).copy()).save(tmp_path / "rotated.png", exif=exif)
    rotated = predictor.predict_image(tmp_path / "rotated.png")
    assert (rotated.width, rotated.height) == (1400, 700)
    assert rotated.faces == result.faces


def test_predict_cli_detect_mode_annotations_and_bad_files(run, tmp_path):
    run_dir, _ = run
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "sub" / "grace.jpg").write_bytes(GRACE.read_bytes())
    Image.new("RGB", (120, 80), (30, 120, 200)).save(photos / "sky.png")  # no face
    (photos / "broken.jpg").write_text("not an image")
    out, drawn = tmp_path / "p.csv", tmp_path / "drawn"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(run_dir),
            str(photos),
            "--out",
            str(out),
            "--quiet",
            "--detector",
            "haar",
            "--annotate",
            str(drawn),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 photos, 1 faces, 1 photos without a face, 1 unreadable files" in result.output
    assert "broken.jpg" in result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["image", "face", "x", "y", "w", "h", "score", "age", "age_lo", "age_hi"]
    assert table["image"].tolist() == ["sky.png", "sub/grace.jpg"]
    assert table.loc[0, ["face", "x", "age"]].isna().all()
    grace = table.iloc[1]
    assert grace["face"] == 0 and near((grace["x"], grace["y"], grace["w"], grace["h"]), GRACE_BOX)
    assert Image.open(drawn / "sub" / "grace.jpg").size == (512, 600)
    assert (drawn / "sky.png").is_file()


def test_predict_cli_nothing_readable_exits_2_and_writes_nothing(run, tmp_path):
    (tmp_path / "a.jpg").write_text("no")
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(run[0]), str(tmp_path / "a.jpg"), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "none of the 1 input file(s) could be read" in result.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a.jpg"]
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path / "a.jpg"), "--out", str(out)])
    assert result.exit_code == 2 and "not a fairage model" in result.output


# --------------------------------------------------------------------------- model folder and export


def test_model_folder_loads_like_the_run(run, predictor, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.yaml").write_text((run[0] / "config.yaml").read_text())
    save_file(
        {k: v.contiguous() for k, v in predictor.loaded.model.state_dict().items()}, str(folder / "model.safetensors")
    )
    loaded = load_model(folder)
    assert loaded.kind == "folder" and loaded.image_size == 32 and loaded.run_dir is None
    crops = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        AgePredictor(loaded, device="cpu").predict_crops(crops), predictor.predict_crops(crops), atol=1e-6
    )
    # evaluate on a model folder predicts the split first; the same scores as the run's own predictions
    import json

    args = ["--data", str(run[1]), "--json", "--n-boot", "0"]
    from_folder = CliRunner().invoke(app, ["evaluate", str(folder), *args])
    from_run = CliRunner().invoke(app, ["evaluate", str(run[0]), *args])
    assert from_folder.exit_code == 0 and from_run.exit_code == 0, from_folder.output + from_run.output
    folder_scores, run_scores = json.loads(from_folder.stdout), json.loads(from_run.stdout)
    assert folder_scores["n"] == run_scores["n"] == 16
    assert folder_scores["mae"] == pytest.approx(run_scores["mae"], abs=1e-4)
    assert folder_scores["bias"]["age"] == pytest.approx(run_scores["bias"]["age"], abs=1e-4)
    missing = CliRunner().invoke(app, ["evaluate", str(folder)])
    assert missing.exit_code == 2 and "model folder" in missing.output


def test_evaluate_a_run_on_another_split_and_dataset(run, predictor, tmp_path):
    """Its predictions_test.csv covers its own test split; elsewhere the run's model predicts first."""
    import json

    from fairage.data import load_faces, load_images

    run_dir, data = run
    other = write_synthetic(tmp_path / "other", n_train=4, n_valid=4, n_test=20, size=48, seed=7, workers=1)
    for dataset, split, n in ((other, "test", 20), (data, "valid", 16)):
        res = CliRunner().invoke(
            app,
            [
                "evaluate",
                str(run_dir),
                "--data",
                str(dataset),
                "--split",
                split,
                "--json",
                "--n-boot",
                "0",
                "--n-perm",
                "0",
            ],
        )
        assert res.exit_code == 0, res.output
        scores = json.loads(res.stdout)
        # by hand: the predictor on the split's faces decoded as for training
        faces = load_faces(dataset).query("split == @split").reset_index(drop=True)
        ages = predictor.predict_crops(load_images(faces, 32))
        assert scores["n"] == n == len(faces)
        assert scores["mae"] == pytest.approx(np.abs(ages - faces["age"].to_numpy()).mean(), abs=1e-4)
    # its own test split still reads predictions_test.csv (no --data, or --data naming the same folder)
    own = json.loads((run_dir / "metrics_test.json").read_text())
    for extra in ([], ["--data", str(data)]):
        res = CliRunner().invoke(app, ["evaluate", str(run_dir), "--json", *extra])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == own


def test_export_onnx_and_torchscript_agree_with_torch(run, predictor, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.pt"
    result = CliRunner().invoke(app, ["export", str(run[0]), "--format", "onnx", "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert (
        meta["fairage_image_size"] == "32" and "[0, 1]" in meta["fairage_input"] and "years" in meta["fairage_output"]
    )
    crops = np.random.default_rng(2).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    expected = plain_torch_ages(predictor.loaded.model, crops)
    x = (crops.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    for n in (5, 1):  # dynamic batch
        (ages,) = session.run(None, {"image": x[:n]})
        np.testing.assert_allclose(ages, expected[:n], atol=0.01)
    # fairage runs the exported file itself
    exported = AgePredictor(onnx_path, detector="haar")
    assert exported.loaded.kind == "exported" and exported.image_size == 32
    np.testing.assert_allclose(exported.predict_crops(crops), expected, atol=0.01)
    assert exported.predict_image(GRACE).faces[0].age == pytest.approx(
        predictor.predict_image(GRACE).faces[0].age, abs=0.01
    )
    result = CliRunner().invoke(app, ["export", str(run[0]), "--format", "torchscript", "--out", str(ts_path)])
    assert result.exit_code == 0, result.output
    extra = {"fairage.json": ""}
    with pytest.warns(FutureWarning):  # torch marks TorchScript deprecated
        scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    assert b'"fairage_image_size": "32"' in extra["fairage.json"]
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), expected, atol=0.01)
    bad = CliRunner().invoke(app, ["export", str(run[0]), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert bad.exit_code == 2 and "unknown export format" in bad.output


def test_read_face_decodes_as_the_training_cache(run):
    from fairage.data.cache import decode_image

    path = min((run[1] / "test").glob("*_face.jpg"))
    np.testing.assert_array_equal(read_face(path, 32), decode_image(str(path), 32))


def test_run_folder_uses_the_last_completed_stage(run, tmp_path):
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    info = json.loads((copy / "run.json").read_text())
    assert info["completed_stages"] == ["stage2"] and load_model(copy).kind == "run"
    for completed, message in (([], "no stage completed yet"), (["stage1"], "checkpoints/stage1-best.ckpt")):
        (copy / "run.json").write_text(json.dumps({**info, "completed_stages": completed}))
        with pytest.raises(DataError, match=message):
            load_model(copy)
