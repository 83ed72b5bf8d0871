"""Let torchvision import next to a CPU-only torch whose build differs from torchvision's.

Some registries ship torchvision built against a CUDA torch. With a CPU torch its C++ extension does not
load, so the operators ``torchvision::nms`` / ``torchvision::qnms`` are never defined, and importing
torchvision fails while it registers their fake (meta) kernels — which breaks ``import timm`` and
diffusers' model imports. We define those two operator *schemas* (no kernels; dp_ops never runs NMS)
before torchvision is first imported. Where torchvision's extension loads normally (GPU machines, real
CPU wheels) the operators exist already and this is a no-op.

Import this module before anything that imports torchvision, timm or diffusers models.
"""

from __future__ import annotations

import importlib.util

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: torch.library.Library | None = None  # kept alive: a Library's definitions die with it


def _extension_loads() -> bool:
    """True if torchvision's own C++ ops library loads with this torch (then we must not touch it)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to patch
    from pathlib import Path

    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return True


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if _LIBRARY is not None or _extension_loads():
        return
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if missing:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _LIBRARY.define(_SCHEMAS[name])


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


ensure_torchvision_importable()
