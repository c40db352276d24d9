"""Dataset loaders: every layout becomes the same face table (see ``schema``).

Layouts (``detect_layout`` picks one from a folder's contents; ``layout=`` forces one):

``appa``     APPA-REAL release: ``gt_avg_{split}.csv`` + ``allcategories_{split}.csv`` +
             ``{split}/{file_name}_face.jpg`` (``full_images=True``: ``{split}/{file_name}``).
``npy``      course npy: ``data_{split}.npy`` (N,H,W,3 uint8 BGR), ``labels_{split}.npy`` (N,),
             ``meta_data_{split}.npy`` (N,3 str: gender, ethnicity, expression).
``utkface``  ``{age}_{gender}_{race}_{datetime}.jpg[.chip.jpg]`` image files (searched
             recursively); split by ``stratified_split``.
``csv``      a table named one of ``CSV_NAMES`` (or any ``.csv`` file passed as ``root``) with
             columns ``image,age`` and any of ``gender,ethnicity,expression,split``; image
             paths relative to the CSV's folder. Without ``split``: ``stratified_split``.

Groups come from the data: an attribute value outside the known vocabulary (UTKFace's
``indian`` and ``others``, FairFace's seven races, a csv's own labels) is kept as a group of
its own. ``extra_categories`` changes that: ``"keep"`` (default), ``"error"`` (DataError
naming file, row and value: a strict vocabulary), ``"unknown"`` (map it to ``"unknown"``), or a
dict ``{value: new_value}`` that merges or renames values (values it does not cover are kept);
``parse_extra_categories`` reads the text form ``indian=asian,others=unknown``.

Every file a dataset names (an image path in a table, a UTKFace file, the layout's own
tables and arrays) must resolve, symlinks included, inside the dataset folder; anything
else is refused before it is opened, with a message that does not depend on whether the
outside file exists. The csv layout may name absolute image paths when
``allow_absolute_paths=True``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .schema import (
    AGE_MAX,
    AGE_MIN,
    ATTRIBUTES,
    FACE_COLUMNS,
    SPLITS,
    UNKNOWN,
    VOCABULARIES,
    age_bins,
    attribute_columns,
)

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("appa", "npy", "utkface", "csv")
#: file names the csv layout is detected by, in order of preference
CSV_NAMES: tuple[str, ...] = ("faces.csv", "labels.csv")
#: fractions of the seeded stratified split (UTKFace, CSV without a split column)
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "valid": 0.1, "test": 0.2}
UTK_GENDERS = {"0": "male", "1": "female"}
UTK_RACES = {"0": "caucasian", "1": "afroamerican", "2": "asian", "3": "indian", "4": "others"}
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

ExtraCategories = str | Mapping[str, str]
#: what ``parse_extra_categories`` accepts, for messages
EXTRA_CATEGORIES_SYNTAX = "error, keep, unknown, or a mapping old=new[,old=new...] such as indian=asian,others=unknown"
#: where a user sets the options that messages advise
SKIP_BAD_HINT = "--skip-bad (config data.skip_bad: true) drops them"
EXTRA_CATEGORIES_HINT = (
    "map or keep it with --extra-categories (config data.extra_categories): " + EXTRA_CATEGORIES_SYNTAX
)


# --------------------------------------------------------------------------- public API


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the layout found in ``root``: ``appa``, ``npy``, ``utkface`` or ``csv``.

    Checked in that order: any ``gt_avg_{split}.csv`` -> appa; any ``data_{split}.npy`` ->
    npy; a file named in ``CSV_NAMES`` (or ``root`` itself a ``.csv`` file) -> csv; image
    files named like UTKFace -> utkface. DataError if the folder is missing or none match.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    # lexists, not is_file: a symlink leading out must be detected (and refused) whether its target exists or not
    if any(os.path.lexists(root / f"gt_avg_{s}.csv") for s in SPLITS):
        return "appa"
    if any(os.path.lexists(root / f"data_{s}.npy") for s in SPLITS):
        return "npy"
    if any(os.path.lexists(root / n) for n in CSV_NAMES):
        return "csv"
    for path in root.rglob("*"):  # any case: UTKFace copies come as .jpg and .JPG
        if _UTK_NAME.match(path.name):
            return "utkface"
    raise DataError(
        f"{root}: no known dataset layout (expected gt_avg_{{split}}.csv [appa], data_{{split}}.npy [npy], "
        f"{' or '.join(CSV_NAMES)} [csv], or UTKFace images AGE_GENDER_RACE_DATE.jpg [utkface])"
    )


def load_faces(
    root: str | os.PathLike,
    layout: str | None = None,
    target: str = "apparent",
    full_images: bool = False,
    extra_categories: ExtraCategories = "keep",
    seed: int = 0,
    skip_bad: bool = False,
    allow_absolute_paths: bool = False,
) -> pd.DataFrame:
    """Read a dataset folder into the face table (columns in ``schema.FACE_COLUMNS`` + extras).

    Parameters
    ----------
    root : dataset folder (or, for the csv layout, the CSV file itself).
    layout : ``appa``, ``npy``, ``utkface``, ``csv`` or None (auto-detect).
    target : ``apparent`` (APPA-REAL ``apparent_age_avg``) or ``real`` (``real_age``); only the
        appa layout has both, the others have one age.
    full_images : appa only: use the full photo ``{split}/{file_name}`` instead of the face crop.
    extra_categories : ``"error"``, ``"keep"``, ``"unknown"`` or a value mapping (module doc).
    seed : seed of the stratified split (utkface, csv without ``split``).
    skip_bad : drop faces whose image file is missing or cannot be decoded instead of raising;
        the dropped files are logged as a warning and listed in ``faces.attrs["skipped"]``
        (a list of ``"path: reason"`` strings).
    allow_absolute_paths : csv only: accept absolute image paths (off by default: every image
        path must resolve inside the dataset folder, see the module doc).

    Rows are in dataset order within each split, splits in train, valid, test order.
    """
    root = Path(root)
    extra_categories = parse_extra_categories(extra_categories)
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if target not in ("apparent", "real"):
        raise DataError(f"unknown target {target!r}; choose apparent or real")
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if layout == "appa":
        faces = _load_appa(root, target, full_images, extra_categories)
    elif layout == "npy":
        faces = _load_npy(root, extra_categories)
    elif layout == "utkface":
        faces = _load_utkface(root, extra_categories, seed, skip_bad)
    else:
        faces = _load_csv(root, extra_categories, seed, allow_absolute_paths)
    bad_names = faces.attrs.pop("skipped", [])
    faces = faces.reset_index(drop=True)
    if layout != "npy":
        faces = _check_image_files(faces, skip_bad)
    if bad_names:
        faces.attrs["skipped"] = bad_names + faces.attrs.get("skipped", [])
    faces.attrs["layout"] = layout
    faces.attrs["root"] = str(root.resolve())
    faces.attrs.setdefault("skipped", [])
    return faces


def parse_extra_categories(value: ExtraCategories) -> str | dict[str, str]:
    """The ``extra_categories`` policy from its text or mapping form; DataError showing the syntax.

    ``"error"``, ``"keep"`` and ``"unknown"`` are returned as they are; ``"indian=asian,others=unknown"``
    or a mapping becomes a dict of lower-case values (any new value: a mapping merges or renames groups).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("error", "keep", "unknown"):
            return text.lower()
        if "=" not in text:
            raise DataError(f"extra categories {value!r}: expected {EXTRA_CATEGORIES_SYNTAX}")
        pairs = []
        for part in (p.strip() for p in text.split(",")):
            if part.count("=") != 1 or not all(x.strip() for x in part.split("=")):
                raise DataError(
                    f"extra categories {value!r}: {part!r} is not old=new; expected {EXTRA_CATEGORIES_SYNTAX}"
                )
            pairs.append(part.split("="))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise DataError(f"extra categories {value!r}: expected {EXTRA_CATEGORIES_SYNTAX}")
    mapping: dict[str, str] = {}
    for old, new in pairs:
        old, new = str(old).strip().lower(), str(new).strip().lower()
        if not old or not new:
            raise DataError(f"extra categories {value!r}: empty value in a mapping; expected {EXTRA_CATEGORIES_SYNTAX}")
        mapping[old] = new
    if not mapping:
        raise DataError(f"extra categories {value!r}: expected {EXTRA_CATEGORIES_SYNTAX}")
    return mapping


