"""Coverage and width per group of a run's conformal age intervals: Mondrian and plain side by side.

The run's model predicts its validation and test faces (the training image cache is reused);
intervals are calibrated on the validation faces for each ``--by`` choice and scored on the
test faces by ``fairage.fairness.metrics.evaluate`` (bootstrap intervals), so one prediction pass
compares several groupings. A run folder whose best checkpoint exists is enough (it need not
have finished).
Usage: python benchmarks/conformal_coverage.py RUN_DIR [--by age --by age,gender] [--alpha 0.1]
       [--n-boot 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from fairage.fairness.conformal import fit_calibration, interval_arguments
from fairage.fairness.metrics import evaluate
from fairage.inference.predictor import load_model, predict_faces
from fairage.store.run_folder import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument(
        "--by",
        action="append",
        help="comma-separated attributes (repeatable); default age",
    )
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    folder = RunFolder.open(args.run_dir)
    model = load_model(args.run_dir)
    faces = {split: folder.faces(split) for split in ("valid", "test")}
    for table in faces.values():
        table["prediction"] = predict_faces(model, table)
    out = {}
    for text in args.by or ["age"]:
        by = [a for a in text.split(",") if a]
        cal, notes = fit_calibration(faces["valid"], args.alpha, by=by)
        test = faces["test"]
        attributes = ["age", *dict.fromkeys(a for a in by if a != "age")]
        result = evaluate(
            test,
            attributes=attributes,
            n_boot=args.n_boot,
            **interval_arguments(cal, test),
        )
        out[text] = {
            "mae": result.mae,
            "notes": notes,
            "half_widths": {g: q.quantile for g, q in cal.groups.items()},
            "coverage": {name: c.to_json() for name, c in result.coverage.items()},
        }
        print(f"by {text or 'nothing (plain)'}: test MAE {result.mae:.2f} years, {len(test)} test faces")
        for name, cov in result.coverage.items():
            print(f"  {name:9s} coverage {100 * cov.total.coverage:5.1f}%  width {cov.total.width:5.1f} years")
            for attr in attributes:
                cells = [f"{g} {100 * s.coverage:.1f}% (w {s.width:.1f}, n {s.n})" for g, s in cov.groups[attr].items()]
                print(f"    {attr}: " + "; ".join(cells) + f"; gap {100 * (cov.gap[attr] or 0):.1f} pts")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
