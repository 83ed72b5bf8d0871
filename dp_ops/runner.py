"""From a validated config to a finished experiment: the library entry points the CLI, DVC stages and
sweeps call. Checks everything that can be checked before work starts (model names, devices, generator
folder, image-folder layout), loads or trains the generator, runs the loop, writes the metrics files.
The steps themselves live below: loading by the backend table in :mod:`dp_ops.engine.backends.load`,
continuing a run from its records in :mod:`dp_ops.resume`, the records in :mod:`dp_ops.records`.

Generator backends are chosen by name (``generator.backend``, an entry of :data:`dp_ops.generators.BACKENDS`;
see :func:`load_generator`): ``pixel`` is trained here and cached at ``generator.path``
(:func:`ensure_generator`); every other backend is a pretrained diffusers pipeline at ``generator.model``,
never trained here.

A tracked run's records (:class:`RunRecords`): per round, the round folder (written by the loop, part by
part) is DVC-versioned first, then the round's MLflow run is logged with exactly those parts, then (a
separate, later loop event) the loop state is checkpointed.

Started by ``torchrun`` (:mod:`dp_ops.engine.dist`), every process runs the loop, and rank 0 alone records:
it creates or re-opens the MLflow run and broadcasts its id and data folder, versions, logs, checkpoints
and reports; the others write only their parts. Each node's local rank 0 runs MLflow's system-metrics
monitor. The run's folders (``output.*``, ``generator.path``) must be one shared filesystem.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from dp_ops.config import Config
from dp_ops.engine.backends.load import load_family, load_pixel, train_and_save_generator
from dp_ops.engine.data import RealData, from_uint8, load_digits_data, load_mnist_data
from dp_ops.engine.devices import check_devices, resolve_device, resolve_dtype, set_deterministic
from dp_ops.engine.dist import SINGLE, World, lost_peer
from dp_ops.engine.learner import known_models, micro_batches
from dp_ops.engine.loop import DPLoop, Observer, RoundRecord, RunResult
from dp_ops.engine.quality import Quality
from dp_ops.engine.rounds import RoundParts
from dp_ops.engine.sampling import Generator, Progress
from dp_ops.engine.saved import CHECKSUMS, META_FILE, read_meta
from dp_ops.errors import ConfigError, DataError, RunAborted
from dp_ops.files import disk_error, workspace_path, write_json
from dp_ops.generators import resolve
from dp_ops.paths import (
    CONFIG_FILES,
    check_generator,
    check_outputs,
    check_pipeline,
    generator_exists,
    output_locations,
)
from dp_ops.records.checkpoint import Checkpointer, checkpoint_path
from dp_ops.records.lease import RunLease, lease_path
from dp_ops.records.tracking import (
    GeneratorFacts,
    MlflowTracker,
    SavedModel,
    TrackingStore,
    sqlite_path,
    system_metrics,
)
from dp_ops.records.versioning import (
    DvcVersioner,
    PushFailed,
    RoundVersion,
    check_kept_by_stage,
    check_remote,
    check_scm,
)
from dp_ops.resume import restore_follower, restore_loop


def preflight(cfg: Config, world: World = SINGLE) -> None:
    """Checks that need more than the config's own types; run before any work starts (on every process)."""
    micro_batches(cfg.train, world)
    if cfg.learner.model not in known_models():
        raise ConfigError(
            f"learner.model={cfg.learner.model!r}: not a registered timm model "
            "(e.g. dpops_convnet, dpops_convnet_tiny, resnet18; see timm.list_models())"
        )
    world.device(cfg.device)  # (cuda:N under torchrun is refused: a resumed run's stored config too)
    check_devices(cfg)
    set_deterministic(cfg.deterministic)  # (before any model is built or runs)
    check_outputs(cfg)
    versioner = DvcVersioner(cfg.output.shards)
    if versioner.mode == "dvc add":  # (git or no_scm; the default remote every round is pushed to; none in dvc repro)
        check_scm(versioner.root)
        check_remote(versioner.root)
    check_kept_by_stage(cfg.output.shards)  # (in a DVC experiment's temporary copy)
    if cfg.data.name == "folder":
        from dp_ops.engine.folders import scan_folders

        scan_folders(cfg.data)  # layout only; unreadable files surface in load_real_data, still before work
    check_generator(cfg)


