"""From a validated config to a finished experiment: the library entry points the CLI, DVC stages and
sweeps call. Checks everything that can be checked before work starts (model names, devices, generator
folder, image-folder layout), loads or trains the generator, runs the loop, writes the metrics files.

Generator backends are chosen by name (``generator.backend``, an entry of :data:`dp_ops.generators.BACKENDS`;
see :func:`load_generator`): ``pixel`` is trained here and cached at ``generator.path``; every other backend is a
pretrained diffusers pipeline at ``generator.model``, never trained here.

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
import importlib
import json
import shlex
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from dp_ops.config import Config, flatten, from_flat
from dp_ops.engine.backends.pixel import PixelDiffusion, train_generator
from dp_ops.engine.data import RealData, from_uint8, load_digits_data, load_mnist_data
from dp_ops.engine.devices import check_devices, resolve_device, resolve_dtype, set_deterministic
from dp_ops.engine.dist import SINGLE, World, lost_peer
from dp_ops.engine.learner import known_models, micro_batches
from dp_ops.engine.loop import DPLoop, Observer, RoundRecord, RunResult
from dp_ops.engine.pool import Pool
from dp_ops.engine.quality import Quality, measure_quality
from dp_ops.engine.rounds import RoundParts
from dp_ops.engine.sampling import Generator
from dp_ops.engine.saved import CHECKSUMS, META_FILE, GeneratorMeta
from dp_ops.engine.shards import round_dir, scan_round
from dp_ops.errors import ConfigError, DataError, RunAborted
from dp_ops.files import disk_error, workspace_path, write_json
from dp_ops.generators import BACKENDS, resolve
from dp_ops.paths import CONFIG_FILES, check_generator, check_outputs, check_pipeline, output_locations
from dp_ops.records.checkpoint import Checkpointer, checkpoint_path, load_checkpoint
from dp_ops.records.lease import RunLease, check_free, lease_path
from dp_ops.records.tracking import (
    GeneratorFacts,
    MlflowTracker,
    Registry,
    RunFacts,
    SavedModel,
    config_params,
    sqlite_path,
    system_metrics,
)
from dp_ops.records.versioning import (
    DvcVersioner,
    PushFailed,
    ShardInfo,
    adopt_round,
    check_kept_by_stage,
    check_remote,
    dvc_root,
    parse_parts,
    restore_round,
)

Progress = Callable[[int, int], None]


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
    if versioner.mode == "dvc add":  # (the default remote every round is pushed to; none inside dvc repro)
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


def train_and_save_generator(
    cfg: Config, real: RealData, *, progress: Progress | None = None, quality_progress: Progress | None = None
) -> tuple[PixelDiffusion, Quality]:
    """Train on the generator-train split, measure quality with a real-data judge, save to generator.path."""
    if cfg.generator.pretrained:
        raise ConfigError(
            f"generator.backend={cfg.generator.backend!r}: a pretrained pipeline (generator.model) is not "
            "trained here; only the pixel generator is"
        )
    meta = GeneratorMeta.of(cfg, real.num_classes)
    generator = train_generator(cfg.generator, real.gen_train, meta=meta, seed=cfg.data.split_seed, progress=progress)
    quality = measure_quality(generator, real, cfg.generator, seed=cfg.data.split_seed, progress=quality_progress)
    generator = PixelDiffusion(generator.unet, generator.scheduler, replace(meta, quality=quality.to_dict()))
    generator.save(cfg.generator.path)
    return generator, quality


def load_pixel(cfg: Config, world: World = SINGLE) -> PixelDiffusion:
    """The trained pixel generator at ``generator.path``, checked against the configured data, on
    ``device`` (where the learner runs)."""
    generator = PixelDiffusion.load(cfg.generator.path, scheduler=cfg.generator.scheduler)
    generator.check_matches(cfg.data)
    return generator.to(world.device(cfg.device), channels_last=cfg.generator.channels_last)


def load_pipeline(cfg: Config, class_names: Sequence[str] | None = None, world: World = SINGLE) -> Generator:
    """The pipeline at ``generator.model`` on ``device``, conditioned on ``class_names`` (default: the class
    folders of ``data``), its weights read in ``generator.dtype``, by the adapter of the backend that drives it
    (:data:`dp_ops.generators.BACKENDS`; ``diffusers``: the family its ``model_index.json`` names). A pipeline no
    backend can drive is refused from its configs before any weight is read (a hub id's here; a local folder's
    already in :func:`check_generator`, before the heavy imports)."""
    from dp_ops.engine.backends.latent import PipelineSettings, pipeline_configs

    if class_names is None:
        from dp_ops.engine.folders import scan_folders

        class_names = scan_folders(cfg.data).names
    g, d = cfg.generator, cfg.data
    family = check_pipeline(g.model, g.backend, pipeline_configs(g.model, CONFIG_FILES), g.scheduler)
    device = world.device(cfg.device)
    settings = PipelineSettings(
        prompt=g.prompt,
        resolution=g.resolution,
        output_resolution=d.stored_resolution,
        learner_resolution=d.resolution,
        device=str(device),
        dtype=resolve_dtype(g.dtype, device),
        vae_slicing=g.vae_slicing,
        attention_slicing=g.attention_slicing,
        gradient_checkpointing=g.gradient_checkpointing,
        scheduler=g.scheduler,
        guidance_decoder=g.guidance_decoder,
        class_ids=d.class_ids,
    )
    module, name = BACKENDS[family].adapter.split(":")
    return getattr(importlib.import_module(module), name).load(g.model, class_names, settings)


def load_generator(cfg: Config, real: RealData | None = None, world: World = SINGLE) -> Generator:
    """The generator of ``generator.backend``, ready to sample on this process's device (``real`` saves a
    pipeline re-reading class names)."""
    if cfg.generator.pretrained:
        return load_pipeline(cfg, None if real is None else real.class_names, world)
    return load_pixel(cfg, world)


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
    raw = json.loads(file.read_text())
    settings = {"train_iterations": raw["train_iterations"], **raw.get("training", {})}
    sums = raw.get(CHECKSUMS) or {}
    meta = {"backend": g.backend, **{k: raw[k] for k in ("data", "resolution", "split_seed")}}
    meta.update({f"quality.{k}": v for k, v in raw.get("quality", {}).items()})
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
        self.shards: dict[int, ShardInfo] = {}  # round -> the shard its round run links

    def on_eval(self, iteration: int, val_acc: float) -> None:
        self.tracker.on_eval(iteration, val_acc)

    def on_round(self, record: RoundRecord, increment: RoundParts) -> None:
        generated_at = time.time()  # (the round run spans its generation, versioning and logging)
        shard = self.versioner.version(record.round, increment)
        self.shards[record.round] = shard
        self.tracker.log_round(record, increment, shard, generated_at=generated_at)
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
    shards: dict[int, ShardInfo] | None = None  # round -> its shard (resumed rounds: versioned_by="resumed")
    model: SavedModel | None = None  # the final classifier as logged in MLflow


def run_tracked(
    cfg: Config,
    generator: Generator,
    real: RealData,
    observers: Sequence[Observer] = (),
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    registry: Registry | None = None,
    world: World = SINGLE,
) -> TrackedRun:
    """An experiment as a first-class record: MLflow parent + round runs (in ``registry``, default the
    config's store), DVC-versioned shards, and a checkpoint after every round; ``tags`` go on the MLflow
    run (e.g. a sweep's study and trial). With ``resume_run_id`` continue that interrupted run where its
    last completed round left off (``cfg`` must be the run's own, see :func:`resume_config`; any number
    of processes may resume it). Every process of ``world`` calls this; only rank 0 records (and only
    its ``observers`` and ``registry`` are used)."""
    cfg = _resolve_micro_batches(cfg, world)  # (recorded resolved: a resume on other processes computes the same)
    cfg = outliving_copy(cfg)
    if not world.main:
        return _follow(cfg, generator, real, world, resuming=resume_run_id is not None)
    lease = None
    if resume_run_id is not None:  # taken before the run is marked RUNNING again: a live holder refuses
        lease = RunLease(lease_path(cfg.output.checkpoints, resume_run_id), resume_run_id)
        lease.acquire()
    tracker = MlflowTracker(
        registry or Registry.from_config(cfg),
        cfg,
        run_id=resume_run_id,
        tags=tags,
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
            edges = [*observers, lease, records, Checkpointer(ckpt)]
            loop = DPLoop(cfg, generator, real, edges, shards=versioner.data_dir, world=world)
            with _node_metrics(tracker.uri, tracker.run_id, world, resume_run_id is not None):
                if resume_run_id is not None:
                    _restore_loop(loop, records, ckpt)
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
    return TrackedRun(result, tracker.run_id, tracker, records.versioner, dict(records.shards), model)


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
                state = _with_omegas(load_checkpoint(checkpoint_path(cfg.output.checkpoints, run_id)), cfg)
                rounds = range(state["records"][-1]["round"] + 1)
                loop.load_state_dict(state, Pool([p for k in rounds for p in scan_round(round_dir(data_dir, k))]))
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
    """Rank 0's word to the other processes of a multi-process study before each of its runs (a sweep
    trial, a benchmark arm); ``None`` instead means there are no more."""

    cfg: Config
    resume_run_id: str | None = None


def lead_run(
    cfg: Config,
    generator: Generator,
    real: RealData,
    observers: Sequence[Observer] = (),
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    registry: Registry | None = None,
    world: World = SINGLE,
) -> TrackedRun:
    """:func:`run_tracked` as one run of a study, on every process of ``world`` (rank 0 calls this; the
    others are in :func:`follow_runs`). On one process, exactly :func:`run_tracked`."""
    if not world.distributed:
        return run_tracked(cfg, generator, real, observers, resume_run_id, tags, registry)
    world.broadcast(RunRequest(cfg, resume_run_id))
    try:
        return run_tracked(cfg, generator, real, observers, resume_run_id, tags, registry, world)
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
        run_tracked(request.cfg, generator, real, resume_run_id=request.resume_run_id, world=world)
        n += 1


def resume_config(run_id: str, registry: Registry) -> Config:
    """The config an interrupted run was started with (its MLflow params), after checking it can resume."""
    try:
        run = registry.run(run_id)
    except DataError:
        raise DataError(f"--resume {run_id}: no such run in {registry.uri}") from None
    if run.tags.get("dpops.role") != "experiment":
        raise DataError(f"--resume {run_id}: not a dp_ops experiment run (a round run? resume its parent)")
    if run.status == "FINISHED":
        raise DataError(f"--resume {run_id}: the run already FINISHED; nothing to resume")
    study = run.tags.get("dpops.study")
    if study is not None:  # (resumed here, the study's retry would resume it again: a second model, trial FAIL)
        raise DataError(
            f"--resume {run_id}: trial {run.tags.get('dpops.trial', '?')} of sweep study {study!r} owns this run; "
            f"a worker of that study retries the trial and resumes the run, recording its result: dpops sweep "
            f"--study-name {shlex.quote(study)} (with the study's --storage)"
        )
    return from_flat(config_params(run.params))


def named_run(cfg: Config, registry: Registry) -> RunFacts | None:
    """The run ``tracking.run_name`` names in the config's experiment (at most one survives its creation:
    :meth:`MlflowTracker._claim`), or None: a new run starts under the name."""
    runs = registry.runs_named(registry.experiment_name(cfg), cfg.tracking.run_name)
    return runs[0] if runs else None


def differences(given: Config, recorded: Config) -> list[str]:
    """The keys a command's config and a run's recorded one disagree on, beyond where the run is tracked
    (``tracking.*``) and where its files go (``output.*``): ``key='given' (the run's: 'recorded')``.
    ``train.micro_batches=0`` (one per process) agrees with whatever number the run resolved it to."""
    mine, theirs = flatten(given), flatten(recorded)
    if mine.get("train.micro_batches") == 0:
        mine["train.micro_batches"] = theirs.get("train.micro_batches")
    return [
        f"{k}={mine.get(k)!r} (the run's: {theirs.get(k)!r})"
        for k in sorted(set(mine) | set(theirs))
        if not k.startswith(("tracking.", "output.")) and mine.get(k) != theirs.get(k)
    ]


def check_lease(cfg: Config, run_id: str) -> str | None:
    """Before any work on ``--resume``: refuses (one line) while a live process trains the run; else the
    note that a stale lease will be taken over, if there is one (:func:`run_tracked` takes it)."""
    return check_free(lease_path(cfg.output.checkpoints, run_id), run_id)


def ignored_on_resume(overrides: Sequence[str], given: Config, resumed: Config) -> list[str]:
    """The ``-S key=value`` of a ``--resume`` that the resumed run does not use (it runs with its own
    config): every key whose value differs from the run's, except ``tracking.*`` (where to find it) and
    ``output.*`` (where its files go: :func:`resume_outputs`)."""
    mine, theirs = flatten(given), flatten(resumed)
    keys = dict.fromkeys(o.partition("=")[0].strip() for o in overrides)
    return [
        f"{k}={mine.get(k)!r} (the run's: {theirs.get(k)!r})"
        for k in keys
        if not k.startswith(("tracking.", "output.")) and mine.get(k) != theirs.get(k)
    ]


def resume_outputs(overrides: Sequence[str], given: Config, resumed: Config) -> tuple[Config, list[str]]:
    """The resumed config with the ``-S output.*`` of a ``--resume`` applied, and each changed one as
    ``key='given' (the run's: 'recorded')``. Output locations are where files go on this machine, so the
    user's word wins over the registry's; a finished round's parts missing from a new ``output.shards``
    are restored there from DVC (:func:`_restore_loop`), and the checkpoint is looked for where
    ``output.checkpoints`` now says."""
    mine, theirs = flatten(given), flatten(resumed)
    keys = [k for k in dict.fromkeys(o.partition("=")[0].strip() for o in overrides) if k.startswith("output.")]
    changed = {k.removeprefix("output."): mine[k] for k in keys if k in mine and mine[k] != theirs.get(k)}
    if not changed:
        return resumed, []
    cfg = resumed.model_copy(update={"output": resumed.output.model_copy(update=changed)})
    return cfg, [f"output.{k}={v!r} (the run's: {theirs.get('output.' + k)!r})" for k, v in changed.items()]


def _restore_loop(loop: DPLoop, records: RunRecords, ckpt: Path) -> None:
    """O(parts), not O(images): the pool is exactly the bytes the registry records. Each part's md5 is
    checked (DVC's state database answers for an unchanged file; only changed files are hashed), a damaged
    part is restored (DVC cache, then remote), its header must place it where the registry does, and its
    labels must be classes of this run; nothing is decoded."""
    if not ckpt.is_file():
        logged = records.tracker.registry.round_runs(records.tracker.run_id)
        if logged:
            raise DataError(
                f"{ckpt}: checkpoint missing, although round(s) up to {max(r.round for r in logged)} were logged "
                f"(deleted, or is output.checkpoints={str(ckpt.parent.parent)!r} not where the run wrote it?); "
                "restore it, or start a new run"
            )
        raise DataError(f"{ckpt}: no checkpoint, the run stopped before round 0 completed; start a new run")
    state = load_checkpoint(ckpt)
    last = state["records"][-1]["round"]
    kept = records.tracker.keep_rounds_through(last)
    registry, versioner = records.tracker.registry, records.versioner
    listings, digests = registry.round_parts(kept), {r.round: r.tags.get("dpops.shard_md5") for r in kept}
    pool = Pool()
    for k in range(last + 1):
        folder, listing = versioner.round_path(k), listings.get(k)
        if listing is None:
            raise DataError(f"{folder}: round {k} has no parts listing in its round run; cannot resume it")
        parts = parse_parts(listing, digests.get(k))
        pool.add(adopt_round(versioner.root, parts, folder, k, loop.real.num_classes))
        entries = [vars(p) for p in parts]
        records.shards[k] = versioner.info(k, folder, entries, "resumed")
    loop.load_state_dict(_with_omegas(state, loop.cfg), pool)


def _with_omegas(state: dict, cfg: Config) -> dict:
    """Checkpoints written before round records carried their ω get it from the config."""
    for r in state["records"]:
        r.setdefault("omega", cfg.dp.omega if r["round"] and cfg.dp.strategy == "dp" else 0.0)
    return state


def restore_run_data(
    run_id: str,
    dest: Path,
    *,
    tracking_uri: str,
    round_index: int | None = None,
    pool: bool = False,
    root: Path | None = None,
) -> list[Path]:
    """Rebuild round folders of an MLflow run from the DVC cache (or remote) with only the registry.

    No ``round_index``: every round (the final pool). ``round_index`` alone: that round's increment.
    With ``pool``: rounds 0..round_index, the pool as it stood after that round.
    """
    root = root or dvc_root(Path.cwd())
    if root is None:
        raise DataError(f"{Path.cwd()}: not inside a DVC workspace (no .dvc/ here or above)")
    registry = Registry(tracking_uri)
    rounds = registry.round_runs(run_id)
    shards = {r.round: r.tags.get("dpops.shard_md5") for r in rounds}
    if round_index is not None and round_index not in shards:
        raise DataError(f"--round {round_index}: run {run_id} has rounds {sorted(shards)}")
    wanted = (
        sorted(shards)
        if round_index is None
        else ([k for k in sorted(shards) if k <= round_index] if pool else [round_index])
    )
    listings = registry.round_parts([r for r in rounds if r.round in wanted])
    restored = []
    for k in wanted:
        listing = listings.get(k)
        if not shards[k] or listing is None:
            raise DataError(f"run {run_id} round {k}: no parts recorded (run made without versioning)")
        restored += restore_round(root, parse_parts(listing, shards[k]), round_dir(dest, k))
    return restored
