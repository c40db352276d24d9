"""Decoded-image cache: values, hit without decoding, invalidation on a changed source."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from test_data_loaders import write_csv_dataset, write_image

from fairage.data import cache, load_faces, load_images

COLOURS = [(255, 0, 0), (0, 128, 255), (10, 200, 30), (90, 90, 90), (250, 250, 5)]


@pytest.fixture()
def png_faces(tmp_path):
    """Five solid-colour 16 px PNGs (lossless, so decoded values are known exactly), all in train."""
    rows = [{"image": f"{k}.png", "age": 20 + k, "split": "train"} for k in range(len(COLOURS))]
    root = write_csv_dataset(tmp_path / "ds", rows)
    for k, rgb in enumerate(COLOURS):
        write_image(root / f"{k}.png", rgb, 16, fmt="PNG")
    return root, load_faces(root)


def test_values_order_and_default_location(png_faces):
    root, faces = png_faces
    shuffled = faces.iloc[[3, 0, 4, 1, 2]].reset_index(drop=True)
    images = load_images(shuffled, 8, workers=1, progress=False)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert isinstance(images, np.memmap) and not images.flags.writeable
    for i, k in enumerate([3, 0, 4, 1, 2]):  # row i = faces.iloc[i]
        assert (images[i] == np.array(COLOURS[k], dtype=np.uint8)).all()
    files = list((root / ".fairage_cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("train_8px_") and files[0].suffix == ".npy"


def test_hit_does_not_decode(png_faces, tmp_path, monkeypatch):
    _, faces = png_faces
    first = np.array(load_images(faces, 8, cache_dir=tmp_path / "c", workers=1, progress=False))

    def fail(path, size):
        raise AssertionError(f"decoded {path} on a cache hit")

    monkeypatch.setattr(cache, "decode_image", fail)
    again = load_images(faces, 8, cache_dir=tmp_path / "c", workers=1, progress=False)
    np.testing.assert_array_equal(again, first)
    # another size is another cache entry, so it must decode
    with pytest.raises(AssertionError, match="decoded"):
        load_images(faces, 4, cache_dir=tmp_path / "c", workers=1, progress=False)


def test_changed_source_invalidates(png_faces, tmp_path):
    root, faces = png_faces
    cdir = tmp_path / "c"
    before = np.array(load_images(faces, 8, cache_dir=cdir, workers=1, progress=False))
    write_image(root / "2.png", (1, 2, 3), 16, fmt="PNG")
    st = os.stat(root / "2.png")
    os.utime(root / "2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clearly later mtime
    after = load_images(faces, 8, cache_dir=cdir, workers=1, progress=False)
    assert (after[2] == np.array([1, 2, 3], dtype=np.uint8)).all()
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    # the stale entry is gone and no temporary file is left behind
    assert list(cdir.iterdir()) == [cache.cache_file(faces, 8, cdir)]
    # a different selection of the same split has its own entry, next to the first
    load_images(faces.iloc[:2], 8, cache_dir=cdir, workers=1, progress=False)
    assert len(list(cdir.iterdir())) == 2
    assert (load_images(faces, 8, cache_dir=cdir, workers=1, progress=False)[2] == [1, 2, 3]).all()
    assert len(list(cdir.iterdir())) == 2


def test_workers_give_the_same_array(png_faces, tmp_path, monkeypatch):
    _, faces = png_faces
    monkeypatch.setattr(cache, "_CHUNK", 2)  # several chunks, so the pool is used
    one = np.array(load_images(faces, 8, cache_dir=tmp_path / "a", workers=1, progress=False))
    two = np.array(load_images(faces, 8, cache_dir=tmp_path / "b", workers=2, progress=False))
    np.testing.assert_array_equal(one, two)


def test_resize_matches_pillow(tmp_path):
    """A JPEG decoded at another size equals Pillow's own decode + bilinear resize."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    faces = pd.DataFrame(
        {"image": ["x.png"], "age": [30.0], "split": ["test"], "path": [str(tmp_path / "x.png")], "frame": [-1]}
    )
    got = load_images(faces, 16, cache_dir=tmp_path / "c", workers=1, progress=False)
    want = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got[0], want)


def test_missing_source_is_a_data_error(png_faces, tmp_path):
    from fairage.errors import DataError

    root, faces = png_faces
    (root / "1.png").unlink()
    with pytest.raises(DataError, match=r"1\.png: image file not found"):
        load_images(faces, 8, cache_dir=tmp_path / "c", workers=1, progress=False)
