"""Procedural synthetic face benchmark, written in the APPA-REAL release layout.

No real face data can be downloaded here, so the demo and the tests run on faces drawn
with Pillow: a head ellipse with hair, eyes, brows, nose and mouth. Age is visible through
several cues, each with person-to-person noise so no single cue gives the answer:

* children (below ~14): rounder head, bigger eyes set lower in the face;
* from ~26: wrinkle lines (forehead, crow's feet, nasolabial folds, eye bags) and a
  rougher skin texture that keep growing with age; age spots after ~60;
* from ~45: hair greying; men's hairlines recede.

Bias mechanisms, so that per-group error differences are real and weighting has
something to act on:

* wrinkle and texture contrast is lower on darker skin (the age cues are harder to read
  on the rare ``afroamerican`` group, and a little on ``asian``);
* visible ageing slows from the mid-thirties on the rare skins and then lags by
  ``AGEING_DELAY`` (6 years for ``asian``, 10 for ``afroamerican``): a 50-year-old there
  shows the wrinkles and grey hair of a 44- or 40-year-old caucasian, a 25-year-old looks
  like any 25-year-old. The skin colour is visible, so the shift is learnable, but
  a model fitted mostly to the majority under-estimates the rare groups' adults; this is
  the systematic error that sample weighting by ethnicity can reduce;
* expressions add lines that look like wrinkles, deeper in some people than others:
  smiling creases the eye corners and cheeks (and a broad smile hides the eye bags),
  the raised brows of ``other`` (surprise) crease the forehead; so expression confounds age;
* the proportions follow APPA-REAL: ages mostly 15-45 with a thin tail to 90 (about 6%
  aged 60+, about 3% children), about 86% caucasian, 9% asian, 5% afroamerican.

Nuisance variation: background colour, lighting gradient, head position, scale, in-plane
rotation and JPEG quality.

Every face is drawn from its own random generator seeded by ``(seed, split, index)``, so
the output does not depend on the number of worker processes, and the same seed gives
byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import atomic
from ..errors import DataError
from .schema import SPLITS

#: sampling proportions (APPA-REAL-like)
ETHNICITY_P: dict[str, float] = {"caucasian": 0.86, "asian": 0.09, "afroamerican": 0.05}
EXPRESSION_P: dict[str, float] = {"neutral": 0.36, "slightlyhappy": 0.2, "happy": 0.34, "other": 0.1}
CHILD_P, OLD_P = 0.03, 0.06

#: how strongly wrinkles/texture show on each skin (1 = full contrast)
CUE_CONTRAST: dict[str, float] = {"caucasian": 1.0, "asian": 0.85, "afroamerican": 0.55}
#: years by which visible ageing (wrinkles, texture, greying, age spots) lags behind on each
#: skin from the mid-thirties on: the same cue level means an older person on a rare skin,
#: so a model fitted mostly to the majority under-estimates the rare groups' older adults
#: unless it learns the shift
AGEING_DELAY: dict[str, float] = {"caucasian": 0.0, "asian": 6.0, "afroamerican": 10.0}
_SKIN_RGB: dict[str, tuple[float, float, float]] = {
    "caucasian": (228.0, 192.0, 168.0),
    "asian": (222.0, 188.0, 148.0),
    "afroamerican": (118.0, 80.0, 60.0),
}
_HAIR_RGB: dict[str, tuple[float, float, float]] = {
    "caucasian": (110.0, 80.0, 50.0),
    "asian": (30.0, 26.0, 24.0),
    "afroamerican": (28.0, 22.0, 20.0),
}
_GREY_RGB = np.array([205.0, 205.0, 208.0])
_SMILE = {"neutral": 0.0, "slightlyhappy": 0.5, "happy": 1.0, "other": 0.0}
_JPEG_QUALITIES = (70, 95)  # inclusive range sampled per face
_CHUNK = 250  # faces per worker task
#: bumped whenever the drawing or the labels change, so cached demo data is regenerated
SYNTH_VERSION = 2
#: file written into every synthetic dataset folder (generator, version, seed, size, faces per split)
SYNTHETIC_MARKER = "synthetic.json"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class FaceParams:
    """Everything that determines one synthetic face image.

    Geometry is in fractions of the image side; colours are RGB floats in 0-255.
    ``age`` is the *visual* age in years (what the drawing shows).
    """

    age: float
    gender: str
    ethnicity: str
    expression: str
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    background: tuple[float, float, float]
    head_w: float  # half-width of the head ellipse
    head_aspect: float  # height / width
    eye_size: float  # eye half-width
    eye_y: float  # eye line, fraction of head height below the head top
    hairline: float  # 0 = full hairline, 1 = receded to the crown
    long_hair: bool
    wrinkles: float  # 0 = none, ~1 = old
    texture: float  # skin-noise std in grey levels before the skin contrast factor
    spots: int
    smile: float  # 0..1
    smile_lines: float  # how deep this person's smile lines are (varies a lot between people)
    contrast: float  # CUE_CONTRAST for this skin times person noise
    cx: float
    cy: float
    angle: float  # degrees
    light_angle: float  # radians
    light_strength: float
    jpeg_quality: int
    noise_seed: int


def sample_labels(rng: np.random.Generator) -> dict:
    """Draw one face's labels: real age, visual age, apparent-age ratings and attributes.

    Returns a dict with ``real_age`` (int years), ``visual_age``, ``apparent_age_avg``,
    ``apparent_age_std`` (float years), ``num_ratings``, ``gender``, ``ethnicity``,
    ``expression``, ``makeup``, ``time``.
    """
    u = rng.random()
    if u < CHILD_P:
        real = rng.uniform(1.0, 15.0)
    elif u < CHILD_P + OLD_P:
        real = 60.0 + 32.0 * rng.beta(1.0, 2.5)
    else:
        real = 15.0 + 45.0 * rng.beta(2.0, 3.8)
    real_age = int(round(real))
    gender = "male" if rng.random() < 0.5 else "female"
    ethnicity = str(rng.choice(list(ETHNICITY_P), p=list(ETHNICITY_P.values())))
    expression = str(rng.choice(list(EXPRESSION_P), p=list(EXPRESSION_P.values())))
    # people look a bit older or younger than they are; raters average out most of their noise
    visual = max(0.8, real + rng.normal(0.0, 1.0 + 0.06 * real))
    apparent = float(np.clip(visual + rng.normal(0.0, 0.8), 0.8, 95.0))
    return {
        "real_age": real_age,
        "visual_age": visual,
        "apparent_age_avg": apparent,
        "apparent_age_std": (1.5 + 0.09 * apparent) * rng.uniform(0.6, 1.4),
        "num_ratings": int(rng.integers(20, 51)),
        "gender": gender,
        "ethnicity": ethnicity,
        "expression": expression,
        "makeup": "makeup" if gender == "female" and real >= 16 and rng.random() < 0.5 else "nomakeup",
        "time": "oldphoto" if rng.random() < 0.05 else "modernphoto",
    }


def sample_face_params(
    rng: np.random.Generator, age: float, gender: str, ethnicity: str, expression: str
) -> FaceParams:
    """Draw the appearance of a face of visual ``age`` (years) and the given attributes."""
    child = _sigmoid((11.0 - age) / 2.5)  # ~1 for toddlers, ~0 from 16 on
    skin = np.array(_SKIN_RGB[ethnicity]) * rng.uniform(0.88, 1.08) + rng.normal(0, 6, 3)
    base_hair = np.array(_HAIR_RGB[ethnicity]) * rng.uniform(0.6, 1.5)
    if ethnicity == "caucasian" and rng.random() < 0.25:  # blond
        base_hair = np.array([190.0, 160.0, 100.0]) * rng.uniform(0.8, 1.1)
    # the age the ageing cues show: the same as the real age up to the mid-thirties, then
    # lagging by up to AGEING_DELAY years (monotone in age, so no age information is lost)
    cue_age = age - AGEING_DELAY[ethnicity] * _sigmoid((age - 35.0) / 5.0)
    grey = _sigmoid((cue_age - 50.0 + rng.normal(0.0, 6.0)) / 5.0)
    hair = (1.0 - grey) * base_hair + grey * _GREY_RGB
    recede = 0.0
    if gender == "male":
        recede = float(np.clip((age - 30.0 + rng.normal(0.0, 8.0)) / 40.0, 0.0, 1.0)) * rng.uniform(0.0, 1.0)
    wrinkles = max(0.0, (cue_age - 26.0) / 40.0) * float(np.exp(rng.normal(0.0, 0.25)))
    texture = (3.0 + 11.0 * float(np.clip((cue_age - 22.0) / 50.0, 0.0, 1.3))) * float(np.exp(rng.normal(0.0, 0.2)))
    scale = rng.uniform(0.9, 1.1)
    return FaceParams(
        age=float(age),
        gender=gender,
        ethnicity=ethnicity,
        expression=expression,
        skin=tuple(np.clip(skin, 0, 255).tolist()),
        hair=tuple(np.clip(hair, 0, 255).tolist()),
        background=tuple(rng.uniform(20, 235, 3).tolist()),
        head_w=0.27 * scale * (1.0 + 0.05 * child) * rng.uniform(0.95, 1.05),
        head_aspect=(1.30 - 0.25 * child) * rng.uniform(0.96, 1.04),
        eye_size=(0.052 + 0.030 * child) * scale * rng.uniform(0.9, 1.1),
        eye_y=0.44 + 0.10 * child + rng.normal(0.0, 0.015),
        hairline=recede,
        long_hair=bool(gender == "female" and rng.random() < 0.8),
        wrinkles=wrinkles,
        texture=texture,
        spots=int(rng.poisson(max(0.0, (cue_age - 58.0) / 5.0))),
        smile=_SMILE[expression] * rng.uniform(0.8, 1.0),
        smile_lines=float(rng.uniform(0.2, 2.0)),
        contrast=CUE_CONTRAST[ethnicity] * float(np.exp(rng.normal(0.0, 0.15))),
        cx=0.5 + rng.normal(0.0, 0.025),
        cy=0.52 + rng.normal(0.0, 0.025),
        angle=float(rng.normal(0.0, 6.0)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.35)),
        jpeg_quality=int(rng.integers(_JPEG_QUALITIES[0], _JPEG_QUALITIES[1] + 1)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _rgb(c, k: float = 1.0) -> tuple[int, int, int]:
    """Colour ``c`` scaled by ``k`` (k < 1 darkens), as Pillow's int triple."""
    return tuple(int(max(0, min(255, round(v * k)))) for v in c)  # type: ignore[return-value]