def resolve_inside(root: str | os.PathLike, name: str) -> str | None:
    """The real path of ``name`` (relative to the folder ``root``) if it lies inside ``root``, else None.

    The path text is checked first, without touching the file system (absolute paths and
    ``..`` leading out are refused); then symlinks along the path are followed
    (``os.path.realpath``) and the target must still lie inside ``root``'s real path. The
    file itself is never opened, and the answer for a path leading out does not depend on
    whether something exists there.
    """
    root_real = os.path.realpath(root)
    text = str(name)
    if not text or os.path.isabs(text) or "\0" in text:
        return None
    lexical = os.path.normpath(os.path.join(root_real, text))
    if os.path.commonpath([root_real, lexical]) != root_real:
        return None
    real = os.path.realpath(lexical)
    if os.path.commonpath([root_real, real]) != root_real:
        return None
    return real


def _inside_or_raise(root: Path, path: Path) -> Path:
    """``path`` (a file the layout reads inside ``root``) if it resolves inside ``root``, else DataError."""
    real = resolve_inside(root, os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    if real is None:
        raise DataError(
            f"{path}: resolves outside the dataset folder {root} (a symlink leading out); "
            "fairage reads nothing outside the folder it is given"
        )
    return Path(real)


def _present(root: Path, path: Path, layout_file: bool = True) -> bool:
    """Whether the layout file ``path`` inside ``root`` is there; DataError if it leads out of ``root``.

    Checked on the name (``lexists``) before anything follows it, so a symlink leading out
    is refused the same way whether or not its target exists. A layout file (a split's
    table or array) that is there but is not a regular file (a folder, a pipe) is a
    DataError, not a missing split; with ``layout_file=False`` (an image found by a walk)
    it is just not taken.
    """
    if not os.path.lexists(path):
        return False
    _inside_or_raise(root, path)
    if path.is_file():
        return True
    if layout_file:
        what = "a folder" if path.is_dir() else "not a regular file"
        raise DataError(f"{path} is {what}; the dataset needs it to be a file (or absent)")
    return False


def _outside_message(source: Path, row: int, column: str, name: str, root: Path, absolute_hint: bool) -> str:
    hint = (
        "; set data.allow_absolute_paths: true (--allow-absolute-paths) to accept absolute image paths"
        if absolute_hint and os.path.isabs(name)
        else ""
    )
    return (
        f"{source}: row {row}: {column} {name!r} is not a path inside the dataset folder {root} "
        f"(absolute paths, '..' and symlinks leading out are refused){hint}"
    )


def _show(value) -> str:
    """repr of a table value for messages: numpy scalars shown as plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _duplicate_rows(keys: pd.Series, rows: np.ndarray) -> tuple[list[int], object] | None:
    """(rows, key) of the first value of ``keys`` that occurs more than once, or None."""
    dup = keys.duplicated(keep=False).to_numpy()
    if not dup.any():
        return None
    first = keys.iloc[int(np.flatnonzero(dup)[0])]
    return [int(r) for r in rows[(keys == first).to_numpy()]], first


def stratified_split(ages, ethnicities, seed: int = 0, fractions: Mapping[str, float] = SPLIT_FRACTIONS) -> np.ndarray:
    """Deterministic seeded split, stratified by age bin (``schema.AGE_EDGES``) x ethnicity.

    Within each stratum the faces are shuffled with ``seed`` and cut at the cumulative
    fractions (rounded), so every stratum is spread over the splits in about the
    proportions of ``fractions`` (default 70/10/20 train/valid/test). Returns an array of
    split names, one per face.
    """
    ages = np.asarray(ages, dtype=float)
    strata = pd.Series(age_bins(ages)).astype(str) + "|" + pd.Series(np.asarray(ethnicities)).astype(str)
    names = list(fractions)
    cum = np.cumsum([fractions[n] for n in names])
    out = np.empty(len(ages), dtype=object)
    rng = np.random.default_rng(seed)
    for key in sorted(strata.unique()):
        idx = np.flatnonzero(strata.to_numpy() == key)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.round(cum * len(idx)).astype(int)
        start = 0
        for name, stop in zip(names, cuts):
            out[idx[start:stop]] = name
            start = stop
    return out


# --------------------------------------------------------------------------- shared checks


def _normalise_attribute(
    values: pd.Series, attribute: str, extra: ExtraCategories, source: Path, rows: np.ndarray | None = None
) -> pd.Series:
    """Lower-case, strip, map missing to ``unknown``, check the vocabulary.

    ``rows``: the row numbers to name in messages (default: CSV data rows, 1-based + header).
    """
    vals = values.astype("object").where(values.notna(), UNKNOWN)
    vals = pd.Series([str(v).strip().lower() for v in vals], index=values.index, dtype=object)
    vals[vals == ""] = UNKNOWN
    if isinstance(extra, Mapping):
        vals = vals.map(lambda v: extra.get(v, v))
        policy = "keep"
    else:
        policy = extra
        if policy not in ("error", "keep", "unknown"):
            raise DataError(f"extra_categories must be error, keep, unknown or a mapping, got {policy!r}")
    allowed = set(VOCABULARIES[attribute]) | {UNKNOWN}
    bad = ~vals.isin(allowed)
    if bad.any():
        if policy == "unknown":
            vals[bad] = UNKNOWN
        elif policy == "error":
            i = int(np.flatnonzero(bad.to_numpy())[0])
            row = rows[i] if rows is not None else i + 2
            raise DataError(
                f"{source}: row {row}: {attribute} value {vals.iloc[i]!r} is not one of "
                f"{', '.join(VOCABULARIES[attribute])} (or {UNKNOWN}); {EXTRA_CATEGORIES_HINT} "
                f"({int(bad.sum())} such rows)"
            )
    return vals


def _check_ages(ages: pd.Series, source: Path, column: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Ages as float years; DataError naming file and row for non-numbers, NaN, or outside 0-120."""
    num = pd.to_numeric(ages, errors="coerce").astype(float)
    arr = num.to_numpy()
    bad = ~np.isfinite(arr) | (arr < AGE_MIN) | (arr > AGE_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = rows[i] if rows is not None else i + 2
        raise DataError(
            f"{source}: row {row}: {column} {_show(ages.iloc[i])} is not an age in years "
            f"between {AGE_MIN:g} and {AGE_MAX:g} ({int(bad.sum())} such rows)"
        )
    return arr


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'})"
        )
    return df


def probe_image(path: str | os.PathLike) -> str | None:
    """Why the image at ``path`` cannot be decoded, or None if it decodes.

    Decodes at reduced scale (JPEG draft mode) so checking a whole dataset is quick, but
    still reads all the data, so truncated files are caught.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (32, 32))
            im.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt data
        return f"cannot decode image ({type(err).__name__}: {err})"
    return None


def find_bad_images(faces: pd.DataFrame) -> list[str]:
    """``"path: reason"`` for every image file of ``faces`` that is missing or cannot be decoded.

    Array sources (npy layout, ``frame >= 0``) are skipped: they were checked on loading.
    """
    bad = []
    for path, frame in zip(faces["path"], faces["frame"]):
        if frame < 0:
            reason = probe_image(path)
            if reason:
                bad.append(f"{path}: {reason}")
    return bad


def _check_image_files(faces: pd.DataFrame, skip_bad: bool) -> pd.DataFrame:
    """Existence check always; with ``skip_bad`` also decode and drop bad images (logged)."""
    if faces.empty:
        return faces
    problems: dict[int, str] = {}
    for i, path in enumerate(faces["path"]):
        if not os.path.isfile(path):
            problems[i] = "file not found"
        elif skip_bad:
            reason = probe_image(path)
            if reason:
                problems[i] = reason
    if not problems:
        return faces
    if not skip_bad:
        i, reason = next(iter(problems.items()))
        more = f" ({len(problems)} images missing)" if len(problems) > 1 else ""
        more += f"; {SKIP_BAD_HINT}"
        raise DataError(f"{faces['path'].iloc[i]}: {reason} (face {faces['image'].iloc[i]!r}){more}")
    skipped = [f"{faces['path'].iloc[i]}: {r}" for i, r in problems.items()]
    log.warning(
        "skipped %d bad image(s): %s", len(skipped), "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")
    )
    kept = faces.drop(index=faces.index[list(problems)]).reset_index(drop=True)
    kept.attrs["skipped"] = skipped
    return kept


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Face-table column order (schema columns first, then optional and extra columns)."""
    df["frame"] = df["frame"].astype(np.int64)
    df["age"] = df["age"].astype(np.float64)
    for c in ("image", *ATTRIBUTES, "split", "path"):
        df[c] = df[c].astype(object).astype(str)
    extras = [c for c in df.columns if c not in FACE_COLUMNS]
    return df[list(FACE_COLUMNS) + extras]


# --------------------------------------------------------------------------- layouts


def _load_appa(root: Path, target: str, full_images: bool, extra: ExtraCategories) -> pd.DataFrame:
    parts = []
    for split in SPLITS:
        gt_path = root / f"gt_avg_{split}.csv"
        if not _present(root, gt_path):
            continue
        df = _appa_ages(_appa_gt(gt_path), gt_path, target)
        _appa_attributes(df, root, split, gt_path, extra)
        df["split"] = split
        suffix = "" if full_images else "_face.jpg"
        paths = []
        for row, name in enumerate(df["image"], start=2):
            real = None if os.path.isabs(name) else resolve_inside(root, f"{split}/{name}{suffix}")
            if real is None:
                raise DataError(_outside_message(gt_path, row, "file_name", name, root, absolute_hint=False))
            paths.append(real)
        df["path"] = paths
        df["frame"] = -1
        parts.append(df)
    if not parts:
        raise DataError(f"{root}: no gt_avg_{{train,valid,test}}.csv found (APPA-REAL layout)")
    return _finish(pd.concat(parts, ignore_index=True))


def _appa_gt(gt_path: Path) -> pd.DataFrame:
    """An APPA-REAL ``gt_avg_{split}.csv``, checked: every file_name given, once."""
    gt = _read_csv(gt_path, ("file_name", "apparent_age_avg", "real_age"))
    if gt["file_name"].isna().any():
        i = int(np.flatnonzero(gt["file_name"].isna().to_numpy())[0])
        raise DataError(f"{gt_path}: row {i + 2}: empty file_name")
    dup = _duplicate_rows(gt["file_name"].str.strip(), np.arange(len(gt)) + 2)
    if dup:
        raise DataError(
            f"{gt_path}: rows {', '.join(map(str, dup[0]))}: file_name {dup[1]!r} is listed "
            f"{len(dup[0])} times (each face once)"
        )
    return gt


def _appa_ages(gt: pd.DataFrame, gt_path: Path, target: str) -> pd.DataFrame:
    """The faces of one split: image, age (the ``target`` age, years), the other age, raters' std and count."""
    column = "apparent_age_avg" if target == "apparent" else "real_age"
    df = pd.DataFrame({"image": gt["file_name"].str.strip()})
    df["age"] = _check_ages(gt[column], gt_path, column)
    if target == "apparent":
        df["real_age"] = pd.to_numeric(gt["real_age"], errors="coerce").to_numpy(dtype=float)
    else:
        df["apparent_age"] = pd.to_numeric(gt["apparent_age_avg"], errors="coerce").to_numpy(dtype=float)
    if "apparent_age_std" in gt.columns:
        df["age_std"] = pd.to_numeric(gt["apparent_age_std"], errors="coerce").to_numpy(dtype=float)
    if "num_ratings" in gt.columns:
        df["num_ratings"] = pd.to_numeric(gt["num_ratings"], errors="coerce").to_numpy(dtype=float)
    return df


def _appa_attributes(df: pd.DataFrame, root: Path, split: str, gt_path: Path, extra: ExtraCategories) -> None:
    """Gender, ethnicity, expression (and makeup, time) of the split's faces from ``allcategories_{split}.csv``,
    added to ``df`` in place; 'unknown' where the file or a face's row is missing."""
    cat_path = root / f"allcategories_{split}.csv"
    if _present(root, cat_path):
        cats = _read_csv(cat_path, ("file",))
        cats["file"] = cats["file"].str.strip()
        dup = cats["file"].duplicated()
        if dup.any():
            i = int(np.flatnonzero(dup.to_numpy())[0])
            raise DataError(f"{cat_path}: row {i + 2}: file {cats['file'].iloc[i]!r} listed twice")
        cat_rows = pd.Series(np.arange(len(cats)) + 2, index=cats["file"])
        cats = cats.set_index("file")
        missing = ~df["image"].isin(cats.index)
        cats = cats.reindex(df["image"])  # rows in gt order; faces absent from it -> NaN -> unknown
        rows = cat_rows.reindex(df["image"]).fillna(-1).astype(int).to_numpy()
        if missing.any():
            log.warning(
                "%s: %d face(s) of %s have no attributes; they are 'unknown'",
                cat_path,
                int(missing.sum()),
                gt_path.name,
            )
        for attribute, column in (("gender", "gender"), ("ethnicity", "race"), ("expression", "happiness")):
            if column in cats.columns:
                df[attribute] = _normalise_attribute(
                    cats[column].reset_index(drop=True), attribute, extra, cat_path, rows
                ).to_numpy()
            else:
                df[attribute] = UNKNOWN
        for column in ("makeup", "time"):
            if column in cats.columns:
                df[column] = cats[column].fillna(UNKNOWN).astype(str).to_numpy()
    else:
        log.warning("%s not found: gender, ethnicity and expression of split %s are 'unknown'", cat_path, split)
        for attribute in VOCABULARIES:
            df[attribute] = UNKNOWN


def _load_npy(root: Path, extra: ExtraCategories) -> pd.DataFrame:
    parts = []
    for split in SPLITS:
        data_path = root / f"data_{split}.npy"
        if not _present(root, data_path):
            continue
        labels_path, meta_path = root / f"labels_{split}.npy", root / f"meta_data_{split}.npy"
        for p in (labels_path, meta_path):
            if not _present(root, p):
                raise DataError(f"{p}: file not found (needed with {data_path.name})")
        data = _open_npy(data_path, mmap=True)
        labels = _open_npy(labels_path, mmap=False)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        meta = _open_npy(meta_path, mmap=False)
        if data.ndim != 4 or data.shape[3] != 3 or data.dtype != np.uint8:
            raise DataError(f"{data_path}: expected a uint8 array (N,H,W,3), got {data.dtype} {data.shape}")
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: expected a 1-D array of ages, got shape {labels.shape}")
        if meta.ndim != 2 or meta.shape[1] != 3:
            raise DataError(
                f"{meta_path}: expected an (N,3) array of gender, ethnicity, expression; got shape {meta.shape}"
            )
        n = {data_path.name: len(data), labels_path.name: len(labels), meta_path.name: len(meta)}
        if len(set(n.values())) > 1:
            raise DataError(
                f"{root}: arrays of split {split} have different lengths: "
                + ", ".join(f"{k} {v}" for k, v in n.items())
            )
        rows = np.arange(len(labels))  # messages name the array row (0-based)
        df = pd.DataFrame({"image": [str(i) for i in range(len(labels))]})
        df["age"] = _check_ages(pd.Series(labels), labels_path, "age", rows)
        meta_df = pd.DataFrame(meta.astype(str))
        for j, attribute in enumerate(ATTRIBUTES):
            df[attribute] = _normalise_attribute(meta_df[j], attribute, extra, meta_path, rows).to_numpy()
        df["split"] = split
        df["path"] = os.path.realpath(data_path)
        df["frame"] = np.arange(len(labels))
        parts.append(df)
    if not parts:
        raise DataError(f"{root}: no data_{{train,valid,test}}.npy found (npy layout)")
    return _finish(pd.concat(parts, ignore_index=True))


def _open_npy(path: Path, mmap: bool) -> np.ndarray:
    # numpy calls anything without its header "pickled data" and suggests allow_pickle: the
    # header is checked here, and the message never suggests unpickling
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            dtype = None
            if magic == _NPY_MAGIC:
                f.seek(0)
                version = np.lib.format.read_magic(f)
                dtype = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )(f)[2]
    except (ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file (its header is damaged: {str(err)[:200]})") from None
    except OSError as err:
        raise DataError(f"{path}: not a readable .npy file ({err.strerror or err})") from None
    if magic != _NPY_MAGIC:
        raise DataError(f"{path}: not a .npy file (no NumPy header); save the array with numpy.save")
    if dtype.hasobject:
        # object arrays are pickled: fairage never unpickles user files
        raise DataError(
            f"{path}: cannot read without unpickling: it holds Python objects (dtype object), which "
            "fairage never unpickles; store strings as a fixed-width unicode array (dtype '<U...')"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({str(err)[:200]})") from None
    except OSError as err:
        raise DataError(f"{path}: not a readable .npy file ({err.strerror or err})") from None


_NPY_MAGIC = b"\x93NUMPY"


def _load_utkface(root: Path, extra: ExtraCategories, seed: int, skip_bad: bool = False) -> pd.DataFrame:
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    # confined by name before anything follows a symlink (see _present); rglob does not enter linked folders
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and _present(root, p, layout_file=False)
    )
    if not files:
        raise DataError(f"{root}: no image files found (UTKFace layout)")
    recs, bad_names = [], []
    for p in files:
        m = _UTK_NAME.match(p.name)
        if not m or m.group(2) not in UTK_GENDERS or m.group(3) not in UTK_RACES:
            problem = (
                f"{p}: not a UTKFace file name AGE_GENDER_RACE_DATETIME.jpg[.chip.jpg] "
                "with gender 0 (male) or 1 (female) and race 0-4"
            )
            if not skip_bad:
                raise DataError(problem + f"; {SKIP_BAD_HINT}")
            bad_names.append(problem)
            continue
        real = os.path.realpath(p)  # inside root: _present checked it
        recs.append((p.relative_to(root).as_posix(), m.group(1), UTK_GENDERS[m.group(2)], UTK_RACES[m.group(3)], real))
    df = pd.DataFrame(recs, columns=["image", "age_raw", "gender", "ethnicity_raw", "path"])
    # messages name the file (no rows in a folder of images)
    ages = df["age_raw"].astype(float).to_numpy()
    bad_age = (ages < AGE_MIN) | (ages > AGE_MAX)
    if bad_age.any():
        i = int(np.flatnonzero(bad_age)[0])
        raise DataError(
            f"{df['path'].iloc[i]}: age {df['age_raw'].iloc[i]!r} is not an age in years "
            f"between {AGE_MIN:g} and {AGE_MAX:g}"
        )
    df["age"] = ages
    eth = df["ethnicity_raw"]
    if isinstance(extra, Mapping):
        eth = eth.map(lambda v: extra.get(v, v))
    bad = ~eth.isin(set(VOCABULARIES["ethnicity"]) | {UNKNOWN})
    if bad.any() and not isinstance(extra, Mapping):
        if extra == "unknown":
            eth = eth.where(~bad, UNKNOWN)
        elif extra != "keep":
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{df['path'].iloc[i]}: ethnicity {eth.iloc[i]!r} (UTKFace race code) is not one of "
                f"{', '.join(VOCABULARIES['ethnicity'])}; {EXTRA_CATEGORIES_HINT} "
                f"({int(bad.sum())} such files)"
            )
    df["ethnicity"] = eth
    df["expression"] = UNKNOWN
    df["split"] = stratified_split(df["age"], df["ethnicity"], seed)
    df["frame"] = -1
    df = df.drop(columns=["age_raw", "ethnicity_raw"])
    df = _finish(_order_by_split(df))
    if bad_names:
        log.warning("skipped %d file(s) not named like UTKFace: %s", len(bad_names), "; ".join(bad_names[:20]))
        df.attrs["skipped"] = bad_names
    return df


