"""Decoded-image cache: decode a face table's images once into a memory-mappable ``.npy``.

Decoding JPEGs every epoch starves a GPU, so ``load_images`` decodes the faces once
(in ``workers`` processes, with a progress bar) into a uint8 (N, S, S, 3) RGB array, writes
it atomically to ``<cache_dir>/<splits>_<S>px_<key>.npy`` and afterwards only memory-maps it.
The key hashes S and, for every face in order, its source path and frame, plus the size
and modification time of each source file, so a changed source file gives a new key
(and the stale entry of the same faces and size is removed; see ``cache_file``).

Image files are decoded by ``fairage.data.decode`` (the decoder of predict and serve: EXIF
orientation, bit depth, alpha, palette, CMYK, grey) and resized to S x S with Pillow
(bilinear with antialiasing; the faces are already crops, so a plain resize). The npy layout's arrays are already decoded: their rows
are converted BGR -> RGB (and resized with OpenCV's area interpolation when S differs from
the stored size) and cached the same way, so every layout is served as an RGB memmap.
"""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic
from ..errors import DataError
from .schema import SPLITS

CACHE_DIRNAME = ".fairage_cache"
_CACHE_VERSION = "fairage-cache-2"  # 2: the shared decoder (EXIF, 16-bit, alpha)
_CHUNK = 64  # images per worker task


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode the face image file at ``path`` into a uint8 (size, size, 3) RGB array.

    The decoder of ``fairage predict`` and ``fairage serve`` (``fairage.data.decode.decode_face``:
    EXIF orientation, 16-bit scaled, alpha on white, palette/CMYK/grey to RGB, bilinear
    resize). DataError naming the file if it is missing or cannot be decoded.
    """
    from .decode import decode_face

    try:
        return decode_face(path, size)[0]
    except DataError as err:
        reason = str(err).removeprefix(f"{path}: ")
        if reason == "file not found":
            raise DataError(f"{path}: image file not found") from None
        if not reason.startswith("cannot decode image"):
            reason = f"cannot decode image ({reason})"
        raise DataError(f"{path}: {reason}; --skip-bad (config data.skip_bad: true) drops bad images") from None


def _decode_chunk(args: tuple[list[str], int]) -> np.ndarray:
    paths, size = args
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode_image(p, size)
    return out


def _npy_rows(path: str, frames: np.ndarray, size: int) -> np.ndarray:
    """Rows ``frames`` of the BGR array at ``path`` as RGB uint8 (k, size, size, 3)."""
    import cv2

    data = np.load(path, mmap_mode="r", allow_pickle=False)
    rows = np.ascontiguousarray(data[frames][..., ::-1])  # BGR -> RGB
    if rows.shape[1:3] == (size, size):
        return rows
    return np.stack([cv2.resize(r, (size, size), interpolation=cv2.INTER_AREA) for r in rows])


def default_cache_dir(faces: pd.DataFrame) -> Path:
    """``<dataset root>/.fairage_cache`` (root from ``faces.attrs``, else the sources' common folder)."""
    root = faces.attrs.get("root")
    if root:
        root = Path(root)
        return (root.parent if root.is_file() else root) / CACHE_DIRNAME
    common = os.path.commonpath([os.path.dirname(p) for p in faces["path"].unique()])
    return Path(common) / CACHE_DIRNAME


def _rows_key(faces: pd.DataFrame) -> str:
    """Hex digest of which faces, in which order (source path and frame of every row)."""
    h = hashlib.sha256(_CACHE_VERSION.encode())
    for path, frame in zip(faces["path"], faces["frame"]):
        h.update(f"{path}\t{int(frame)}\n".encode())
    return h.hexdigest()


def cache_key(faces: pd.DataFrame, size: int) -> str:
    """Hex digest identifying the decoded array of ``faces`` at ``size`` px (see module doc)."""
    h = hashlib.sha256()
    h.update(f"{_CACHE_VERSION}\n{int(size)}\n{_rows_key(faces)}\n".encode())
    for path in sorted(faces["path"].unique()):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_file(faces: pd.DataFrame, size: int, cache_dir: str | os.PathLike) -> Path:
    """Where the cached array of ``faces`` at ``size`` px lives: ``<splits>_<S>px_<rows>_<key>.npy``.

    ``<rows>`` identifies the selection of faces, ``<key>`` also the state of the sources,
    so a changed source replaces the entry of the same selection while different
    selections of one split (say, a subsample) keep their own entries.
    """
    splits = [s for s in SPLITS if (faces["split"] == s).any()] if "split" in faces.columns else []
    prefix = "-".join(splits) if splits else "faces"
    return Path(cache_dir) / f"{prefix}_{int(size)}px_{_rows_key(faces)[:10]}_{cache_key(faces, size)[:16]}.npy"


def user_cache_dir(faces: pd.DataFrame) -> Path:
    """The per-user cache folder of a dataset: ``$FAIRAGE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/fairage``,
    else ``~/.cache/fairage``) / ``<dataset folder name>-<hash of its path>``.

    Used when the dataset's own ``.fairage_cache`` cannot be written (a read-only folder).
    """
    base = os.environ.get("FAIRAGE_CACHE_DIR")
    if not base:
        base = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fairage"
        )
    data_root = default_cache_dir(faces).parent.resolve()
    digest = hashlib.sha256(str(data_root).encode()).hexdigest()[:12]
    return Path(base) / f"{data_root.name or 'data'}-{digest}"


