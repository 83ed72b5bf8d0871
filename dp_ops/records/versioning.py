"""Data versioning with DVC: one shard file per round, content-addressed, restorable from its md5.

A shard (``<data.dir>/<run id>/round_<k>.safetensors``) holds the round's increment: images, labels,
per-sample learner entropy and noise seeds, with the round and ω as metadata. Images are stored either
``raw`` (uint8 (n, C, R, R), the embedded world's tiny images) or ``png``: each image PNG-encoded
(lossless, so the pool trained on is still exactly the stored data), the bytes concatenated in one uint8
array with offsets — the text-to-image world's 256² images stay a few files of modest size.
One file per round, not thousands of PNGs: DVC is slow on many small files. safetensors is a safe
format and writes the same bytes for the same content, so a repeated round deduplicates in the cache.

Outside a pipeline each shard is versioned with ``dvc add`` (DVC's Python API, in process). Inside
``dvc repro`` DVC holds the repository lock and sets ``DVC_STAGE``: then the stage's declared outputs do
the versioning and we only compute the md5 (the same md5 DVC will record). Either way the md5 goes to
MLflow, and :func:`restore_shard` rebuilds the file from the DVC cache with nothing else than it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dp_ops.engine.data import LabelledImages, from_uint8, to_uint8
from dp_ops.engine.loop import RoundRecord
from dp_ops.engine.sampling import Samples
from dp_ops.errors import DataError
from dp_ops.files import atomic_path


@dataclass(frozen=True)
class ShardInfo:
    """A written shard as its round run records it: where, which bytes, and who versioned them."""

    round: int
    path: Path  # relative to the DVC root when inside it
    md5: str
    versioned_by: str  # "dvc add" | "dvc stage outs" | "none" | "resumed"


def shard_name(round_index: int) -> str:
    return f"round_{round_index:03d}.safetensors"


def md5_file(path: str | Path) -> str:
    """The md5 DVC records for a file (DVC 3 hashes the raw bytes)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SHARD_FORMATS = ("raw", "png")


def write_shard(path: Path, samples: Samples, round_index: int, omega: float, fmt: str = "raw") -> None:
    """Write-then-rename: a crash never leaves a truncated shard under the final name."""
    images = to_uint8(samples.images).numpy()
    tensors = encode_png(images) if fmt == "png" else {"images": images}
    tensors.update(
        {
            "labels": samples.labels.numpy().astype(np.int64),
            "entropy": samples.entropy.numpy().astype(np.float32),
            "seeds": np.asarray(samples.seeds, dtype=np.int64),
        }
    )
    metadata = {"round": str(round_index), "omega": repr(float(omega))}
    if fmt == "png":  # (raw shards keep their original two keys)
        metadata.update(format="png", resolution=str(images.shape[-1]))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Sort the header's ``__metadata__`` keys in place. safetensors writes them from a (Rust) hash map,
    in an order that changes from process to process: the same round would get other bytes, another md5,
    and no longer deduplicate in the DVC cache. Same keys, same length: only their order changes."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        meta = header.pop("__metadata__", None)
        if not meta or len(meta) < 2:
            return
        canonical = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"))
        fh.seek(8)
        fh.write(canonical.encode().ljust(size, b" "))


def encode_png(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (n, C, R, R) -> ``png``: the n PNG files back to back, ``png_offsets``: n + 1 byte offsets."""
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    offsets = np.cumsum([0, *(len(b) for b in blobs)]).astype(np.int64)
    return {"png": np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), "png_offsets": offsets}


def decode_png(shard: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of :func:`encode_png`: uint8 (n, C, R, R)."""
    from PIL import Image

    data, offsets = shard["png"].tobytes(), shard["png_offsets"]
    images = []
    for a, b in pairwise(offsets):
        img = np.asarray(Image.open(io.BytesIO(data[a:b])))
        images.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
    return np.stack(images)


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def shard_images(shard: dict[str, np.ndarray]) -> np.ndarray:
    """A shard's images as uint8 (n, C, R, R), whichever format it was written in."""
    return decode_png(shard) if "png" in shard else shard["images"]


def shard_data(shard: dict[str, np.ndarray]) -> LabelledImages:
    """A shard as the pool holds it: images back in [-1, 1] (exactly :func:`dp_ops.engine.data.quantize`)."""
    return LabelledImages(from_uint8(torch.from_numpy(shard_images(shard))), torch.from_numpy(shard["labels"]))


def dvc_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` (which need not exist yet) that holds ``.dvc/``."""
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def cache_path(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps a file with this md5 in the local cache."""
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


class DvcVersioner:
    """Writes and versions one shard per round and says what it wrote (a :class:`ShardInfo`), so that
    the round's MLflow run can link exactly those bytes."""

    def __init__(self, data_dir: str | Path, shard_format: str = "raw") -> None:
        """``data_dir``: the run's shard folder; ``shard_format``: raw or png (see :func:`write_shard`)."""
        if shard_format not in SHARD_FORMATS:
            raise ValueError(f"shard_format={shard_format!r}: allowed {SHARD_FORMATS}")
        self.shard_format = shard_format
        self.data_dir = Path(data_dir)
        self.root = dvc_root(self.data_dir)
        self.in_stage = bool(os.environ.get("DVC_STAGE"))

    @property
    def mode(self) -> str:
        """How shards are versioned here: ``dvc add``, ``dvc stage outs`` or ``none`` (no DVC workspace)."""
        if self.root is None:
            return "none"
        return "dvc stage outs" if self.in_stage else "dvc add"

    def shard_path(self, round_index: int) -> Path:
        return self.data_dir / shard_name(round_index)

    def info(self, round_index: int, path: Path, md5: str, versioned_by: str) -> ShardInfo:
        """The facts about a shard at ``path`` (made relative to the DVC root when inside it)."""
        rel = path.resolve().relative_to(self.root) if self.root is not None else path
        return ShardInfo(round_index, rel, md5, versioned_by)

    def write(self, record: RoundRecord, increment: Samples) -> ShardInfo:
        """Write the round's increment (with the ω it was generated with) and version it."""
        path = self.shard_path(record.round)
        write_shard(path, increment, record.round, record.omega, self.shard_format)
        if self.mode == "dvc add" and self.root is not None:
            _dvc_add(self.root, path)
        return self.info(record.round, path, md5_file(path), self.mode)


def _dvc_add(root: Path, path: Path) -> None:
    from dvc.repo import Repo

    # Concurrent sweep workers in one workspace take turns on DVC's repository lock instead of failing.
    with Repo(str(root), _wait_for_lock=True) as repo:
        repo.scm_context.quiet = True  # library code prints nothing (DVC would print a `git add` hint)
        repo.add([str(path.resolve())])


def restore_shard(root: Path, md5: str, dest: Path) -> Path:
    """Copy the cached object with ``md5`` to ``dest``; pull it from the DVC remote if the cache lacks it.

    Verifies the md5 of what was written and fails loudly on a mismatch.
    """
    src = cache_path(root, md5)
    if not src.is_file():
        _fetch_object(root, md5)
    if not src.is_file():
        raise DataError(f"md5 {md5}: not in the DVC cache at {src.parent.parent} and no remote has it")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        got = md5_file(tmp)
        if got != md5:
            raise DataError(f"{dest}: restored bytes have md5 {got}, the registry says {md5} (corrupt cache?)")
    return dest


def _fetch_object(root: Path, md5: str) -> None:
    """Pull one object by hash from the default DVC remote into the local cache, if a remote is set."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo

    with Repo(str(root)) as repo:
        try:
            repo.cloud.pull([HashInfo("md5", md5)])
        except NoRemoteError:
            return