# size: the renderer of one synthetic face: one drawing step after another
def render_face(p: FaceParams, size: int) -> np.ndarray:
    """Draw the face described by ``p`` at ``size`` x ``size`` pixels.

    Returns a uint8 array (size, size, 3), RGB. Pure: no disk I/O, no global state; the
    skin noise comes from ``p.noise_seed``.
    """
    S = float(size)
    lw = max(1, round(size / 64))  # line width in pixels
    img = Image.new("RGB", (size, size), _rgb(p.background))
    draw = ImageDraw.Draw(img)
    cx, cy = p.cx * S, p.cy * S
    hw = p.head_w * S
    hh = hw * p.head_aspect
    top, bottom = cy - hh, cy + hh

    # hair behind the head (long hair falls to the shoulders)
    hair = _rgb(p.hair)
    if p.long_hair:
        draw.rounded_rectangle(
            (cx - hw * 1.12, top - hh * 0.08, cx + hw * 1.12, bottom + hh * 0.1), radius=hw * 0.6, fill=hair
        )
    else:
        draw.ellipse((cx - hw * 1.06, top - hh * 0.07, cx + hw * 1.06, cy + hh * 0.25), fill=hair)
    # neck and head
    draw.rectangle((cx - hw * 0.35, cy + hh * 0.7, cx + hw * 0.35, S), fill=_rgb(p.skin, 0.92))
    draw.ellipse((cx - hw, top, cx + hw, bottom), fill=_rgb(p.skin))
    # hair over the forehead, down to the hairline; a receding hairline shows more forehead
    hairline_y = top + hh * (0.42 - 0.32 * p.hairline)
    if hairline_y > top + hh * 0.12:
        draw.chord((cx - hw * 1.02, top - hh * 0.04, cx + hw * 1.02, top + 2 * (hairline_y - top)), 180, 360, fill=hair)

    contrast = p.contrast

    def line_k(strength: float) -> float:
        """Brightness factor of a line of ``strength`` on this skin (lower contrast on darker skin)."""
        return 1.0 - min(0.6, strength * contrast)

    eye_y = top + 2 * hh * p.eye_y
    ex = hw * 0.42
    es = p.eye_size * S
    eye_h = es * (0.55 - 0.25 * p.smile)  # smiling narrows the eyes
    # brows
    brow = _rgb(p.hair, 0.9)
    for sgn in (-1, 1):
        x = cx + sgn * ex
        draw.line(
            (x - es * 1.1, eye_y - es * 1.3, x + es * 1.1, eye_y - es * 1.3), fill=brow, width=lw + (p.gender == "male")
        )
    # eyes: white, iris, pupil
    for sgn in (-1, 1):
        x = cx + sgn * ex
        draw.ellipse((x - es, eye_y - eye_h, x + es, eye_y + eye_h), fill=(240, 240, 236))
        r = min(eye_h, es * 0.55)
        draw.ellipse((x - r, eye_y - r, x + r, eye_y + r), fill=(60, 45, 35))
    # nose and mouth
    nose_y = eye_y + hh * 0.42
    draw.line(
        (cx, eye_y + hh * 0.08, cx - hw * 0.08, nose_y, cx + hw * 0.05, nose_y), fill=_rgb(p.skin, 0.75), width=lw
    )
    mouth_y = nose_y + hh * 0.27
    mw = hw * (0.36 + 0.12 * p.smile)
    lip = _rgb((p.skin[0] * 0.85, p.skin[1] * 0.55, p.skin[2] * 0.55))
    if p.expression == "other":  # surprise: round open mouth
        draw.ellipse((cx - mw * 0.35, mouth_y - hh * 0.07, cx + mw * 0.35, mouth_y + hh * 0.09), fill=(70, 30, 30))
    elif p.smile > 0.7:  # open smile with teeth
        draw.chord(
            (cx - mw, mouth_y - hh * 0.12, cx + mw, mouth_y + hh * 0.12),
            0,
            180,
            fill=(245, 240, 235),
            outline=lip,
            width=lw,
        )
    elif p.smile > 0:  # closed smile: an upward curve
        curve = hh * (0.02 + 0.1 * p.smile)
        draw.arc((cx - mw, mouth_y - 2 * curve, cx + mw, mouth_y), 20, 160, fill=lip, width=lw + 1)
    else:
        draw.line((cx - mw, mouth_y, cx + mw, mouth_y), fill=lip, width=lw + 1)

    # wrinkle-like lines: age wrinkles plus the lines a smile makes (the confound)
    # (a smile creases the eye corners and cheeks; raised brows of surprise crease the forehead)
    w_age, w_smile = p.wrinkles, p.smile_lines * p.smile
    w_brow = 0.8 * p.smile_lines if p.expression == "other" else 0.0
    forehead = w_age + w_brow
    n_forehead = min(4, int(forehead * 4.0 + 0.5))
    fh_top = max(hairline_y, top + hh * 0.15)
    for i in range(n_forehead):
        y = fh_top + (eye_y - es * 1.5 - fh_top) * (0.35 + 0.18 * i)
        draw.arc(
            (cx - hw * 0.55, y, cx + hw * 0.55, y + hh * 0.12),
            200,
            340,
            fill=_rgb(p.skin, line_k(0.45 * forehead)),
            width=lw,
        )
    crow = max(w_age, w_smile)  # a crease is a crease: a deep smile line hides the age line
    if crow > 0.05:
        for sgn in (-1, 1):
            x0 = cx + sgn * (ex + es * 1.25)
            for dy in (-0.5, 0.0, 0.5):
                draw.line(
                    (x0, eye_y + dy * es * 0.6, x0 + sgn * es * 0.8, eye_y + dy * es * 1.3),
                    fill=_rgb(p.skin, line_k(0.4 * crow)),
                    width=lw,
                )
    naso = max(w_age, 1.2 * w_smile)
    if naso > 0.05:
        for sgn in (-1, 1):
            draw.line(
                (cx + sgn * hw * 0.2, nose_y - hh * 0.02, cx + sgn * (mw + hw * 0.08), mouth_y + hh * 0.06),
                fill=_rgb(p.skin, line_k(0.45 * naso)),
                width=lw,
            )
    if w_age > 0.3 and p.smile < 0.7:  # bags under the eyes (a broad smile lifts the cheeks over them)
        for sgn in (-1, 1):
            x = cx + sgn * ex
            draw.arc(
                (x - es, eye_y, x + es, eye_y + es * 1.3), 20, 160, fill=_rgb(p.skin, line_k(0.35 * w_age)), width=lw
            )

    noise_rng = np.random.default_rng(p.noise_seed)
    for _ in range(min(p.spots, 12)):
        sx = cx + noise_rng.uniform(-0.7, 0.7) * hw
        sy = cy + noise_rng.uniform(-0.6, 0.5) * hh
        r = max(0.6, S * 0.008)
        draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=_rgb(p.skin, line_k(0.35)))

    if p.angle:
        img = img.rotate(p.angle, resample=Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=_rgb(p.background))
    arr = np.asarray(img, dtype=np.float32)

    # skin texture: noise inside the face ellipse, weaker on darker skin
    yy, xx = np.ogrid[0:size, 0:size]
    inside = ((xx + 0.5 - cx) / hw) ** 2 + ((yy + 0.5 - cy) / hh) ** 2 < 1.0
    std = p.texture * contrast
    if std > 0.5:
        noise = noise_rng.normal(0.0, std, (size, size)).astype(np.float32)
        arr += (noise * inside)[:, :, None] * (np.asarray(p.skin, np.float32) / 200.0)
    # lighting gradient across the whole picture
    gx, gy = math.cos(p.light_angle), math.sin(p.light_angle)
    ramp = 1.0 + p.light_strength * (((xx + 0.5) / S - 0.5) * gx + ((yy + 0.5) / S - 0.5) * gy)
    arr *= ramp[:, :, None].astype(np.float32)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 RGB array with fixed encoder settings (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=2, optimize=False)
    return buf.getvalue()


