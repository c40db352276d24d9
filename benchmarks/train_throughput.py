"""Training throughput of fairage's stages on whatever device is present (not a test).

    python benchmarks/train_throughput.py --backbone resnet50 --size 224 --batch 32 [--device cuda]
    python benchmarks/train_throughput.py --backbone resnet18 --size 64 --batch 64 --device cpu

Prints images/s for stage I uncached (frozen backbone, images through it every epoch),
stage I cached (features computed once, head trained on them; the time includes the
extraction), stage II (all layers), the projected stage I time for ``--cached-epochs``
epochs uncached vs cached, and peak memory. Runs the real ``fairage.training.fit_stage``
(Lightning loop, validation on a small split included) on random uint8 images; on CUDA
it uses bf16 autocast and channels_last (the config defaults).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from fairage.config import HeadBlock, ModelConfig, StageConfig, TrainerConfig
    from fairage.models import build_model
    from fairage.training import StageArrays, fit_stage, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--n-images", type=int, default=None, help="training images (default: 2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs timed for uncached stage I and stage II "
                                                             "(default: 1 on CPU, 3 on CUDA)")
    ap.add_argument("--cached-epochs", type=int, default=20, help="epochs of the cached stage I")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 6 on CUDA)")
    args = ap.parse_args(argv)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available")
    n = args.n_images or (8192 if cuda else 2048)
    epochs = args.epochs or (3 if cuda else 1)
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    trainer_cfg = TrainerConfig(accelerator="gpu" if cuda else "cpu")
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    train_ages = rng.uniform(1, 90, n).astype(np.float32)
    n_val = max(args.batch, n // 32)
    val_images, val_ages = train_images[:n_val], train_ages[:n_val]
    model_cfg = ModelConfig(backbone=args.backbone, projection_dim=512,
                            head=[HeadBlock(units=256, dropout=0.1), HeadBlock(units=128, dropout=0.1),
                                  HeadBlock(units=64, dropout=0.05), HeadBlock(units=32, dropout=0.05)])
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; precision {resolve_precision(trainer_cfg)}; {args.backbone} at {args.size} px, "
          f"batch {args.batch}; {n} training + {n_val} validation images; workers {workers}")

    def timed(stage_name: str, n_epochs: int, cache: bool) -> float:
        model, _ = build_model(model_cfg)
        stage = StageConfig(lr=1e-4, batch_size=args.batch, max_epochs=n_epochs, patience=n_epochs + 1,
                            cache_features=cache)
        if cuda:
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fit_stage(model, stage_name, stage, StageArrays(train_images, train_ages, val_images, val_ages), tmp,
                      trainer_cfg=trainer_cfg, num_workers=workers, progress=False)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

    # warm-up (cuDNN autotuning, lazy inits), not reported
    if cuda:
        timed("stage2", 1, cache=False)
        torch.cuda.reset_peak_memory_stats()

    results = {}
    t_uncached = timed("stage1", epochs, cache=False)
    results["stage I uncached"] = n * epochs / t_uncached
    t_cached = timed("stage1", args.cached_epochs, cache=True)
    results[f"stage I cached ({args.cached_epochs} epochs incl. extraction)"] = n * args.cached_epochs / t_cached
    t_stage2 = timed("stage2", epochs, cache=False)
    results["stage II (all layers)"] = n * epochs / t_stage2
    width = max(len(k) for k in results)
    for name, rate in results.items():
        print(f"  {name:<{width}}  {rate:10.1f} images/s")
    projected = t_uncached / epochs * args.cached_epochs
    print(f"  stage I for {args.cached_epochs} epochs: uncached ~{projected:.1f} s (projected), cached {t_cached:.1f} s "
          f"-> {projected / t_cached:.1f}x faster")
    if cuda:
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(f"  peak process RSS: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