_UNWRITABLE_HINT = (
    "set FAIRAGE_CACHE_DIR (any command) or data.cache_dir (a config; train/suite: "
    "--set data.cache_dir=DIR) to a writable folder"
)


def load_images(
    faces: pd.DataFrame, size: int, cache_dir: str | os.PathLike | None = None, workers: int = 2, progress: bool = True
) -> np.ndarray:
    """Decoded faces as a read-only uint8 memmap (N, size, size, 3), RGB; row i = ``faces.iloc[i]``.

    Cached in ``cache_dir`` (default ``default_cache_dir(faces)``, or ``user_cache_dir(faces)``
    when that cannot be written: a read-only dataset); a second call with the
    same faces, size and unchanged sources only memory-maps the cached file. ``workers``
    processes decode the images on a miss (1 = in this process); the result does not
    depend on ``workers``. DataError naming the file for a missing or undecodable image.
    """
    size = int(size)
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    n = len(faces)
    if n == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    dirs = [Path(cache_dir)] if cache_dir is not None else [default_cache_dir(faces)]
    name = cache_file(faces, size, dirs[0]).name
    if cache_dir is None:
        dirs.append(user_cache_dir(faces))
    for folder in dirs:
        cached = open_cached(folder / name, (n, size, size, 3))
        if cached is not None:
            return cached
    refused: list[str] = []
    for folder in dirs:
        try:
            return _build(folder / name, faces, size, workers, progress)
        except OSError as err:
            unwritable = isinstance(err, PermissionError) or err.errno in (errno.EROFS, errno.EACCES)
            # only the cache folder's own refusal; a source file that cannot be read is not the cache's
            named = None if err.filename is None else str(err.filename)
            about_cache = named is None or named.startswith(str(folder)) or str(folder).startswith(named)
            if not (unwritable and about_cache):
                raise
            refused.append(f"{folder} ({err.strerror})")
    message = f"{dirs[0]}: cannot write the decoded-image cache ({refused[0].rsplit(' (', 1)[1]}"
    if len(refused) > 1:
        message += f"; nor the user cache {refused[1]}"
    raise DataError(f"{message}; {_UNWRITABLE_HINT}") from None


def _build(target: Path, faces: pd.DataFrame, size: int, workers: int, progress: bool) -> np.ndarray:
    """Decode ``faces`` into the cache file ``target`` (atomically) and memory-map it."""
    n = len(faces)
    cache_dir = target.parent
    stem = target.name.rsplit("_", 1)[0]  # <splits>_<S>px_<rows>
    # a missing, truncated or foreign file is (re)built; the atomic write replaces it
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        _fill(out, faces, size, workers, progress, label=f"decoding {stem.split('_')[0]} faces at {size} px")
        out.flush()
        del out
    for stale in cache_dir.glob(f"{stem}_*.npy"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r", allow_pickle=False)


def open_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached uint8 array at ``path`` as a read-only memmap if it is complete and has ``shape``, else None.

    A file cut short (a full disk, a copy interrupted), with a damaged header or of
    another shape is not an error: the caller rebuilds it.
    """
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )(f)
            offset = f.tell()
        stored_shape, fortran, dtype = header
        if tuple(stored_shape) != tuple(shape) or dtype != np.uint8 or fortran:
            return None
        if path.stat().st_size != offset + int(np.prod(shape)):
            return None
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None


def _fill(out: np.ndarray, faces: pd.DataFrame, size: int, workers: int, progress: bool, label: str) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    paths = faces["path"].to_numpy(dtype=object)
    frames = faces["frame"].to_numpy(dtype=np.int64)
    is_array = frames >= 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        job = bar.add_task(label, total=len(faces))
        # array sources (npy layout): already decoded, read in slices per source file
        for path in pd.unique(paths[is_array]):
            idx = np.flatnonzero(is_array & (paths == path))
            for a in range(0, len(idx), 256):
                part = idx[a : a + 256]
                out[part] = _npy_rows(path, frames[part], size)
                bar.advance(job, len(part))
        # image files: decode in chunks, in worker processes when there are enough of them
        idx = np.flatnonzero(~is_array)
        chunks = [idx[a : a + _CHUNK] for a in range(0, len(idx), _CHUNK)]
        tasks = [([str(p) for p in paths[c]], size) for c in chunks]
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                for c, arr in zip(chunks, pool.map(_decode_chunk, tasks)):
                    out[c] = arr
                    bar.advance(job, len(c))
        else:
            for c, task in zip(chunks, tasks):
                out[c] = _decode_chunk(task)
                bar.advance(job, len(c))
