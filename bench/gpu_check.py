"""One prepared check for a GPU: every CUDA path of the project run once, each in its own process, one table.

Rows (sized to finish in about 12 minutes on one H100, the other families' rows about 3 of them by their FLOP
counts in ``bench/generation_cost.py``; not yet run on one):

- ``dpops run``: the default digits run (``params.yaml``) on ``cuda`` at a small budget (generator training
  included), in a temporary workspace with its own MLflow store; figure: its accuracies, rounds and pool.
- ``sd tiny <dtype> <mode>``: the tiny random Stable Diffusion pipeline sampled through the library
  (``bench/sd_speed.py --tiny``), bfloat16 and float16 weights, unguided and entropy-guided with the
  ``full`` and ``x0`` gradients.
- ``sd-1.5 512² bfloat16 <mode>``: ``bench/sd_speed.py`` at 512² with random SD-1.5 weights, the same modes;
  figure: images/s, cost against unguided, peak memory (``torch.cuda.max_memory_allocated``).
- ``<family> tiny bfloat16 <mode>`` and ``<family at its real shapes> bfloat16 <mode>`` for SDXL, DiT and SD3
  (``sd_speed.py --family``): the tiny pipeline, then the real model's shapes (random weights made on the GPU)
  at the family's resolution, CFG and guide_every; SDXL and SD3 at fewer steps with the same share of guided
  steps (10 steps guided every 5th, 8 every 4th), so that the cost ratio is the default's, 4 images.
- ``torchrun``: with two or more GPUs, the digits run on 2 processes against 1 process computing the same
  2 micro-batches.

Each process has a timeout and its output goes to a log; a failing row says FAILED with the first line of its
error and the others still run; ``sd_speed.py`` also isolates its modes, so an out-of-memory guided mode
leaves its unguided row standing. The exit status is 1 if any row failed (the workspace and logs are kept and
named), else 0. ``--cpu`` runs the same rows on the CPU at tiny sizes (the real-shaped rows shrink to each
family's tiny pipeline, the multi-GPU row is skipped), so a test keeps the script from rotting.

    .venv/bin/python bench/gpu_check.py            # on a machine with a GPU
    .venv/bin/python bench/gpu_check.py --cpu      # the same rows on the CPU, tiny (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dp_ops.config import run_files

ROOT = Path(__file__).resolve().parents[1]
SD_SPEED = str(ROOT / "bench" / "sd_speed.py")
DPOPS = [sys.executable, "-m", "dp_ops"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dp_ops"]
SD_MODES = ("unguided", "guided full", "guided x0")

# The default digits run at a small budget: generator training and the learner cut to a minute on a GPU.
GPU_RUN = ["device=cuda", "generator.train_iterations=300", "train.iterations=400"]
# On the CPU, the sizes of the tests' tiny world (tests/conftest.py), so the row takes seconds, not hours.
CPU_RUN = [
    "device=cpu",
    "data.resolution=8",
    "generator.channels=[8, 16]",
    "generator.train_iterations=30",
    "generator.steps=4",
    "generator.batch_size=64",
    "generator.train_batch_size=32",
    "dp.initial_size=40",
    "dp.round_size=20",
    "dp.patience=1",
    "learner.model=dpops_convnet_tiny",
    "train.iterations=60",
    "train.eval_every=10",
    "train.batch_size=16",
]
SD_TINY = ["--tiny", "--steps", "4", "--guide-every", "1", "--repeats", "1"]
SD_FULL = ["--dtype", "bfloat16", "--repeats", "1"]  # sd_speed's 30 steps, guided every 5th
# The other families sd_speed drives: the label of their real shapes, and the steps of the full-size rows ([] =
# the family's own; otherwise fewer, with the same share of guided steps: the cost ratio is the default's).
FAMILIES = {
    "sdxl": ("sdxl 1024²", ["--steps", "10"]),
    "dit": ("dit-xl-2 256²", []),
    "sd3": ("sd3-medium 1024²", ["--steps", "8"]),
}


def images(cpu: bool, n: int = 8) -> list[str]:
    """Images per sd_speed measurement, in one batch (fewer on the CPU, where float16 kernels crawl)."""
    k = str(min(n, 4) if cpu else n)
    return ["-n", k, "--batch-size", k]


@dataclass(frozen=True)
class Row:
    what: str
    status: str  # ok | skipped: why | FAILED: the first line of the error
    seconds: float
    figure: str = ""


class Failed(Exception):
    """A row's process failed; the message is the line the table shows."""