def load_real_data(cfg: Config, world: World = SINGLE) -> RealData:
    """The real splits. An image-folder world's are read on each process of ``world`` but rank 0 only for
    its block of their evaluation chunks (no collective: the processes may call this at different points).
    Rank 0 reads them whole: it records them as the run's MLflow inputs, whose digest is over their pixels
    (8 processes of ImageNet-1k hold about 1 + 7/8 copies instead of 8)."""
    if cfg.data.name != "folder":  # (the embedded worlds are small: whole on every process)
        return load_mnist_data(cfg.data) if cfg.data.name == "mnist" else load_digits_data(cfg.data)
    from dp_ops.engine.folders import load_folder_data

    reader = SINGLE if world.main else world
    return load_folder_data(cfg.data, world=reader, chunk=cfg.train.eval_batch_size)


def load_pipeline(cfg: Config, class_names: Sequence[str] | None = None, world: World = SINGLE) -> Generator:
    """The pipeline at ``generator.model`` on ``device``, conditioned on ``class_names`` (default: the class
    folders of ``data``), its weights read in ``generator.dtype``, by the adapter of the backend that drives it
    (:data:`dp_ops.generators.BACKENDS`; ``diffusers``: the family its ``model_index.json`` names). A pipeline no
    backend can drive is refused from its configs before any weight is read (a hub id's here; a local folder's
    already in :func:`check_generator`, before the heavy imports)."""
    from dp_ops.engine.backends.latent import pipeline_configs

    if class_names is None:
        from dp_ops.engine.folders import scan_folders

        class_names = scan_folders(cfg.data).names
    g = cfg.generator
    family = check_pipeline(g.model, g.backend, pipeline_configs(g.model, CONFIG_FILES), g.scheduler)
    return load_family(cfg, family, class_names, world)


def load_generator(cfg: Config, real: RealData | None = None, world: World = SINGLE) -> Generator:
    """The generator of ``generator.backend``, ready to sample on this process's device (``real`` saves a
    pipeline re-reading class names)."""
    if cfg.generator.pretrained:
        return load_pipeline(cfg, None if real is None else real.class_names, world)
    return load_pixel(cfg, world)


def ensure_generator(
    cfg: Config,
    real: RealData,
    world: World = SINGLE,
    *,
    progress: Progress | None = None,
    quality_progress: Progress | None = None,
) -> tuple[Generator, Quality | None]:
    """The run's generator, trained first if missing (``pixel``: :func:`train_and_save_generator`, cached at
    ``generator.path``); under torchrun rank 0 of ``world`` trains it while the others wait, then every
    process loads it. With it, the quality of the generator trained now (None: it was there already)."""
    quality = None
    if world.main and not generator_exists(cfg):
        _, quality = train_and_save_generator(cfg, real, progress=progress, quality_progress=quality_progress)
    world.barrier()
    return load_generator(cfg, real, world), quality


