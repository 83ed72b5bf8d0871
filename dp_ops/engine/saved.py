"""A saved pixel generator's folder, read without loading a model: its file names, its metadata
(:class:`GeneratorMeta`) and :func:`check_saved`. Standard library only (no torch, no diffusers), so the CLI
checks a generator folder before it imports them; :mod:`dp_ops.engine.backends.pixel` writes and loads
the folder.

Layout: diffusers' ``save_pretrained`` to ``<path>/unet`` and ``<path>/scheduler``, plus
``<path>/dpops_generator.json`` (what it was trained on, its measured quality, and the sha256 of every
other file of the folder). A damaged file, a missing key or weights whose checksum does not match are one
:class:`~dp_ops.errors.GeneratorError` line naming the file, never a model that loads and samples silently
wrong. The meta's ``format`` key is the folder's format (:data:`dp_ops.formats.FORMATS`); :func:`read_meta`
brings an older one forward (:data:`UPGRADES`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dp_ops.config import Config
from dp_ops.errors import GeneratorError
from dp_ops.formats import declared, upgrade

META_FILE = "dpops_generator.json"
FORMAT_KEY = "format"  # the meta's key: the folder's format number
CHECKSUMS = "sha256"  # the meta's key: relative path -> sha256 of every other file of the folder
# the generator.* keys that shape a trained generator (recorded in its meta, so a run can say what it loaded)
TRAINING_KEYS = ("channels", "train_iterations", "train_batch_size", "train_lr", "train_precision", "label_dropout")
# what a folder needs besides the meta (diffusers' save_pretrained layout, safetensors weights)
UNET_CONFIG, WEIGHTS, SCHEDULER_CONFIG = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
REDO = "retrain it (dpops generator train replaces the folder) or point generator.path elsewhere"


@dataclass(frozen=True)
class GeneratorMeta:
    """What a saved generator was trained on; a run refuses a generator that does not match its data."""

    resolution: int
    num_classes: int
    split_seed: int
    data: str
    train_iterations: int
    quality: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # the other generator.* keys it was trained with

    @classmethod
    def of(cls, cfg: Config, num_classes: int) -> GeneratorMeta:
        """What a generator trained now with ``cfg`` on its data's generator-train split is trained on."""
        d, g = cfg.data, cfg.generator
        training = {key: getattr(g, key) for key in TRAINING_KEYS if key != "train_iterations"}
        return cls(d.resolution, num_classes, d.split_seed, d.name, g.train_iterations, training=training)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta JSON of the generator saved at ``path``, brought to the current format (nothing else checked)."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise GeneratorError(f"generator.path={str(path)!r}: no trained generator there ({META_FILE} missing)")
    raw = _json_object(path / META_FILE)
    where = str(path / META_FILE)
    return upgrade("generator", raw, declared("generator", raw.get(FORMAT_KEY), where), where, UPGRADES)


def _from_undeclared(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 0 → 1: a folder saved before 0.5.0 recorded no checksums: its table is empty (its files are
    checked for presence and size, not content); one saved before 0.6.0 recorded no training settings: none.
    (Format 0 did not require ``quality`` either: none measured.) One saved by 0.6.0 to 0.11.0 has them all."""
    return {CHECKSUMS: {}, "quality": {}, "training": {}, **raw}


UPGRADES = {0: _from_undeclared}  # format -> the step to the next one


def check_saved(path: str | Path) -> GeneratorMeta:
    """The meta of the generator saved at ``path``, after checking the folder without loading a model: the
    meta and both configs are JSON with the keys they need, the weights are there and not empty, and every
    file's sha256 is the one recorded at save."""
    path = Path(path)
    raw = read_meta(path)
    names = [f.name for f in fields(GeneratorMeta)]
    missing = [n for n in names if n not in raw]
    if missing:
        raise GeneratorError(f"{path / META_FILE}: missing key {missing[0]!r} (it needs {', '.join(names)}); {REDO}")
    meta = GeneratorMeta(**{n: raw[n] for n in names})
    kinds = {"resolution": int, "num_classes": int, "split_seed": int, "train_iterations": int, "data": str}
    for key, kind in kinds.items():
        value = getattr(meta, key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GeneratorError(f"{path / META_FILE}: {key}={value!r} is not a {kind.__name__}; {REDO}")
    for name in (UNET_CONFIG, WEIGHTS, SCHEDULER_CONFIG):
        file = path / name
        if not file.is_file():
            raise GeneratorError(f"{file}: missing from the generator folder; {REDO}")
        if file.stat().st_size == 0:
            raise GeneratorError(f"{file}: empty file (0 bytes); {REDO}")
    for name, key in ((UNET_CONFIG, "sample_size"), (SCHEDULER_CONFIG, "num_train_timesteps")):
        if key not in _json_object(path / name):
            raise GeneratorError(f"{path / name}: missing key {key!r}; {REDO}")
    sums = raw.get(CHECKSUMS)
    if not isinstance(sums, dict):
        raise GeneratorError(f"{path / META_FILE}: {CHECKSUMS} must map file names to checksums; {REDO}")
    for name, digest in sums.items():
        file = path / str(name)
        if not file.is_file():
            raise GeneratorError(f"{file}: missing from the generator folder; {REDO}")
        if file_sha256(file) != digest:
            raise GeneratorError(f"{file}: damaged (its sha256 is not the one recorded at save); {REDO}")
    return meta


def _json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeneratorError(f"{file}: not valid JSON ({exc}); {REDO}") from None
    if not isinstance(value, dict):
        raise GeneratorError(f"{file}: not a JSON object of keys; {REDO}")
    return value


def file_sha256(file: Path) -> str:
    """The sha256 of ``file``'s bytes, read in 1 MiB chunks (what the meta records for every file)."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
