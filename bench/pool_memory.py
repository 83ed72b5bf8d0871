"""Memory bounded by a part, not by the pool: the three figures of the streaming-pool change, side by side.

1. Training: peak anonymous resident memory (``RssAnon``: memory-mapped part pages are file-backed and the
   kernel may drop them, so they do not count) of 200 training steps at pool sizes 2k, 20k and 200k images
   (64² RGB, raw parts of synthetic bytes), streamed from the parts vs. held in memory as the pool was before
   (uint8 images, concatenated). The figure is the ratio largest/smallest (target ≤ 1.1 while the pool grows
   100×).
2. Generation: the rise of peak anonymous memory over the process's baseline while one round of P images
   is generated and written part by part, divided by one part's bytes, at two P ten times apart (target ≤ 3
   at both), vs. one ``sample`` call for the whole round (the float pile the loop used to make). The
   baseline is the peak of generating one batch: the models and one batch's activations, which any round
   needs whatever its size (the UNet's working set, freed and re-taken every batch).
3. Resume: seconds from ``run_tracked(..., resume_run_id=…)`` to the first training step at pools 10× apart
   (target ratio ≤ 1.2): the part table comes from headers, nothing is decoded, and (4.) only changed parts
   are hashed.
4. The integrity check a resume makes on every finished round's parts (``versioning.adopt_round``: each
   part's md5 against the store's, its header against where it is used, its labels in range) at 10⁵
   parts, side by side: every part hashed vs. DVC's state database answering for unchanged files (filled
   with ``State.save_many``, as ``dvc add`` fills it; ``dvc add`` of 10⁵ files itself is not the figure).
   Parts are small (64 grey 8² images, ~4.6 kB), so hashing here is mostly per-file cost; its MB/s says what
   real parts (a 1024-image 64² RGB part is 12 MB) would cost. Files are in the page cache (just written).

Every measurement runs in a fresh process. Usage: ``python bench/pool_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

RES, CHANNELS = 64, 3
IMAGE_BYTES = RES * RES * CHANNELS
GEN_RES = 32  # generation at 32² RGB (a random tiny UNet, 1 DDIM step): 4× faster on 2 cores than 64²
GEN_BYTES = GEN_RES * GEN_RES * CHANNELS


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakAnon:
    """Samples RssAnon every 2 ms in a thread; ``peak`` is the highest value seen (kB)."""

    def __enter__(self) -> PeakAnon:
        self.peak, self._stop = rss_anon_kb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_anon_kb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_kb())


# ---- 1. training ---------------------------------------------------------------------------------------
def write_pool(folder: Path, n: int, part_size: int) -> None:
    import numpy as np

    from dp_ops.engine.shards import part_name, part_slices, write_part

    rng = np.random.default_rng(0)
    for p, sl in enumerate(part_slices(n, part_size)):
        m = sl.stop - sl.start
        images = rng.integers(0, 256, (m, CHANNELS, RES, RES), dtype=np.uint8)
        labels = np.arange(sl.start, sl.stop) % 10
        write_part(
            folder / part_name(p),
            images,
            labels,
            np.zeros(m),
            np.arange(sl.start, sl.stop),
            round_index=0,
            index=p,
            start=sl.start,
            omega=0.0,
        )


def train_peak(folder: Path, mode: str, steps: int) -> dict:
    import torch

    from dp_ops.config import LearnerConfig, TrainConfig
    from dp_ops.engine.data import LabelledImages
    from dp_ops.engine.learner import Trainer, build_learner
    from dp_ops.engine.pool import Pool
    from dp_ops.engine.shards import PartReader, scan_round

    torch.set_num_threads(1)
    recipe = TrainConfig(iterations=steps, eval_every=steps, batch_size=128)
    trainer = Trainer(build_learner(LearnerConfig(model="dpops_convnet_tiny"), 10, CHANNELS, 0), recipe, 0)
    parts = scan_round(folder)
    trainer.train(LabelledImages(torch.zeros(8, CHANNELS, RES, RES, dtype=torch.uint8), torch.zeros(8).long()), 2)
    base = rss_anon_kb()  # torch, the learner and its optimiser warmed up
    with PeakAnon() as peak:
        if mode == "streamed":
            data: Pool | LabelledImages = Pool(parts)
        else:  # what the loop held before: every round's uint8 images in memory, concatenated
            chunks = [torch.from_numpy(PartReader(p.path).images()) for p in parts]
            labels = [torch.from_numpy(PartReader(p.path).array("labels")) for p in parts]
            data = LabelledImages(torch.cat(chunks), torch.cat(labels))
        t0 = time.perf_counter()
        trainer.train(data, steps)
        seconds = time.perf_counter() - t0
    return {"base_kb": base, "peak_kb": peak.peak, "seconds": seconds}


# ---- 2. generation -------------------------------------------------------------------------------------
def gen_peak(folder: Path, mode: str, n: int, part_size: int, batch: int) -> dict:
    import numpy as np
    import torch

    from dp_ops.config import GeneratorConfig
    from dp_ops.engine.backends.pixel import PixelDiffusion, build_scheduler, build_unet
    from dp_ops.engine.loop import round_labels, round_seeds
    from dp_ops.engine.rounds import Sampling, generate_round
    from dp_ops.engine.saved import GeneratorMeta

    torch.set_num_threads(1)
    meta = GeneratorMeta(resolution=GEN_RES, num_classes=10, split_seed=0, data="digits", train_iterations=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(GeneratorConfig(channels=(8, 16)), GEN_RES, 10, in_channels=CHANNELS)
    generator = PixelDiffusion(unet, build_scheduler(), meta)
    how = Sampling(steps=1, cfg_scale=1.0, guide_every=1, batch_size=batch, learner=lambda x: x.flatten(1)[:, :10])
    labels, seeds = round_labels(0, 0, n, 10), round_seeds(0, 0, n)
    with PeakAnon() as one_batch:  # the baseline: the models and one batch's working set
        generate_round(
            generator,
            labels[:batch],
            seeds[:batch],
            folder / "warm",
            how,
            round_index=0,
            omega=0.0,
            part_size=batch,
            fmt="raw",
        )
    base = one_batch.peak
    with PeakAnon() as peak:
        t0 = time.perf_counter()
        if mode == "parts":
            generate_round(
                generator,
                labels,
                seeds,
                folder / "round",
                how,
                round_index=0,
                omega=0.0,
                part_size=part_size,
                fmt="raw",
            )
        else:  # one call for the whole round, then quantised: the float pile the loop used to hold
            s = generator.sample(labels, seeds, steps=1, cfg_scale=1.0, learner=how.learner, batch_size=batch)
            images = ((s.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            np.save(folder / "round.npy", images)
        seconds = time.perf_counter() - t0
    return {"base_kb": base, "peak_kb": peak.peak, "seconds": seconds}


# ---- 3. resume -----------------------------------------------------------------------------------------
def resume_seconds(folder: Path, n: int, part_size: int) -> dict:
    import torch

    from dp_ops.config import build_config
    from dp_ops.engine.data import load_digits_data
    from dp_ops.engine.loop import Observer
    from dp_ops.engine.sampling import Generator
    from dp_ops.records.tracking import TrackingStore
    from dp_ops.runner import run_tracked

    torch.set_num_threads(1)

    class Flat(Generator):  # a stand-in generator: the figure is the resume, not the sampling
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(num_train_timesteps=1000)
        learner_resolution = RES
        device = torch.device("cpu")
        noise_shape = (1, RES, RES)

        def model_output(self, x_t, t, labels, cfg_scale):
            return torch.zeros_like(x_t)

        def to_learner(self, x0):
            return x0

        def to_images(self, x0):
            return x0

    class StopAtFirstStep(Observer):
        def __init__(self) -> None:
            self.at: float | None = None

        def on_progress(self, task: str, completed: int, total: int) -> None:
            if task == "train":
                self.at = time.perf_counter()
                raise KeyboardInterrupt  # the run ends KILLED, resumable from its round-0 checkpoint

    real = load_digits_data(build_config({"data": {"resolution": RES}}).data)  # grey: the Flat images are too
    tree = {
        "seed": 0,
        "data": {"resolution": RES, "part_size": part_size},
        "generator": {"steps": 1, "batch_size": 256},
        "learner": {"model": "dpops_convnet_tiny"},
        "dp": {"strategy": "static", "initial_size": n},
        "train": {"iterations": 100, "eval_every": 1},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
        "output": {k: str(folder / k) for k in ("metrics", "rounds", "shards", "checkpoints")},
    }
    cfg, store = build_config(tree), TrackingStore(tree["tracking"]["uri"])
    stop = StopAtFirstStep()
    with contextlib.suppress(KeyboardInterrupt):
        run_tracked(cfg, Flat(), real, [stop], store=store)
    (run,) = store.search([store.experiment_id("dp-ops")], "tags.`dpops.role` = 'experiment'")
    again, t0 = StopAtFirstStep(), time.perf_counter()
    with contextlib.suppress(KeyboardInterrupt):
        run_tracked(cfg, Flat(), real, [again], resume_run_id=run.run_id, store=store)
    assert again.at is not None
    return {"seconds": again.at - t0}


# ---- 4. the integrity check on resume -------------------------------------------------------------------
CHECK_PART = 64  # images per part: 64 grey 8² images, ~4.6 kB a part


def write_checked_round(folder: Path, parts: int) -> None:
    """A DVC workspace ``folder`` with one round of ``parts`` small parts, DVC's state database told their
    md5s (as ``dvc add`` leaves it), and the store's listing of them in ``parts.json``."""
    import numpy as np
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo

    from dp_ops.engine.shards import part_name, write_part
    from dp_ops.records.versioning import md5_file

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=folder, check=True)
    round_folder = folder / "round_000"
    rng, entries = np.random.default_rng(0), []
    for p in range(parts):
        images = rng.integers(0, 256, (CHECK_PART, 1, 8, 8), dtype=np.uint8)
        rows = np.arange(p * CHECK_PART, (p + 1) * CHECK_PART)
        path = round_folder / part_name(p)
        write_part(
            path, images, rows % 10, np.zeros(CHECK_PART), rows, round_index=0, index=p, start=int(rows[0]), omega=0.0
        )
        entries.append({"relpath": path.name, "md5": md5_file(path), "size": path.stat().st_size, "count": CHECK_PART})
    with Repo(str(folder)) as repo:
        paths = [str((round_folder / e["relpath"]).resolve()) for e in entries]
        repo.state.save_many(
            ((p, HashInfo("md5", e["md5"]), None) for p, e in zip(paths, entries, strict=True)), repo.fs
        )
    (folder / "parts.json").write_text(json.dumps(entries))