def generator_facts(cfg: Config) -> GeneratorFacts:
    """What the generator a run loads is, for its records: a pixel generator's own metadata (the
    ``generator.*`` keys it was trained with, its data, its measured quality, the sha256 of its saved
    folder: one digest of every file's), or the pipeline it names: its family, the precision its weights were
    read in (``generator.dtype=auto`` resolved), and the guidance decoder whose gradient approximates the VAE's."""
    g = cfg.generator
    if g.pretrained:
        dtype = str(resolve_dtype(g.dtype, resolve_device(cfg.device))).removeprefix("torch.")
        meta: dict[str, object] = {"backend": g.backend, "model": g.model, "dtype": dtype}
        family = resolve(g.backend, g.model)
        if family is not None:
            meta["family"] = family
        if g.guidance_decoder:
            meta["guidance_decoder"] = f"{g.guidance_decoder} (approximate guidance gradient; images use the VAE)"
        return GeneratorFacts(meta=meta)
    file = Path(g.path) / META_FILE
    if not file.is_file():  # (a generator built in code, never saved)
        return GeneratorFacts(meta={"backend": g.backend})
    raw = read_meta(g.path)
    settings = {"train_iterations": raw["train_iterations"], **raw["training"]}
    sums = raw[CHECKSUMS]
    meta = {"backend": g.backend, **{k: raw[k] for k in ("data", "resolution", "split_seed")}}
    meta.update({f"quality.{k}": v for k, v in raw["quality"].items()})
    if sums:
        listing = "".join(f"{name} {digest}\n" for name, digest in sorted(sums.items()))
        meta["sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    return GeneratorFacts(settings, meta, file)


class RunRecords(Observer):
    """An experiment's MLflow and DVC records as one observer, so their order is fixed here rather than by
    the observer list: each round's folder is versioned, then its round run logged with it; a background
    push of the round (with a DVC remote) is joined before the loop checkpoints."""

    def __init__(self, tracker: MlflowTracker, versioner: DvcVersioner) -> None:
        self.tracker, self.versioner = tracker, versioner
        self.versions: dict[int, RoundVersion] = {}  # round -> the version its round run links

    def on_eval(self, iteration: int, val_acc: float) -> None:
        self.tracker.on_eval(iteration, val_acc)

    def on_round(self, record: RoundRecord, round_parts: RoundParts) -> None:
        generated_at = time.time()  # (the round run spans its generation, versioning and logging)
        version = self.versioner.version(record.round, round_parts)
        self.versions[record.round] = version
        self.tracker.log_round(record, round_parts, version, generated_at=generated_at)
        self.versioner.wait_pushed()  # (the loop checkpoints next)

    def on_finish(self, result: RunResult) -> None:
        self.tracker.on_finish(result)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a tracked run: it ended KILLED (a :class:`KeyboardInterrupt`, so a study
    that catches those stops as before); ``resumable`` when a round completed, so a checkpoint exists."""

    def __init__(self, run_id: str, resumable: bool) -> None:
        super().__init__(run_id)
        self.run_id, self.resumable = run_id, resumable


@dataclass(frozen=True)
class TrackedRun:
    """A finished tracked experiment: its result and where its records are (rank 0's; on other ranks
    of a multi-process run only the result and the run id)."""

    result: RunResult
    run_id: str
    tracker: MlflowTracker | None = None
    versioner: DvcVersioner | None = None
    versions: dict[int, RoundVersion] | None = None  # round -> its version (resumed rounds: versioned_by="resumed")
    model: SavedModel | None = None  # the final classifier as logged in MLflow


def run_tracked(
    cfg: Config,
    generator: Generator,
    real: RealData,
    observers: Sequence[Observer] = (),
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    store: TrackingStore | None = None,
    world: World = SINGLE,
) -> TrackedRun:
    """An experiment as a first-class record: MLflow parent + round runs (in ``store``, default the
    config's store), DVC-versioned shards, and a checkpoint after every round; ``tags`` go on the MLflow
    run (e.g. a sweep's study and trial). With ``resume_run_id`` continue that interrupted run where its
    last completed round left off (``cfg`` must be the run's own, see :func:`~dp_ops.resume.resume_config`;
    any number of processes may resume it). Every process of ``world`` calls this; only rank 0 records (and
    only its ``observers`` and ``store`` are used)."""
    return _run(RunRequest(cfg, resume_run_id, tags, tuple(observers), store), generator, real, world)


def _run(request: RunRequest, generator: Generator, real: RealData, world: World = SINGLE) -> TrackedRun:
    """:func:`run_tracked` of ``request``."""
    # (recorded resolved: a resume on other processes computes the same)
    cfg = outliving_copy(_resolve_micro_batches(request.cfg, world))
    resume_run_id = request.resume_run_id
    if not world.main:
        return _follow(cfg, generator, real, world, resuming=resume_run_id is not None)
    lease = None
    if resume_run_id is not None:  # taken before the run is marked RUNNING again: a live holder refuses
        lease = RunLease(lease_path(cfg.output.checkpoints, resume_run_id), resume_run_id)
        lease.acquire()
    tracker = MlflowTracker(
        request.store or TrackingStore.from_config(cfg),
        cfg,
        run_id=resume_run_id,
        tags=request.tags,
        generator=generator_facts(cfg),
        real=real,
    )
    lease = lease or RunLease(lease_path(cfg.output.checkpoints, tracker.run_id), tracker.run_id)
    ckpt = checkpoint_path(cfg.output.checkpoints, tracker.run_id)
    try:
        with tracker.lifecycle():
            if lease.lease is None:  # a new run: nobody else knows its id yet
                lease.acquire()
            versioner = DvcVersioner(Path(cfg.output.shards) / tracker.run_id)
            world.broadcast((tracker.run_id, versioner.data_dir, tracker.uri))
            records = RunRecords(tracker, versioner)
            edges = [*request.observers, lease, records, Checkpointer(ckpt)]
            loop = DPLoop(cfg, generator, real, edges, shards=versioner.data_dir, world=world)
            with _node_metrics(tracker.uri, tracker.run_id, world, resume_run_id is not None):
                if resume_run_id is not None:
                    records.versions.update(restore_loop(loop, tracker, versioner, ckpt))
                    world.barrier()  # the other processes read the restored parts and the checkpoint next
                result = loop.run()
            write_reports(cfg, result, tracker.run_id)
            example = from_uint8(real.val.images[:4])  # (the model's input: float images in [-1, 1])
            reports = [Path(cfg.output.rounds), Path(cfg.output.curve)]
            model = tracker.log_outputs(loop.trainer.eval_model, example, reports)
    except KeyboardInterrupt as exc:  # (ended KILLED by the lifecycle)
        raise RunInterrupted(tracker.run_id, ckpt.is_file()) from exc
    except Exception as exc:  # (ended FAILED by the lifecycle)
        lost = lost_peer(exc) if world.distributed else None
        if lost is not None:  # (torchrun's SIGTERM may follow: RunInterrupted above then says it)
            raise DataError(_lost_line(lost, tracker.run_id, ckpt.is_file())) from None
        store = sqlite_path(tracker.uri)  # (first: SQLite's "disk is full" names no file)
        folders: list[str | Path] = [*([store] if store else []), *(p for p, _ in output_locations(cfg).values())]
        why = str(exc) if isinstance(exc, PushFailed) else disk_error(exc, folders)
        if why is None:
            raise
        raise DataError(_disk_line(why, tracker.run_id, ckpt.is_file(), tracker.status)) from exc
    finally:
        lease.release()
    return TrackedRun(result, tracker.run_id, tracker, records.versioner, dict(records.versions), model)


def write_reports(cfg: Config, result: RunResult, run_id: str) -> None:
    """A run's files for DVC, each what one DVC view reads: ``output.metrics`` the summary numbers (stage
    metrics: ``dvc exp show`` columns), ``output.rounds`` the run's strategy and id and its round records,
    ``output.curve`` the validation curve (each a list of points, as ``dvc plots`` wants one per file)."""
    report = result.to_dict()
    summary = report["summary"]
    header = {"strategy": summary.pop("strategy"), "run_id": run_id}
    write_json(cfg.output.metrics, summary)
    write_json(cfg.output.rounds, {**header, "rounds": report["rounds"]})
    write_json(cfg.output.curve, report["curve"])


def _disk_line(why: str, run_id: str, resumable: bool, status: str) -> str:
    """``status``: what the store now says of the run (RUNNING: it could not be written to end it)."""
    then = f"then: dpops run --resume {run_id}" if resumable else "then start it again (no round had completed)"
    state = f"stopped ({status}) at its last completed round"
    if status == "RUNNING":
        state = "stopped at its last completed round and stays RUNNING in MLflow (its store could not be written)"
    return f"{why}; run {run_id} {state}; free space or make it writable, {then}"


def _lost_line(why: str, run_id: str, resumable: bool) -> str:
    then = f"resume it with: dpops run --resume {run_id}" if resumable else "start it again (no round had completed)"
    stopped = f"run {run_id} stopped (FAILED) at its last completed round"
    return f"another process of the run stopped ({why}); {stopped}; {then}"


def outliving_copy(cfg: Config) -> Config:
    """Inside a DVC experiment's temporary copy (``dvc exp run --queue`` / ``--temp``), ``output.checkpoints``
    in the user's workspace (:func:`~dp_ops.files.workspace_path`): a resume needs it after DVC deleted the
    copy. The other ``output.*`` stay as given: they are the stage's outs and metrics, which DVC collects
    from the copy into the experiment (and the tracking store is resolved as the workspace's by
    :func:`~dp_ops.records.tracking.resolve_uri`). Unchanged anywhere else."""
    checkpoints = str(workspace_path(cfg.output.checkpoints))
    if checkpoints == cfg.output.checkpoints:
        return cfg
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"checkpoints": checkpoints})})


def _resolve_micro_batches(cfg: Config, world: World) -> Config:
    """``train.micro_batches=0`` (one per process) as the number it stands for on ``world``."""
    train = cfg.train.model_copy(update={"micro_batches": micro_batches(cfg.train, world)})
    return cfg.model_copy(update={"train": train})


def _follow(cfg: Config, generator: Generator, real: RealData, world: World, *, resuming: bool) -> TrackedRun:
    """A process other than rank 0: the same loop, in rank 0's run folder, with no records of its own."""
    shared: tuple[str, Path, str] = world.broadcast(None)
    run_id, data_dir, uri = shared
    loop = DPLoop(cfg, generator, real, shards=data_dir, world=world)
    try:
        with _node_metrics(uri, run_id, world, resuming):
            if resuming:
                world.barrier()  # rank 0 has restored every damaged part
                restore_follower(loop, checkpoint_path(cfg.output.checkpoints, run_id), data_dir)
            return TrackedRun(loop.run(), run_id)
    except Exception as exc:  # (rank 0 lost: nobody else says how to go on)
        lost = lost_peer(exc)
        if lost is None:
            raise
        resumable = checkpoint_path(cfg.output.checkpoints, run_id).is_file()
        raise DataError(_lost_line(lost, run_id, resumable)) from None


def _node_metrics(uri: str, run_id: str, world: World, resuming: bool) -> AbstractContextManager[None]:
    """MLflow's system-metrics monitor on local rank 0 of each node (named by node when there are several)."""
    if not world.local_main:
        return nullcontext()
    return system_metrics(uri, run_id, node=f"node{world.node}" if world.distributed else None, resuming=resuming)


# ---- studies on several processes: rank 0 leads each run, the others follow --------------------------
@dataclass(frozen=True)
class RunRequest:
    """One tracked run asked for: its config and, to continue an interrupted run, its id (what rank 0 tells
    the other processes of a multi-process study before each of its runs, a sweep trial or a benchmark arm:
    :meth:`told`; ``None`` instead means there are no more), and rank 0's own MLflow ``tags``, ``observers``
    and store (``store``, default the config's)."""

    cfg: Config
    resume_run_id: str | None = None
    tags: dict[str, str] | None = None
    observers: Sequence[Observer] = ()
    store: TrackingStore | None = None

    def told(self) -> RunRequest:
        """What the other processes are told (the records are rank 0's alone)."""
        return RunRequest(self.cfg, self.resume_run_id)


def lead_run(request: RunRequest, generator: Generator, real: RealData, world: World = SINGLE) -> TrackedRun:
    """:func:`run_tracked` as one run of a study, on every process of ``world`` (rank 0 calls this; the
    others are in :func:`follow_runs`). On one process, exactly :func:`run_tracked`."""
    if not world.distributed:
        return _run(request, generator, real)
    world.broadcast(request.told())
    try:
        return _run(request, generator, real, world)
    except Exception as exc:
        raise RunAborted(f"{type(exc).__name__}: {exc}") from exc


def end_runs(world: World) -> None:
    """Rank 0: the study has no more runs (the others leave :func:`follow_runs`)."""
    world.broadcast(None)


def follow_runs(generator: Generator, real: RealData, world: World) -> int:
    """A process other than rank 0 of a multi-process study: take part in every run rank 0 leads, until
    it says there are no more. Returns how many."""
    n = 0
    while True:
        request: RunRequest | None = world.broadcast(None)
        if request is None:
            return n
        _run(request, generator, real, world)
        n += 1