def _load_csv(root: Path, extra: ExtraCategories, seed: int, allow_absolute_paths: bool = False) -> pd.DataFrame:
    if root.is_file():
        csv_path = root
    else:
        found = [root / n for n in CSV_NAMES if _present(root, root / n)]
        if not found:
            raise DataError(f"{root}: none of {', '.join(CSV_NAMES)} found (csv layout)")
        csv_path = found[0]
    raw = _read_csv(csv_path, ("image", "age"))
    rows = np.arange(len(raw)) + 2
    if raw["image"].isna().any():
        i = int(np.flatnonzero(raw["image"].isna().to_numpy())[0])
        raise DataError(f"{csv_path}: row {i + 2}: empty image")
    df = pd.DataFrame({"image": raw["image"].str.strip()})
    df["age"] = _check_ages(raw["age"], csv_path, "age")
    for attribute in VOCABULARIES:
        if attribute in raw.columns:
            df[attribute] = _normalise_attribute(raw[attribute], attribute, extra, csv_path, rows).to_numpy()
        else:
            df[attribute] = UNKNOWN
    folder = csv_path.parent
    paths = []
    for row, name in zip(rows, df["image"]):
        if allow_absolute_paths and os.path.isabs(name):
            real = os.path.normpath(name)  # the user opted in to absolute paths: read them as written
        else:
            real = resolve_inside(folder, name)
        if real is None:
            raise DataError(_outside_message(csv_path, int(row), "image", name, folder, absolute_hint=True))
        paths.append(real)
    df["path"] = paths
    dup = _duplicate_rows(df["path"], rows)
    if dup:
        names = sorted(set(df["image"][df["path"] == dup[1]]))
        raise DataError(
            f"{csv_path}: rows {', '.join(map(str, dup[0]))} name the same image "
            f"{' / '.join(map(repr, names))} (each face once)"
        )
    df["frame"] = -1
    if "split" in raw.columns:
        split = raw["split"].fillna("").str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{csv_path}: row {i + 2}: split {raw['split'].iloc[i]!r} is not one of {', '.join(SPLITS)}"
            )
        df["split"] = split.to_numpy()
    else:
        df["split"] = stratified_split(df["age"], df["ethnicity"], seed)
    for c in raw.columns:
        if c not in df.columns and c not in ("image", "age"):
            df[c] = raw[c].to_numpy()
    return _finish(_order_by_split(df))