def error_line(log: str) -> str:
    """The line that names a failure in a process's output: the last exception or ``error:`` line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Interrupt|Exit)\b|error:)")
    named = [line for line in lines if pattern.match(line)]
    return (named or lines or [""])[-1]


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass(frozen=True)
class Check:
    """Where and how the rows run: device, workspace (cwd of every process), environment, logs."""

    cpu: bool
    ws: Path
    env: dict[str, str]

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def call(self, name: str, cmd: list[str], timeout: float) -> float:
        """Run ``cmd`` in the workspace, output to ``logs/<name>.log``; its seconds, or :class:`Failed`."""
        log = self.ws / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        with log.open("w") as out:
            # A session of its own, so that a timeout stops the whole tree (torchrun and its ranks).
            proc = subprocess.Popen(
                cmd, cwd=self.ws, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise Failed(f"timed out after {timeout:g} s") from None
            except BaseException:  # Ctrl-C: the tree, in a session of its own, did not get it
                stop(proc)
                raise
        if code:
            raise Failed(error_line(log.read_text(errors="replace")) or f"exit status {code}")
        return time.perf_counter() - t0

    def dpops_run(self, name: str, launcher: list[str], extra: list[str], timeout: float) -> tuple[float, dict]:
        """``dpops run`` of the default params at this check's budget; its seconds and metrics."""
        sets = [*(CPU_RUN if self.cpu else GPU_RUN), f"tracking.uri=sqlite:///{self.ws / 'mlflow.db'}"]
        sets += [*extra, *run_files(self.ws / name)]
        seconds = self.call(
            name, [*launcher, "run", "--params", "params.yaml", *(x for s in sets for x in ("-S", s))], timeout
        )
        return seconds, json.loads((self.ws / name / "metrics.json").read_text())


Job = tuple[list[str], Callable[[Check], list[Row]]]  # the rows a job yields, and the job


def digits_run(c: Check) -> list[Row]:
    seconds, m = c.dpops_run("run", DPOPS, [], timeout=300)
    figure = (
        f"val acc {m['final_val_acc']:.3f}, test acc {m['final_test_acc']:.3f}, "
        f"{m['rounds']} round{'s' if m['rounds'] != 1 else ''}, pool {m['pool_size']}"
    )
    return [Row("dpops run, digits", "ok", seconds, figure)]


def sd_rows(c: Check, name: str, label: str, args: list[str], timeout: float) -> list[Row]:
    """``bench/sd_speed.py`` with the guided modes ``full`` and ``x0``: one row per mode, from its JSON."""
    out = c.ws / f"{name}.json"
    cmd = [sys.executable, SD_SPEED, *args, "--device", c.device, "--gradient", "full", "x0", "--json", str(out)]
    try:
        c.call(name, cmd, timeout)
    except Failed:
        if not out.is_file():  # (when a mode fails, sd_speed exits 1 and its JSON says which)
            raise
    measured = json.loads(out.read_text())
    n = measured["args"]["n"]
    by_mode = {r["mode"]: r for r in measured["rows"] if r.get("variant", "eager") == "eager"}
    rows = []
    for mode in SD_MODES:
        r = by_mode.get(mode, {"error": "not measured"})
        what = f"{label} {mode}"
        if r["error"]:
            rows.append(Row(what, f"FAILED: {r['error']}", 0.0))
            continue
        peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
        figure = f"{r['images_per_s']:.2f} img/s, cost x{r['cost_ratio']:.2f}{peak}"
        rows.append(Row(what, "ok", n / r["images_per_s"], figure))
    return rows


def sd_tiny(cpu: bool, dtype: str) -> Job:
    label = f"sd tiny {dtype}"
    args = [*SD_TINY, *images(cpu), "--dtype", dtype]
    return [f"{label} {m}" for m in SD_MODES], lambda c: sd_rows(c, f"sd-tiny-{dtype}", label, args, timeout=180)


def sd_full(cpu: bool) -> Job:
    # On the CPU, 512² takes hours: the same modes on the tiny pipeline, at sd_speed's own steps and schedule.
    label = "sd tiny (for sd-1.5 512²) bfloat16" if cpu else "sd-1.5 512² bfloat16"
    args = [*SD_FULL, *images(cpu), *(["--tiny"] if cpu else [])]
    return [f"{label} {m}" for m in SD_MODES], lambda c: sd_rows(c, "sd-full", label, args, timeout=420)


