"""Where the learner and the Stable Diffusion generator run: ``device = auto | cpu | cuda | cuda:N``.

``auto`` is the first CUDA device when one is visible, else the CPU. Options that only make sense on a
GPU (``generator.dtype=float16|bfloat16``, an explicit ``cuda`` device) fail before any work starts with
one line naming the key, when the machine has no usable CUDA device.

Noise is always drawn on the CPU from per-sample seeds and then moved, so a sample's noise is the same
on every device (what differs between devices is only floating-point arithmetic).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from dp_ops.config import Config
from dp_ops.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager[object]:
    """The one precision mechanism (``generator.precision``, ``train.precision``): ``bfloat16`` runs the
    matrix products and convolutions inside in bfloat16 (AMX on recent x86 CPUs, tensor cores on GPUs)
    while weights, their gradients and everything outside stay float32; ``float32`` changes nothing.
    On the ``meta`` device (shapes only, what the device tests run on) it changes nothing either: autocast
    has no meta device type, and a meta run checks where tensors live, not their precision."""
    device_type = torch.device(device).type
    if precision == "float32" or device_type == "meta":
        return nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` config value (``auto`` picks CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``generator.dtype`` as a torch dtype: ``auto`` is bfloat16 on CUDA (half float32's memory, tensor-core
    matmuls, float32's range: nothing overflows) and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


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
    if dtype not in ("float32", "auto") and device.type != "cuda":
        raise ConfigError(
            f"generator.dtype={dtype!r}: needs a CUDA device, but device={cfg.device!r} is the CPU here; "
            "use generator.dtype=float32"
        )
    return device


def set_deterministic(on: bool) -> None:
    """``deterministic``: make CUDA kernels deterministic, or leave torch's fast defaults (set both ways, since
    a benchmark worker runs one config after another). On the CPU the sampler and the learner already give
    the same bytes for the same seed; on a GPU the backward passes of guidance (interpolate, SDPA, cuDNN
    convolutions) and cuBLAS's split reductions do not, unless asked: cuDNN's deterministic algorithms
    without autotuning, a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts, so
    before any model runs) and torch's deterministic implementations, warning where an op has none. NCCL's
    reductions across GPUs stay order-dependent: several GPUs agree to rounding, not bit for bit."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)