def _order_by_split(df: pd.DataFrame) -> pd.DataFrame:
    """Splits in train, valid, test order; dataset order kept within each split."""
    order = df["split"].map({s: i for i, s in enumerate(SPLITS)})
    return df.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def describe_faces(faces: pd.DataFrame) -> dict:
    """Summary of a face table: the object ``fairage data info --json`` prints.

    ``{"layout", "attributes": [name, ...], "splits": {split: {"n", "gender": {value: count},
    "ethnicity": {...}, "expression": {...}, further attribute: {...}}},
    "age": {split: {"min", "max", "mean"}}, "age_histogram": {"edges": [...], "counts": [...]}}``
    (ages in years; attributes are ``schema.attribute_columns``; the histogram has 10-year bins
    from 0, the last one open: ``counts[i]`` faces in ``[edges[i], edges[i+1])``).
    """
    splits: dict[str, dict] = {}
    ages: dict[str, dict] = {}
    attributes = attribute_columns(faces)
    for split in [s for s in SPLITS if (faces["split"] == s).any()]:
        part = faces[faces["split"] == split]
        splits[split] = {"n": len(part)}
        for attribute in attributes:
            counts = part[attribute].value_counts()
            splits[split][attribute] = {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}
        ages[split] = {
            "min": float(part["age"].min()),
            "max": float(part["age"].max()),
            "mean": float(part["age"].mean()),
        }
    edges = np.arange(0, 100, 10)
    counts = np.bincount(
        np.clip(np.digitize(faces["age"].to_numpy(dtype=float), edges) - 1, 0, len(edges) - 1), minlength=len(edges)
    )
    return {
        "layout": faces.attrs.get("layout"),
        "attributes": attributes,
        "splits": splits,
        "age": ages,
        "age_histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def inspect_dataset(root: str | Path, **options) -> tuple[pd.DataFrame, dict]:
    """The face table of ``root`` (``load_faces`` keyword arguments ``options``) and its ``describe_faces``
    summary: what ``fairage data info`` shows. Without ``skip_bad`` every image is decoded (at reduced scale:
    quick) so that a corrupt file is a DataError now; with it the skipped images are in
    ``faces.attrs["skipped"]`` (their one-line warning is held back: the caller lists them)."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("skipped ")

    log.addFilter(keep)
    try:
        faces = load_faces(root, **options)
    finally:
        log.removeFilter(keep)
    if not options.get("skip_bad"):
        bad = find_bad_images(faces)
        if bad:
            more = f" (and {len(bad) - 1} more bad image(s))" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; {SKIP_BAD_HINT}")
    return faces, describe_faces(faces)


def histogram_rows(histogram: dict, width: int = 40) -> list[tuple[str, int, int]]:
    """``describe_faces``' ``age_histogram`` as rows ``(label, count, bar length)``: labels ``0-10``, ...,
    the last bin open (``90+``); the fullest bin's bar is ``width`` long."""
    edges, counts = histogram["edges"], histogram["counts"]
    top = max(max(counts), 1)
    return [
        (f"{lo}-{lo + 10}" if lo < edges[-1] else f"{lo}+", int(c), int(round(width * c / top)))
        for lo, c in zip(edges, counts)
    ]