def family_tiny(cpu: bool, family: str) -> Job:
    label = f"{family} tiny bfloat16"
    args = [*SD_TINY, *images(cpu), "--dtype", "bfloat16", "--family", family]
    return [f"{label} {m}" for m in SD_MODES], lambda c: sd_rows(c, f"{family}-tiny", label, args, timeout=180)


def family_full(cpu: bool, family: str) -> Job:
    # On the CPU, the same modes on the family's tiny pipeline (as for sd-1.5).
    shapes, steps = FAMILIES[family]
    label = f"{family} tiny (for {shapes}) bfloat16" if cpu else f"{shapes} bfloat16"
    args = [*SD_FULL, *images(cpu, 4), "--family", family, *steps, *(["--tiny"] if cpu else [])]
    return [f"{label} {m}" for m in SD_MODES], lambda c: sd_rows(c, f"{family}-full", label, args, timeout=420)


def two_processes(c: Check) -> list[Row]:
    """The digits run on 2 processes against 1 process computing the same 2 micro-batches."""
    one, m1 = c.dpops_run("one-process", DPOPS, ["train.micro_batches=2"], timeout=300)
    two, m2 = c.dpops_run("two-processes", TORCHRUN, [], timeout=300)
    figure = (
        f"2 processes {two:.0f} s vs 1 process {one:.0f} s; "
        f"val acc {m2['final_val_acc']:.3f} vs {m1['final_val_acc']:.3f}"
    )
    return [Row("torchrun, 2 processes vs 1", "ok", one + two, figure)]


def skipped(what: str, why: str) -> Job:
    return [what], lambda c: [Row(what, f"skipped: {why}", 0.0)]


def jobs(cpu: bool, gpus: int) -> list[Job]:
    multi: Job = (["torchrun, 2 processes vs 1"], two_processes)
    if cpu:
        multi = skipped("torchrun, 2 processes vs 1", "--cpu (needs two or more GPUs)")
    elif gpus < 2:
        multi = skipped("torchrun, 2 processes vs 1", f"{gpus} GPU visible (needs two or more)")
    # (on the CPU both rows of a family are its tiny pipeline: one is enough to check the script runs)
    families = [
        job for f in FAMILIES for job in ((family_full(cpu, f),) if cpu else (family_tiny(cpu, f), family_full(cpu, f)))
    ]
    sd = [sd_tiny(cpu, "bfloat16"), sd_tiny(cpu, "float16"), sd_full(cpu)]
    return [(["dpops run, digits"], digits_run), *sd, *families, multi]


def run_all(check: Check, todo: list[Job]) -> list[Row]:
    """Every job, in order, each isolated: one that fails yields FAILED rows and the next one runs."""
    rows: list[Row] = []
    for whats, job in todo:
        t0 = time.perf_counter()
        try:
            done = job(check)
        except Exception as exc:  # (a Failed process, or results it left unreadable: the row says which)
            reason = str(exc) if isinstance(exc, Failed) else f"{type(exc).__name__}: {exc}"
            done = [Row(w, f"FAILED: {reason}", time.perf_counter() - t0) for w in whats]
        for row in done:  # (progress: the table comes at the end)
            print(f"  {row.what}: {row.status.split(':')[0]}", file=sys.stderr)
        rows += done
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.what) for r in rows) + 2
    lines = [f"{'what':<{width}}{'status':<9}{'seconds':>8}  figure"]
    for r in rows:
        word, _, why = r.status.partition(": ")
        lines.append(f"{r.what:<{width}}{word:<9}{r.seconds:>8.1f}  {why or r.figure}")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """This environment without what would point a row at another run, store or process group."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_STAGE"):
        env.pop(key, None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def header(cpu: bool) -> str:
    import torch

    if cpu:
        return f"# dp_ops check on the CPU (--cpu: tiny sizes), torch {torch.__version__}"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"# dp_ops check on {names}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the same rows on the CPU at tiny sizes (the test)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if not args.cpu and not gpus:
        print("error: no CUDA device visible; use --cpu for the CPU run of the same rows", file=sys.stderr)
        return 2
    ws = Path(tempfile.mkdtemp(prefix="dpops-gpu-check-"))
    shutil.copyfile(ROOT / "params.yaml", ws / "params.yaml")  # the default digits run
    rows = run_all(Check(args.cpu, ws, environment()), jobs(args.cpu, gpus))
    print(header(args.cpu))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if any(r.status.startswith("FAILED") for r in rows):
        print(f"# failed: workspace and logs kept in {ws} (logs/<row>.log)")
        return 1
    shutil.rmtree(ws, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
