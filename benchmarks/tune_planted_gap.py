"""Does `fairage tune` find a lower-bias model than M1 when a group gap is planted in the data?

Writes the synthetic benchmark (32 px), then plants a gap: every face of one ethnicity
(default ``asian``, about 9% of the faces) has its apparent and real age raised by
``--shift`` years in all splits. Skin colour is visible, so the offset is learnable, but a
model fitted mostly to the majority under-estimates that group: its ethnicity bias grows.
Then trains M1 (``--scale tiny``) as the baseline and runs a ``--trials``-trial NSGA-II tune
of ``mae,ethnicity_bias`` at ``--scale tiny`` over a small space (stage II learning rate, the
weighting scheme, the weights' pseudo-count), with M1 as its reference run, and builds the
report of the front (``fairage report M1 --tune``), whose paired differences
(``fairage.workflows.tune.paired_differences``: trial - M1 on the same test faces, paired bootstrap 95%
interval) decide the check:

    PASS when some Pareto trial has a test ethnicity bias below M1's with an interval that excludes 0.

Prints M1's figures, each front trial's test figures and paired differences, the wall time per
trial beside its budget (a 12-trial tiny tune should take a few minutes on 2 cores) and the verdict.

Usage: python benchmarks/tune_planted_gap.py [--trials 12] [--shift 12] [--group asian]
       [--n-train 600] [--n-valid 500] [--n-test 2000] [--out runs/bench-tune-gap]
An existing ``--out`` is reused (finished trials are kept: run it again to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from fairage.config.presets import load_preset
from fairage.data import write_synthetic
from fairage.outputs.report import TUNE_FRONT, build_report
from fairage.training import train
from fairage.workflows.tune import SearchSpace, read_tune_folder, run_tune

#: the tune's space: the stage II learning rate and the sample weights (the mitigation that can close the gap)
SPACE = {
    "stage2.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "stage2.weighting.scheme": ["none", "age_ethnicity", "age_ethnicity_expression"],
    "stage2.weighting.pseudo_count": {"low": 0.0, "high": 20.0},
}
OBJECTIVES = ("mae", "ethnicity_bias")
#: what every run shares: a 1000-resample bootstrap for the test intervals, no permutations
OVERRIDES = ["eval.n_boot=1000", "eval.n_perm=0"]
#: seconds per trial a 12-trial tiny tune may take to stay "a few minutes" on 2 cores
BUDGET_S = 15.0


def planted_dataset(out: Path, group: str, shift: float, sizes: dict) -> Path:
    """The synthetic set with ``group``'s ages raised by ``shift`` years (built once; reused after)."""
    data = out / "data"
    stamp = data / "planted.json"
    plan = {"group": group, "shift": shift, **sizes}
    if stamp.is_file():
        if json.loads(stamp.read_text()) != plan:
            raise SystemExit(f"{data} holds another planted set ({stamp.read_text()}); give another --out")
        return data
    raw = write_synthetic(out / "raw", size=32, seed=0, workers=2, **sizes)
    if data.exists():
        shutil.rmtree(data)
    shutil.copytree(raw, data, ignore=shutil.ignore_patterns(".fairage_cache"))
    for split in ("train", "valid", "test"):
        gt = pd.read_csv(data / f"gt_avg_{split}.csv")
        cats = pd.read_csv(data / f"allcategories_{split}.csv").set_index("file")
        hit = (cats.loc[gt["file_name"], "race"] == group).to_numpy()
        gt.loc[hit, "apparent_age_avg"] += shift
        gt.loc[hit, "real_age"] += int(round(shift))
        gt.to_csv(data / f"gt_avg_{split}.csv", index=False)
    stamp.write_text(json.dumps(plan))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--shift", type=float, default=12.0, help="years added to the group's ages")
    parser.add_argument("--group", default="asian", help="the ethnicity whose ages are shifted")
    parser.add_argument("--n-train", type=int, default=600)
    # the valid split picks the front and the test split judges it: both large enough for the shifted
    # group (about 9%) to be measured, which costs little (inference only, 32 px)
    parser.add_argument("--n-valid", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tune-gap"))
    args = parser.parse_args()
    sizes = {"n_train": args.n_train, "n_valid": args.n_valid, "n_test": args.n_test}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = planted_dataset(out, args.group, args.shift, sizes)
    t_data = time.perf_counter() - start
    base = load_preset("M1", "tiny", OVERRIDES)
    m1 = out / "M1"
    start = time.perf_counter()
    if not (m1 / "metrics_test.json").is_file():
        train(base, data, m1, resume=m1.exists(), progress=False)
    t_m1 = time.perf_counter() - start

    start, cpu = time.perf_counter(), time.process_time()
    run_tune(
        data,
        out / "tune",
        base,
        SearchSpace(SPACE, base, "benchmark space"),
        OBJECTIVES,
        args.trials,
        study_name="planted-gap",
        scale="tiny",
        references=[m1],
    )
    t_tune, cpu_tune = time.perf_counter() - start, time.process_time() - cpu
    build_report([m1], out / "report", tune=out / "tune")

    tune = read_tune_folder(out / "tune")
    trials = tune.trials
    done = trials[trials["state"] == "COMPLETE"]
    front = pd.read_csv(out / "report" / TUNE_FRONT)
    m1_metrics = json.loads((m1 / "metrics_test.json").read_text())
    print(
        f"planted: {args.group} ages +{args.shift:g} years in every split; {args.n_train}/{args.n_valid}/"
        f"{args.n_test} faces of 32 px (data {t_data:.0f} s)"
    )
    print(
        f"M1 (tiny, {t_m1:.0f} s): test MAE {m1_metrics['mae']:.2f} {_ci(m1_metrics['mae_ci'])}, "
        f"ethnicity bias {m1_metrics['bias']['ethnicity']:.2f} {_ci(m1_metrics['bias_ci']['ethnicity'])} years"
    )
    print(
        f"tune: {len(trials)} trials ({len(done)} finished) in {t_tune:.0f} s this start "
        f"({cpu_tune / max(1, len(done)):.1f} CPU s per trial, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}); wall per trial {done['duration_s'].mean():.1f} s mean, "
        f"{done['duration_s'].max():.1f} s max (budget {BUDGET_S:.0f} s: "
        f"{'met' if done['duration_s'].mean() <= BUDGET_S else 'NOT met'})"
    )
    d_col = "ethnicity_bias - M1"
    print("Pareto trials (test split; trial - M1 paired, * = interval excludes 0):")
    for r in front.to_dict("records"):
        params = trials.set_index("number").loc[r["Trial"], list(SPACE)]
        print(
            f"  trial {r['Trial']:>2}: MAE {r['test mae']:.2f}, ethnicity bias {r['test ethnicity_bias']:.2f} "
            f"{_ci([r['test ethnicity_bias CI low'], r['test ethnicity_bias CI high']])}; "
            f"bias - M1 {r[d_col]:+.2f} {_ci([r[f'{d_col} CI low'], r[f'{d_col} CI high']])}"
            f"{' *' if r[f'{d_col} excludes 0'] == 'yes' else ''}, MAE - M1 {r['mae - M1']:+.2f} "
            f"{_ci([r['mae - M1 CI low'], r['mae - M1 CI high']])}{' *' if r['mae - M1 excludes 0'] == 'yes' else ''}"
            f"  ({', '.join(f'{k}={_fmt(v)}' for k, v in params.items())})"
        )
    lower = front[(front[d_col] < 0) & (front[f"{d_col} excludes 0"] == "yes")]
    verdict = "PASS" if len(lower) else "FAIL"
    print(
        f"{verdict}: {len(lower)} Pareto trial(s) with an ethnicity bias below M1's, paired interval excluding 0"
        f" (baseline: M1 {m1_metrics['bias']['ethnicity']:.2f} years); report: {out / 'report' / 'report.html'}"
    )


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else ""


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
