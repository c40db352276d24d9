"""Does bf16 training change the demo's results? fp32 vs ``precision: auto``, several seeds.

Writes the demo's synthetic benchmark and its stand-in pretrained backbone (``fairage
demo``'s own steps, reused when already in ``--out``), then trains each preset at
``cpu`` scale with ``trainer.precision=32-true`` and with ``auto`` (bf16-mixed on a CPU
with native bf16), ``--seeds`` seeds each, preset by preset, and prints per preset and
metric (MAE and the four bias scores, years): the mean over seeds of each arm, the
difference, and the mean 95% bootstrap interval of the fp32 runs; "within" when auto's
seed mean lies inside that interval. Also prints the wall time of each arm.

    python benchmarks/precision_effect.py --out runs/precision [--presets M1,M5] [--seeds 3]

On a busy machine the two arms can run as two processes (``--arms fp32`` and ``--arms auto``,
started once the backbone is there; ``--runs M1-seed1`` splits them further) and ``--compare`` prints the table from finished runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METRICS = ("mae", "age", "gender", "ethnicity", "expression")


def _metric(metrics: dict, name: str) -> tuple[float, list[float] | None]:
    if name == "mae":
        return metrics["mae"], metrics.get("mae_ci")
    return metrics["bias"][name], metrics.get("bias_ci", {}).get(name)


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    from fairage import training
    from fairage.workflows.suite import (
        DEMO_SIZES,
        PRETRAINED_STAGE2_LR,
        _synthetic_once,
        is_finished_run,
        pretrain_backbone,
        suite_configs,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/precision"))
    ap.add_argument("--presets", default="M1,M5,M2,M3,M4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="fp32,auto", help="which arms to train: fp32, auto or both")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--runs", default=None, help="train only these run folders, e.g. M1-seed1 (default: all)")
    ap.add_argument("--compare", action="store_true", help="train nothing; print the table of finished runs")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    console = Console()
    if args.compare:
        for preset in presets:
            _print_preset(console, args.out, preset, args.seeds)
        return

    out = args.out
    started = time.perf_counter()
    data_dir = _synthetic_once(
        out,
        DEMO_SIZES["n_train"],
        DEMO_SIZES["n_valid"],
        DEMO_SIZES["n_test"],
        DEMO_SIZES["size"],
        0,
        lambda event: console.print(event.message),
    )
    weights = pretrain_backbone(out, "cpu", DEMO_SIZES["size"], progress=False)
    console.print(f"data and stand-in backbone ready in {time.perf_counter() - started:.0f} s")
    arms = {
        arm: precision for arm, precision in {"fp32": "32-true", "auto": "auto"}.items() if arm in args.arms.split(",")
    }
    seconds = {arm: 0.0 for arm in arms}
    for preset in presets:
        for arm, precision in arms.items():
            overrides = [
                f"model.weights={weights.resolve()}",
                f"stage2.lr={PRETRAINED_STAGE2_LR}",
                f"trainer.precision={precision}",
                f"data.image_size={DEMO_SIZES['size']}",
            ]
            for name, cfg in suite_configs([preset], "cpu", args.seeds, overrides):
                run_dir = out / arm / name
                if args.runs and name not in args.runs.split(","):
                    continue
                if is_finished_run(run_dir, cfg, data_dir):
                    continue
                t, cpu = time.perf_counter(), time.process_time()
                # an interrupted run of this script continues where it stopped
                training.train(cfg, data_dir, run_dir, resume=(run_dir / "run.json").is_file(), progress=False)
                seconds[arm] += time.perf_counter() - t
                used = json.loads((run_dir / "run.json").read_text())["precision"]
                # CPU time: on a shared machine the wall time mostly measures the other processes
                console.print(
                    f"{arm}/{name} ({used}): {time.perf_counter() - t:.0f} s wall, "
                    f"{time.process_time() - cpu:.0f} s CPU"
                )
        if len(arms) == 2:
            _print_preset(console, out, preset, args.seeds)
    console.print("training wall time: " + ", ".join(f"{arm} {s:.0f} s" for arm, s in seconds.items()))


def _print_preset(console, out: Path, preset: str, seeds: int) -> None:
    from fairage.workflows.suite import run_name

    runs = {
        arm: [
            json.loads((out / arm / run_name(preset, k, seeds) / "metrics_test.json").read_text()) for k in range(seeds)
        ]
        for arm in ("fp32", "auto")
    }
    console.print(f"{preset}: metric  fp32 mean ± std | auto mean ± std | auto - fp32 | fp32 mean 95% interval")
    for name in METRICS:
        vals = {arm: np.array([_metric(m, name)[0] for m in ms]) for arm, ms in runs.items()}
        cis = [_metric(m, name)[1] for m in runs["fp32"]]
        lo, hi = (
            (float(np.mean([c[0] for c in cis])), float(np.mean([c[1] for c in cis]))) if all(cis) else (None, None)
        )
        a, f = vals["auto"].mean(), vals["fp32"].mean()
        inside = "within" if lo is not None and lo <= a <= hi else "OUTSIDE"
        interval = f"[{lo:.2f}, {hi:.2f}] {inside}" if lo is not None else "(no interval)"
        console.print(
            f"  {name:<10} {f:6.2f} ± {vals['fp32'].std(ddof=1) if seeds > 1 else 0:.2f} | "
            f"{a:6.2f} ± {vals['auto'].std(ddof=1) if seeds > 1 else 0:.2f} | {a - f:+.2f} | {interval}",
            highlight=False,
        )


if __name__ == "__main__":
    main()
