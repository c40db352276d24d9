"""Which numeric precision and memory layout training uses on the device at hand.

``trainer.precision: auto`` becomes ``bf16-mixed`` where the processor computes bfloat16
natively (CUDA GPUs with bf16 support; CPUs with AVX512-BF16 or AMX tiles) and
``32-true`` elsewhere, where bf16 would be emulated and slower than float32. Any other
value (``32-true``, ``bf16-mixed``, ``16-mixed``, ...) is passed to Lightning as given.

bf16 only applies inside training and validation steps (Lightning's autocast);
evaluation, test predictions and the stage-I feature cache run in float32
(``fairage.training.predict`` / ``extract_features``): bf16 rounds a sigmoid output of
``100 * y`` years to steps of 0.2-0.4 years, the size of the bias scores being measured.
"""

from __future__ import annotations

import torch

#: what ``trainer.precision: auto`` resolves to where bf16 is native / where it is not
BF16 = "bf16-mixed"
FP32 = "32-true"


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 arithmetic in hardware (AVX512-BF16 or AMX), as torch reports it.

    Without it torch still runs bf16 on the CPU, but by conversion to float32, slower than float32 itself.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cuda_has_bf16() -> bool:
    """True when a CUDA device is present and supports bfloat16 natively (compute capability >= 8.0)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def auto_precision(accelerator: str) -> str:
    """Lightning precision for ``precision: auto`` on ``accelerator`` ("gpu" or "cpu", as resolved)."""
    if accelerator == "gpu":
        return BF16 if cuda_has_bf16() else FP32
    if accelerator == "cpu":
        return BF16 if cpu_has_native_bf16() else FP32
    return FP32
