"""Where the learner and the Stable Diffusion generator run: ``device = auto | cpu | cuda | cuda:N``.

``auto`` is the first CUDA device when one is visible, else the CPU. Options that only make sense on a
GPU (``generator.dtype=float16|bfloat16``, an explicit ``cuda`` device) fail before any work starts with
one line naming the key, when the machine has no usable CUDA device.

Noise is always drawn on the CPU from per-sample seeds and then moved, so a sample's noise is the same
on every device (what differs between devices is only floating-point arithmetic).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from dp_ops.config import Config
from dp_ops.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager[object]:
    """The one precision mechanism (``generator.precision``, ``train.precision``): ``bfloat16`` runs the
    matrix products and convolutions inside in bfloat16 (AMX on recent x86 CPUs, tensor cores on GPUs)
    while weights, their gradients and everything outside stay float32; ``float32`` changes nothing."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` config value (``auto`` picks CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_devices(cfg: Config) -> torch.device:
    """Fail with a one-line :class:`ConfigError` if a CUDA-only option meets a machine without CUDA."""
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r}: no CUDA device on this machine; use device=auto or cpu")
        index = torch.device(cfg.device).index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={cfg.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
            )
    device = resolve_device(cfg.device)
    dtype = cfg.generator.dtype
    if dtype != "float32" and device.type != "cuda":
        raise ConfigError(
            f"generator.dtype={dtype!r}: needs a CUDA device, but device={cfg.device!r} is the CPU here; "
            "use generator.dtype=float32"
        )
    return device