def check_seconds(folder: Path, mode: str) -> dict:
    """Seconds of the resume's check of the round: ``md5`` (what changed only, via DVC's state database),
    ``hash all`` (every part read and hashed: no state), ``adopt`` (md5 via state, then headers and labels)."""
    from dp_ops.records.versioning import adopt_round, damaged_parts, parse_parts

    entries = parse_parts(json.loads((folder / "parts.json").read_text()))
    round_folder = folder / "round_000"
    t0 = time.perf_counter()
    if mode == "adopt":
        assert len(adopt_round(folder, entries, round_folder, 0, 10)) == len(entries)
    else:
        assert damaged_parts(folder if mode == "state" else None, entries, round_folder) == []
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mb": sum(e.size for e in entries) / 2**20}


# ---- driver --------------------------------------------------------------------------------------------
def child(kind: str, args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_section(tmp: str, a: argparse.Namespace, console: Console) -> None:
    """1. training: peak anonymous memory, streamed vs. in memory."""
    from rich.table import Table

    rows = []
    for n in a.sizes:
        folder = Path(tmp) / f"pool{n}"
        child("write", [str(folder), str(n), str(a.part_size)])
        rows.append((n, *(child("train", [str(folder), mode, str(a.steps)]) for mode in ("streamed", "memory"))))
    t = Table(
        "pool",
        "pool MB",
        "streamed: peak anon MB",
        "in memory: peak anon MB",
        "streamed s/step",
        title=f"1. training, {a.steps} steps of 128 (64² RGB, parts of {a.part_size})",
        title_justify="left",
    )
    for n, s, m in rows:
        t.add_row(
            f"{n:,}",
            f"{n * IMAGE_BYTES / 2**20:,.0f}",
            f"{s['peak_kb'] / 1024:,.0f}",
            f"{m['peak_kb'] / 1024:,.0f}",
            f"{s['seconds'] / a.steps:.4f}",
        )
    console.print(t)
    grow = a.sizes[-1] // a.sizes[0]
    console.print(
        f"peak anon, largest/smallest pool ({grow}× the pool): streamed "
        f"{rows[-1][1]['peak_kb'] / rows[0][1]['peak_kb']:.3f}× (target ≤ 1.1), in memory "
        f"{rows[-1][2]['peak_kb'] / rows[0][2]['peak_kb']:.3f}×"
    )


def gen_section(tmp: str, a: argparse.Namespace, console: Console) -> None:
    """2. generating one round: the rise of peak memory per part."""
    from rich.table import Table

    gen_part_mb = a.part_size * GEN_BYTES / 2**20
    t = Table(
        "round P",
        "round MB",
        "parts: rise / part",
        "one call: rise / part",
        "parts s",
        title=f"2. generating one round (32² RGB; part = {a.part_size} images = {gen_part_mb:.1f} MB)",
        title_justify="left",
    )
    for p in a.rounds:
        g = {
            mode: child("gen", [str(Path(tmp) / f"gen{p}{mode}"), mode, str(p), str(a.part_size), "128"])
            for mode in ("parts", "one-call")
        }
        rise = {m: (r["peak_kb"] - r["base_kb"]) / 1024 / gen_part_mb for m, r in g.items()}
        t.add_row(
            f"{p:,}",
            f"{p * GEN_BYTES / 2**20:,.0f}",
            f"{rise['parts']:.2f}",
            f"{rise['one-call']:.2f}",
            f"{g['parts']['seconds']:.1f}",
        )
    console.print(t)
    console.print("target: parts ≤ 3 at both sizes (a round's memory is bounded by a part)")


def resume_section(tmp: str, a: argparse.Namespace, console: Console) -> None:
    """3. resume: seconds to the first training step at pools 10× apart."""
    from rich.table import Table

    r = {n: child("resume", [str(Path(tmp) / f"resume{n}"), str(n), str(a.part_size)]) for n in a.rounds}
    t = Table("pool", "parts", "resume → first step s", title="3. resume", title_justify="left")
    for n, v in r.items():
        t.add_row(f"{n:,}", str(-(-n // a.part_size)), f"{v['seconds']:.2f}")
    console.print(t)
    console.print(f"ratio at a 10× pool: {r[a.rounds[1]]['seconds'] / r[a.rounds[0]]['seconds']:.2f} (target ≤ 1.2)")


def check_section(tmp: str, a: argparse.Namespace, console: Console) -> None:
    """4. the integrity check on resume: hashing vs. DVC state lookup."""
    from rich.table import Table

    folder = Path(tmp) / "check"
    folder.mkdir()
    child("check-write", [str(folder), str(a.check_parts)])
    c = {mode: child("check", [str(folder), mode]) for mode in ("hash", "state", "adopt")}
    t = Table(
        "parts",
        "MB",
        "md5, every part hashed s",
        "md5, DVC state lookup s",
        "whole check (state + headers + labels) s",
        "hashing MB/s",
        title=f"4. integrity check on resume ({CHECK_PART} grey 8² images a part)",
        title_justify="left",
    )
    t.add_row(
        f"{a.check_parts:,}",
        f"{c['hash']['mb']:,.0f}",
        f"{c['hash']['seconds']:.2f}",
        f"{c['state']['seconds']:.2f}",
        f"{c['adopt']['seconds']:.2f}",
        f"{c['hash']['mb'] / c['hash']['seconds']:,.0f}",
    )
    console.print(t)
    real_mb = a.check_parts * 1024 * IMAGE_BYTES / 2**20  # parts of 1024 64² RGB images: 12 MB each
    hours = real_mb / c["hash"]["mb"] * c["hash"]["seconds"] / 3600
    console.print(
        f"the state lookup reads no part, whatever its size; hashing {a.check_parts:,} parts of 1024 64² RGB "
        f"images ({real_mb / 2**20:,.1f} TB) at the rate above would take {hours:,.1f} h"
    )


def main() -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pools 1k/10k/20k, rounds 1k/10k (a smoke run)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--part-size", type=int, default=1024)
    ap.add_argument("--check-parts", type=int, default=100_000, help="parts in the integrity check's round (4.)")
    ap.add_argument("--sections", default="1234", help="which figures, e.g. 4 for the integrity check alone")
    a = ap.parse_args()
    a.sizes = [1_000, 10_000, 20_000] if a.quick else [2_000, 20_000, 200_000]
    a.rounds = [1_024, 10_240] if a.quick else [2_048, 20_480]
    console = Console(width=120)
    sections = {"1": train_section, "2": gen_section, "3": resume_section, "4": check_section}
    with tempfile.TemporaryDirectory(prefix="dpops-bench-") as tmp:
        for key in a.sections:
            sections[key](tmp, a, console)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "write":
            write_pool(Path(rest[0]), int(rest[1]), int(rest[2]))
            print(json.dumps({}))
        elif kind == "train":
            print(json.dumps(train_peak(Path(rest[0]), rest[1], int(rest[2]))))
        elif kind == "gen":
            Path(rest[0]).mkdir(parents=True, exist_ok=True)
            print(json.dumps(gen_peak(Path(rest[0]), rest[1], int(rest[2]), int(rest[3]), int(rest[4]))))
        elif kind == "check-write":
            write_checked_round(Path(rest[0]), int(rest[1]))
            print(json.dumps({}))
        elif kind == "check":
            print(json.dumps(check_seconds(Path(rest[0]), rest[1])))
        elif kind == "resume":
            Path(rest[0]).mkdir(parents=True, exist_ok=True)
            print(json.dumps(resume_seconds(Path(rest[0]), int(rest[1]), int(rest[2]))))
    else:
        main()
