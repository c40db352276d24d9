"""Real faces: M1, M3, M5 and the mitigation presets on a real dataset folder, over training seeds.

    python benchmarks/real_faces.py --data UTKFACE_DIR --out runs/real-faces [--presets M1,M3,M5,...]
        [--seeds 3] [--scale cpu] [--set key=value ...]

Every preset trains ``--seeds`` times (seeds 0..K-1; the split is the loader's, the same for
every seed) through ``fairage suite``'s machinery, so finished runs are reused and an interrupted
one resumes. The table gives, per preset, the mean ± std over seeds of the test MAE, CS@5 and the
bias scores, and its difference from M1 with a paired bootstrap interval: each resample draws
the same (face, seed) pairs for both presets, so the interval reflects only how the two models
differ on the same faces. Printed and written to ``OUT/real_faces.md`` (and ``.csv``); wall time
per run is printed beside it. Never a test: it needs a real dataset and minutes per run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fairage.fairness.metrics import compare
from fairage.store.predictions import join_predictions, read_predictions
from fairage.store.run_folder import RunFolder
from fairage.workflows.suite import SuiteEvent, run_suite, suite_configs

DEFAULT_PRESETS = "M1,M3,M5,M5-dro,M5-bmc,M5-lds"
ATTRIBUTES = ("age", "gender", "ethnicity")


def _stacked(run_dirs: list[Path]) -> pd.DataFrame:
    """The test predictions of several seeds' runs as one table, images tagged with the seed."""
    parts = []
    for k, run_dir in enumerate(run_dirs):
        folder = RunFolder.open(run_dir)
        faces = folder.faces("test")
        df = join_predictions(
            faces, read_predictions(folder.file(RunFolder.PREDICTIONS)), folder.file(RunFolder.PREDICTIONS)
        )
        df["image"] = df["image"].astype(str) + f"#seed{k}"
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _diff(d) -> str:
    if d is None:
        return "n/a"
    ci = "" if d.ci is None else f" [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]"
    mark = " *" if d.excludes_zero else ""
    return f"{d.estimate:+.2f}{ci}{mark}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/real-faces"))
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if presets[0] != "M1":
        presets = ["M1", *[p for p in presets if p != "M1"]]
    plan = suite_configs(presets, args.scale, args.seeds, args.overrides)
    times: dict[str, float] = {}
    started: dict[str, float] = {}
    failed: list[str] = []

    def on_event(event: SuiteEvent) -> None:
        print(event.message, file=sys.stderr, flush=True)
        name = event.message.split("] ", 1)[-1].split(":", 1)[0]
        if ": training" in event.message or ": resuming" in event.message:
            started[name] = time.perf_counter()
        elif ": done in" in event.message and name in started:
            times[name] = time.perf_counter() - started[name]
        if event.failed:
            failed.append(name)

    t0 = time.perf_counter()
    run_suite(
        args.data,
        args.out,
        presets=presets,
        scale=args.scale,
        seeds=args.seeds,
        overrides=args.overrides,
        progress=False,
        on_event=on_event,
    )
    runs: dict[str, list[Path]] = {}
    for name, cfg in plan:
        if (args.out / name / RunFolder.METRICS).is_file():
            runs.setdefault(cfg.name, []).append(args.out / name)
    base = _stacked(runs["M1"])
    rows = []
    for preset, dirs in runs.items():
        metrics = [RunFolder.open(d).metrics() for d in dirs]
        row = {
            "preset": preset,
            "runs": len(dirs),
            "MAE": _fmt([m.mae for m in metrics]),
            "CS@5": _fmt([m.cs["5"].value for m in metrics if "5" in m.cs], 3),
        }
        for attr in ATTRIBUTES:
            row[f"{attr} bias"] = _fmt([m.bias.get(attr) for m in metrics])
        row["ethnicity worst MAE"] = _fmt(
            [m.worst_group["ethnicity"].mae for m in metrics if m.worst_group.get("ethnicity")]
        )
        if preset != "M1" and len(dirs) == len(runs["M1"]):
            result = compare(base, _stacked(dirs), attributes=list(ATTRIBUTES), n_boot=args.n_boot, seed=0)
            row["MAE - M1"] = _diff(result.mae_diff)
            for attr in ATTRIBUTES:
                row[f"{attr} bias - M1"] = _diff(result.bias_diff.get(attr))
        collapsed = sorted({s for d in dirs for s in RunFolder.open(d).record.collapsed_stages})
        row["collapsed"] = ", ".join(collapsed) or "no"
        row["s/run"] = _fmt([times[p.name] for p in dirs if p.name in times], 0)
        rows.append(row)
    table = pd.DataFrame(rows).fillna("")
    n_test = len(RunFolder.open(runs["M1"][0]).faces("test"))
    header = (
        f"{args.data}: {n_test} test faces, scale {args.scale}, {args.seeds} seed(s); "
        f"{platform.machine()} {platform.processor() or ''}, wall {time.perf_counter() - t0:.0f} s "
        "(s/run: runs trained in this call). Differences: B - M1 with paired 95% intervals "
        "(* = excludes 0)."
    )
    print(header)
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    if failed:
        print(f"failed or collapsed: {', '.join(failed)}")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "real_faces.csv", index=False)
    body = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
    (args.out / "real_faces.md").write_text(header + "\n\n" + body + "\n", encoding="utf-8")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