def make_face(seed: int, split: str, index: int, size: int) -> tuple[dict, bytes]:
    """Labels and JPEG bytes of face ``index`` of ``split`` for dataset ``seed``."""
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    labels = sample_labels(rng)
    params = sample_face_params(rng, labels["visual_age"], labels["gender"], labels["ethnicity"], labels["expression"])
    return labels, encode_jpeg(render_face(params, size), params.jpeg_quality)


def _make_chunk(args: tuple[int, str, int, int, int]) -> list[tuple[dict, bytes]]:
    seed, split, start, stop, size = args
    return [make_face(seed, split, i, size) for i in range(start, stop)]


def write_synthetic(
    out: str | os.PathLike,
    n_train: int = 4000,
    n_valid: int = 1500,
    n_test: int = 2000,
    size: int = 224,
    seed: int = 0,
    workers: int = 2,
    progress: bool = False,
) -> Path:
    """Write a synthetic face dataset in the APPA-REAL release layout; return its folder.

    Files per split: ``gt_avg_{split}.csv`` (file_name, num_ratings, apparent_age_avg,
    apparent_age_std, real_age), ``allcategories_{split}.csv`` (file, gender, race, makeup,
    time, happiness), ``{split}/{file_name}_face.jpg`` (the face, ``size`` x ``size`` px)
    and ``{split}/{file_name}`` (the "full photo": here the same picture). File names are
    ``000000.jpg``, ``000001.jpg``, ... within each split; ``synthetic.json`` marks the folder
    as synthetic (``synthetic_marker``). Same ``seed`` -> byte-identical
    files, whatever ``workers`` is. ``workers`` processes draw the faces (1 = in-process).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 px, got {size}")
    out = Path(out)
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    marker = {
        "generator": "fairage.data.synthetic",
        "version": SYNTH_VERSION,
        "seed": seed,
        "size": size,
        "faces": counts,
    }
    _check_out(out, marker)
    out.mkdir(parents=True, exist_ok=True)
    # marks the folder as drawn, not photographed, so model cards and reports can say so; written
    # first, so an interrupted write is recognised (and finished) by the same command
    atomic.write_text(out / SYNTHETIC_MARKER, json.dumps(marker, indent=2) + "\n")
    tasks = [(seed, split, a, min(a + _CHUNK, n), size) for split, n in counts.items() for a in range(0, n, _CHUNK)]
    total = sum(counts.values())
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(tasks) > 1 else None
    results = pool.map(_make_chunk, tasks) if pool else map(_make_chunk, tasks)
    rows: dict[str, list[dict]] = {s: [] for s in counts}
    try:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task(f"drawing {total} synthetic faces", total=total)
            for (_, split, start, _, _), faces in zip(tasks, results):
                (out / split).mkdir(exist_ok=True)
                for k, (labels, jpeg) in enumerate(faces):
                    name = f"{start + k:06d}.jpg"
                    (out / split / f"{name}_face.jpg").write_bytes(jpeg)
                    (out / split / name).write_bytes(jpeg)
                    rows[split].append({"file_name": name, **labels})
                bar.advance(job, len(faces))
    finally:
        if pool:
            pool.shutdown()
    # the CSVs last and atomically: a folder with the CSVs is a complete dataset
    _write_tables(out, rows)
    return out


def _write_tables(out: Path, rows: dict[str, list[dict]]) -> None:
    """Each split's ``gt_avg_{split}.csv`` and ``allcategories_{split}.csv`` from its faces' labels."""
    import pandas as pd

    for split, recs in rows.items():
        (out / split).mkdir(exist_ok=True)
        df = pd.DataFrame(
            recs,
            columns=[
                "file_name",
                "num_ratings",
                "apparent_age_avg",
                "apparent_age_std",
                "real_age",
                "gender",
                "ethnicity",
                "expression",
                "makeup",
                "time",
            ],
        )
        atomic.write_text(
            out / f"gt_avg_{split}.csv",
            df[["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]].to_csv(
                index=False, float_format="%.4f", lineterminator="\n"
            ),
        )
        cats = pd.DataFrame(
            {
                "file": df["file_name"],
                "gender": df["gender"],
                "race": df["ethnicity"],
                "makeup": df["makeup"],
                "time": df["time"],
                "happiness": df["expression"],
            }
        )
        atomic.write_text(out / f"allcategories_{split}.csv", cats.to_csv(index=False, lineterminator="\n"))


def _check_out(out: Path, marker: dict) -> None:
    """DataError unless ``out`` is absent, empty, or a synthetic set written with the same parameters.

    Anything else (a real dataset, another synthetic set, the user's files) would have its
    tables and images overwritten and be marked synthetic.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose a new folder for the synthetic set")
    if not any(out.iterdir()):
        return
    found = synthetic_marker(out)
    if found is None:
        raise DataError(
            f"{out} is not empty and holds no synthetic set (no {SYNTHETIC_MARKER}); writing there "
            "would overwrite its files: choose a new or empty folder"
        )
    if found != marker:

        def describe(m: dict) -> str:
            faces = m.get("faces") if isinstance(m.get("faces"), dict) else {}
            return (
                f"version {m.get('version')}, seed {m.get('seed')}, {m.get('size')} px, "
                f"{faces.get('train')}/{faces.get('valid')}/{faces.get('test')} faces"
            )

        raise DataError(
            f"{out} holds another synthetic set ({describe(found)}); this one would be "
            f"{describe(marker)}: choose a new or empty folder"
        )


def synthetic_marker(root: str | os.PathLike) -> dict | None:
    """The marker of a dataset folder written by ``write_synthetic`` (its JSON), or None for other data."""
    path = Path(root) / SYNTHETIC_MARKER
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("generator") == "fairage.data.synthetic" else None
