"""Training throughput of fairage's stages, float32 next to ``precision: auto`` (not a test).

    python benchmarks/train_throughput.py --backbone resnet50 --size 224 --batch 16 --n-images 128
    python benchmarks/train_throughput.py --backbone resnet18 --size 64 --batch 64
    python benchmarks/train_throughput.py --backbone resnet50 --size 224 --batch 32 --device cuda

Runs the real ``fairage.training.fit_stage`` (Lightning loop, validation on a small split,
checkpoints) on random uint8 images, once with ``trainer.precision: 32-true`` and once with
``auto`` (bf16-mixed where the device has native bf16: CUDA, CPUs with AVX512-BF16 or AMX),
and prints images/s of each:

* stage I uncached and stage II (all layers): steady-state training speed, i.e. the
  training batches after each epoch's first one (the first pays one-off set-up), loading
  included, validation excluded;
* stage I cached (``--cached-epochs`` epochs, features extracted once), in the lean loop
  (``fairage.training.lean``, the default) and in Lightning's loop (``stage1.loop: lightning``,
  the previous path): wall time of the whole stage, extraction included, and its speed-up
  over the uncached stage I projected to the same number of epochs (the uncached stage's
  wall time per epoch, set-up included, times the epochs; and, stricter, the epochs at the
  steady-state rate alone).

Then the goals: the lean cached stage I at least 15x the projected uncached one, and stage
II under ``auto`` at least 1.5x its float32 speed (where ``auto`` is bf16).

On a CUDA machine the same command measures the GPU set-up: ResNet-50 at 224 px unless
``--backbone``/``--size`` say otherwise, 8192 images, 6 DataLoader workers with pinned
memory, channels_last (``--no-channels-last`` to compare), bf16-mixed under ``auto``.
``benchmarks/keras_peer.py`` puts the same stage II next to the kit's Keras ``model.fit``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

#: stage II under ``auto`` (bf16) must reach this multiple of its float32 speed
GOAL_BF16_OVER_FP32 = 1.5
#: the lean cached stage I must reach this multiple of the uncached stage I's speed over the same epochs
GOAL_LEAN_OVER_UNCACHED = 15.0


class StepTimer(Callback):
    """Wall time from the end of one training batch to the end of the next, from the first
    batch's end on (one-off set-up excluded; loading the batch included, validation not)."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None  # validation ran between the previous epoch's last batch and this one

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch[0].is_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
            self.images += len(batch[0])
        self._last = now

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def synthetic_set(n: int, size: int, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random uint8 training images (n, size, size, 3), ages (n,), and a validation split of max(batch, n/32)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ages = rng.uniform(1, 90, n).astype(np.float32)
    n_val = max(batch, n // 32)
    return images, ages, images[:n_val], ages[:n_val]


def model_config(backbone: str):
    """The report's M5 head on ``backbone`` with a 512-d projection."""
    from fairage.config.schema import HeadBlock, ModelConfig

    return ModelConfig(
        backbone=backbone,
        projection_dim=512,
        head=[
            HeadBlock(units=256, dropout=0.1),
            HeadBlock(units=128, dropout=0.1),
            HeadBlock(units=64, dropout=0.05),
            HeadBlock(units=32, dropout=0.05),
        ],
    )


def run_stage(
    stage_name: str,
    backbone: str,
    data,
    batch: int,
    epochs: int,
    trainer_cfg,
    cache: bool = False,
    workers: int = 0,
    loop: str = "auto",
) -> tuple[float, float]:
    """Train one stage with ``fit_stage``; return (steady-state training images/s, wall seconds of the stage).

    Cached stages run without the step timer (a Lightning callback would force Lightning's
    loop): their rate is NaN, their wall time is what counts.
    """
    from fairage.config.schema import StageConfig
    from fairage.models.regressor import build_model
    from fairage.training import RunContext, StageArrays, StageSpec, fit_stage

    train_images, train_ages, val_images, val_ages = data
    torch.manual_seed(0)
    model, _ = build_model(model_config(backbone))
    stage = StageConfig(
        lr=1e-4, batch_size=batch, max_epochs=epochs, patience=epochs + 1, cache_features=cache, loop=loop
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = fit_stage(
            model,
            getattr(StageSpec, stage_name)(stage),  # StageSpec.stage1 or .stage2
            StageArrays(train_images, train_ages, val_images, val_ages),
            run_dir=tmp,
            context=RunContext(
                trainer=trainer_cfg, num_workers=workers, progress=False, callbacks=[] if cache else [timer]
            ),
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if cache and result.loop != ("lightning" if loop == "lightning" else "lean"):
        sys.exit(f"the cached stage ran in the {result.loop} loop, not the one measured")
    return timer.rate, seconds


def arms(cuda: bool, channels_last: bool = True, names: tuple[str, ...] = ("fp32", "auto")) -> dict[str, object]:
    """The trainer configs compared: label -> TrainerConfig. ``names``: "fp32", "auto" (as it
    resolves here) and "bf16" (bf16-mixed even where the device emulates it)."""
    from fairage.config.schema import TrainerConfig
    from fairage.training import resolve_precision

    accelerator = "gpu" if cuda else "cpu"
    out = {}
    for name in names:
        precision = {"fp32": "32-true", "auto": "auto", "bf16": "bf16-mixed"}[name]
        cfg = TrainerConfig(accelerator=accelerator, precision=precision, channels_last=channels_last)
        out["fp32" if name == "fp32" else f"{name} = {resolve_precision(cfg)}"] = cfg
    return out


def device_line(cuda: bool) -> str:
    from fairage.training.precision import cpu_has_native_bf16

    if cuda:
        return torch.cuda.get_device_name(0)
    return (
        f"CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'})"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbone",
        default=None,
        choices=["resnet18", "resnet34", "resnet50", "vggface2_resnet50"],
        help="default: resnet18 on CPU, resnet50 on CUDA",
    )
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: 64 on CPU, 224 on CUDA)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--n-images", type=int, default=None, help="training images (default: 1024 on CPU, 8192 on CUDA)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs timed for uncached stage I and stage II")
    ap.add_argument("--cached-epochs", type=int, default=20, help="epochs of the cached stage I")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 6 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--arms",
        default="fp32,auto",
        help="precisions compared, comma-separated: fp32, auto, bf16 (bf16-mixed even where emulated)",
    )
    ap.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="NCHW instead of channels_last images and weights",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    n = args.n_images or (8192 if cuda else 1024)
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.size = args.size or (224 if cuda else 64)
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    data = synthetic_set(n, args.size, args.batch)
    print(
        f"device: {device_line(cuda)}; {args.backbone} at {args.size} px, batch {args.batch}; "
        f"{n} training + {len(data[2])} validation images; workers {workers} "
        f"(pinned memory: {'yes' if cuda else 'no'}); channels_last {'on' if args.channels_last else 'off'}",
        flush=True,
    )
    if cuda:  # cuDNN autotuning and lazy initialisation, not reported
        run_stage("stage2", args.backbone, data, args.batch, 1, arms(cuda, args.channels_last)["fp32"], workers=workers)
        torch.cuda.reset_peak_memory_stats()

    def report(name: str, value: float) -> None:  # printed as measured: a loaded machine may cut the run short
        unit = "x" if name.lstrip().startswith("->") else " images/s"
        print(f"{name}: {value:.1f}{unit}", flush=True)

    stage2: dict[str, float] = {}
    lean_speedups: dict[str, float] = {}
    epochs = args.cached_epochs
    configs = arms(cuda, args.channels_last, tuple(args.arms.split(",")))
    if "fp32" in configs and "auto = 32-true" in configs:  # no native bf16: auto would repeat fp32
        print("auto = 32-true: the same precision as fp32 on this device, measured once", flush=True)
        del configs["auto = 32-true"]
    for label, trainer_cfg in configs.items():
        rate, t_uncached = run_stage(
            "stage1", args.backbone, data, args.batch, args.epochs, trainer_cfg, workers=workers
        )
        report(f"stage I uncached (head, backbone frozen, {label})", rate)
        projected = t_uncached / args.epochs * epochs  # wall time per epoch, set-up included
        steady = n * epochs / rate  # the steady-state rate alone
        for loop, name in (("lightning", "Lightning loop, before"), ("auto", "lean loop")):
            _, t_cached = run_stage(
                "stage1", args.backbone, data, args.batch, epochs, trainer_cfg, cache=True, workers=workers, loop=loop
            )
            report(
                f"stage I cached, {name} ({epochs} epochs incl. extraction, {t_cached:.2f} s, {label})",
                n * epochs / t_cached,
            )
            report(
                f"  -> speed-up over {epochs} uncached epochs ({projected:.1f} s projected), {label}",
                projected / t_cached,
            )
            report(
                f"  -> speed-up over {epochs} uncached epochs at the steady rate ({steady:.1f} s), {label}",
                steady / t_cached,
            )
            if loop == "auto":
                lean_speedups[label] = projected / t_cached
        stage2[label], _ = run_stage(
            "stage2", args.backbone, data, args.batch, args.epochs, trainer_cfg, workers=workers
        )
        report(f"stage II (all layers, {label})", stage2[label])
    for label, speedup in lean_speedups.items():
        verdict = "met" if speedup >= GOAL_LEAN_OVER_UNCACHED else "NOT met"
        print(
            f"lean cached stage I over {epochs} uncached epochs, {label}: {speedup:.1f}x "
            f"(goal >= {GOAL_LEAN_OVER_UNCACHED:g}x: {verdict})"
        )
    for label, rate in stage2.items():
        if label != "fp32" and "fp32" in stage2:
            ratio = rate / stage2["fp32"]
            verdict = "met" if ratio >= GOAL_BF16_OVER_FP32 else "NOT met"
            print(f"stage II {label} / fp32: {ratio:.2f}x (goal >= {GOAL_BF16_OVER_FP32}x: {verdict})")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(f"peak process RSS: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
