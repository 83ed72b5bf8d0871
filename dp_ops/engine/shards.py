"""Round parts: the immutable safetensors files a round is written as, and the pool streams from.

A round of n samples is written as ⌈n / S⌉ *parts* of S = ``data.part_size`` samples: part p holds the
round's samples [p·S, (p+1)·S) with their labels, per-sample noise seeds and learner entropy, in
``<shards>/round_<k>/part_<p>.safetensors``. A part is generated in exactly the batches a single process
uses (S is a multiple of ``generator.batch_size``), so its bytes depend on its sample indices only, never
on how many parts a caller asks for at once; a round is one folder, versioned as one DVC directory output.

Images are stored ``raw`` (uint8 (n, C, R, R): the embedded world's small images; memory-mapped when
read) or ``png`` (each image PNG-encoded, losslessly, in a thread pool; the bytes back to back in one uint8
array with n + 1 offsets: 256² images at a fraction of the bytes). The header's metadata (round, part,
start, ω, format) has sorted keys, so the same part has the same bytes in every process and deduplicates
in the DVC cache.

Only headers are read to build the pool's table of parts (:func:`scan_round`; :func:`read_part` adds the
labels, for a resume's checks); images are read lazily, a few at a time (:class:`PartReader`). A damaged
header is one :class:`DataError` line, never a decoding traceback.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dp_ops.errors import DataError
from dp_ops.files import atomic_path

FORMATS = ("raw", "png")
_DTYPES = {"U8": np.uint8, "I64": np.int64, "F32": np.float32}


def round_dir(shards: str | Path, round_index: int) -> Path:
    return Path(shards) / f"round_{round_index:03d}"


def part_name(index: int) -> str:
    return f"part_{index:05d}.safetensors"


def part_slices(n: int, part_size: int) -> list[slice]:
    """Sample ranges [p·S, (p+1)·S) of a round of ``n`` samples (the last part may be shorter)."""
    return [slice(start, min(start + part_size, n)) for start in range(0, n, part_size)]


@dataclass(frozen=True)
class Part:
    """One part file, as its header describes it."""

    path: Path
    round: int
    index: int  # p
    start: int  # position of its first sample in the round
    count: int
    nbytes: int  # file size
    fmt: str


def write_part(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    entropy: np.ndarray,
    seeds: np.ndarray,
    *,
    round_index: int,
    index: int,
    start: int,
    omega: float,
    fmt: str = "raw",
) -> Part:
    """Write one part (write-then-rename: a crash never leaves a truncated part under its name).
    ``images``: uint8 (n, C, R, R)."""
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise ValueError(f"shard format {fmt!r}: allowed {FORMATS}")
    tensors = encode_png(images) if fmt == "png" else {"images": np.ascontiguousarray(images)}
    tensors.update(labels=labels.astype(np.int64), entropy=entropy.astype(np.float32), seeds=seeds.astype(np.int64))
    metadata = {
        "round": str(round_index),
        "part": str(index),
        "start": str(start),
        "omega": repr(float(omega)),
        "format": fmt,
        "resolution": str(images.shape[-1]),
        "channels": str(images.shape[1]),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonical_header(tmp)
    return Part(path, round_index, index, start, len(labels), path.stat().st_size, fmt)


def _canonical_header(path: Path) -> None:
    """Sort the header's ``__metadata__`` keys in place. safetensors writes them from a (Rust) hash map,
    in an order that changes from process to process: the same part would get other bytes, another md5,
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
    """uint8 (n, C, R, R) -> ``png``: the n PNG files back to back, ``png_offsets``: n + 1 byte offsets.
    Encoded in a thread pool (zlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        blobs = list(pool.map(_png_bytes, images))
    offsets = np.cumsum([0, *(len(b) for b in blobs)]).astype(np.int64)
    return {"png": np.frombuffer(b"".join(blobs), dtype=np.uint8), "png_offsets": offsets}


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(blob: bytes | np.ndarray) -> np.ndarray:
    """One PNG back to uint8 (C, R, R)."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(bytes(blob))))
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (tensor names -> dtype, shape, data_offsets; ``__metadata__``) and the byte
    position where tensor data starts. Reads a few hundred bytes, whatever the part's size; a damaged header
    (a length past the file's end, bytes that are not JSON) is one :class:`DataError` line."""
    with open(path, "rb") as fh:
        return _header(fh, Path(path))


def _header(fh: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    size = int.from_bytes(fh.read(8), "little")
    if size > os.fstat(fh.fileno()).st_size - 8:  # (a flipped length byte: exabytes to read, or allocate)
        raise DataError(f"{path}: not a part file (header length {size} runs past the file's end)")
    try:
        header = json.loads(fh.read(size))
    except ValueError as exc:  # (UnicodeDecodeError and JSONDecodeError alike)
        raise DataError(f"{path}: not a part file (header unreadable: {exc})") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a part file (header is not a table)")
    return header, 8 + size


def part_info(path: str | Path) -> Part:
    """A part as its header describes it; a header without the facts every part carries is one line."""
    path = Path(path)
    with open(path, "rb") as fh:
        header, _ = _header(fh, path)
        return _part(path, header, os.fstat(fh.fileno()).st_size)


def _part(path: Path, header: dict[str, Any], nbytes: int) -> Part:
    try:
        meta = header["__metadata__"]
        fmt = meta.get("format", "raw")
        count = int(header["labels"]["shape"][0])
        return Part(path, int(meta["round"]), int(meta["part"]), int(meta["start"]), count, nbytes, fmt)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DataError(f"{path}: not a part file (header lacks {exc})") from None


def read_part(path: str | Path) -> tuple[Part, np.ndarray]:
    """A part as its header describes it and its labels (int64, one per sample), in one open: a few bytes
    per sample, no image touched."""
    path = Path(path)
    with open(path, "rb") as fh:
        header, start = _header(fh, path)
        part = _part(path, header, os.fstat(fh.fileno()).st_size)
        try:
            begin, end = header["labels"]["data_offsets"]
            ok = header["labels"]["dtype"] == "I64" and end - begin == 8 * part.count
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{path}: not a part file (no int64 labels in its header)")
        fh.seek(start + begin)
        data = fh.read(end - begin)
    if len(data) != end - begin:
        raise DataError(f"{path}: not a part file (labels run past the file's end)")
    return part, np.frombuffer(data, dtype="<i8")


def scan_round(folder: str | Path) -> list[Part]:
    """A round folder's parts in order, from their headers only."""
    parts = [part_info(p) for p in sorted(Path(folder).glob("part_*.safetensors"))]
    return sorted(parts, key=lambda p: p.index)


class PartReader:
    """Lazy access to one part: arrays are memory-mapped (file-backed pages the kernel may drop), so
    reading a few images costs a few pages, not the part."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header, start = read_header(self.path)
        self.meta: dict[str, str] = header.pop("__metadata__", {})
        self._arrays = {name: self._map(spec, start) for name, spec in header.items()}

    def _map(self, spec: dict[str, Any], start: int) -> np.ndarray:
        begin, end = spec["data_offsets"]
        dtype, shape = _DTYPES[spec["dtype"]], tuple(spec["shape"])
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=start + begin, shape=shape)

    def __len__(self) -> int:
        return int(self._arrays["labels"].shape[0])

    def array(self, name: str) -> np.ndarray:
        """``labels``, ``entropy`` or ``seeds`` (small: read whole)."""
        return np.array(self._arrays[name])

    def images(self, idx: np.ndarray | slice | None = None) -> np.ndarray:
        """uint8 (m, C, R, R) of the samples ``idx`` (all when None), whichever format the part holds."""
        if "images" in self._arrays:
            data = self._arrays["images"]
            return np.array(data if idx is None else data[idx])
        rows = np.arange(len(self))[slice(None) if idx is None else idx]
        data, offsets = self._arrays["png"], self._arrays["png_offsets"]
        return np.stack([decode_png(data[offsets[i] : offsets[i + 1]]) for i in np.atleast_1d(rows)])
