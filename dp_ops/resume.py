"""Continuing a run from its records: which run a ``dpops run`` continues, skips or starts under a name
(:func:`choose_run`, :func:`named_resume`, :func:`resumed_config`, :func:`elastic_run_name`), what a
``--resume`` (or a run name that finds an unfinished run) is checked against before any work
(:func:`resume_config`, :func:`named_run`, :func:`differences`, :func:`check_lease`, :func:`ignored_on_resume`,
:func:`resume_outputs`), the loop put back where its last completed round left it (:func:`restore_loop` on
rank 0, :func:`restore_follower` on the other processes), and a run's round folders rebuilt from the store
and DVC alone (:func:`restore_run_data`).

Everything here reads what a run recorded (its MLflow params and round runs, its checkpoint, its DVC-versioned
parts); ``dpops run`` and :func:`dp_ops.runner.run_tracked` call it, so that the command only reports what was
decided and the runner itself is the choreography of one run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dp_ops.config import Config, flatten, from_flat
from dp_ops.engine.loop import DPLoop
from dp_ops.engine.pool import Pool
from dp_ops.engine.shards import round_dir, scan_round
from dp_ops.errors import ConfigError, DataError
from dp_ops.records.checkpoint import load_checkpoint
from dp_ops.records.lease import check_free, lease_path
from dp_ops.records.tracking import MlflowTracker, RunFacts, TrackingStore, config_params
from dp_ops.records.versioning import DvcVersioner, RoundVersion, adopt_round, dvc_root, parse_parts, restore_round


def resume_config(run_id: str, store: TrackingStore) -> Config:
    """The config an interrupted run was started with (its MLflow params), after checking it can resume."""
    try:
        run = store.run(run_id)
    except DataError:
        raise DataError(f"--resume {run_id}: no such run in {store.uri}") from None
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


def named_run(cfg: Config, store: TrackingStore) -> RunFacts | None:
    """The run ``tracking.run_name`` names in the config's experiment (at most one survives its creation:
    :meth:`MlflowTracker._claim`), or None: a new run starts under the name."""
    runs = store.runs_named(store.experiment_name(cfg), cfg.tracking.run_name)
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
    note that a stale lease will be taken over, if there is one (:func:`dp_ops.runner.run_tracked` takes it)."""
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
    user's word wins over the store's; a finished round's parts missing from a new ``output.shards``
    are restored there from DVC (:func:`restore_loop`), and the checkpoint is looked for where
    ``output.checkpoints`` now says."""
    mine, theirs = flatten(given), flatten(resumed)
    keys = [k for k in dict.fromkeys(o.partition("=")[0].strip() for o in overrides) if k.startswith("output.")]
    changed = {k.removeprefix("output."): mine[k] for k in keys if k in mine and mine[k] != theirs.get(k)}
    if not changed:
        return resumed, []
    cfg = resumed.model_copy(update={"output": resumed.output.model_copy(update=changed)})
    return cfg, [f"output.{k}={v!r} (the run's: {theirs.get('output.' + k)!r})" for k, v in changed.items()]


@dataclass(frozen=True)
class RunChoice:
    """What one ``dpops run`` does, decided on rank 0 before any work (:func:`choose_run`) and broadcast to
    the other processes. ``cfg``: the config to run (a resumed run's own); ``resume``: the run id to
    continue, None to start a run; ``finished``: when the named run already finished, the line the command
    prints instead of running (a requeued job: no work, exit 0); ``warnings`` and ``notes``: what the
    command tells the user about the resume before it starts."""

    cfg: Config
    resume: str | None = None
    finished: str | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def choose_run(cfg: Config, store: TrackingStore, resume: str | None, overrides: Sequence[str]) -> RunChoice:
    """``--resume RUN`` continues that run with its own config (:func:`resumed_config`); without it, the
    ``tracking.run_name`` of ``cfg`` decides (:func:`named_resume`): its unfinished run is continued, its
    finished one is not run again, and without one a run starts under the name. ``overrides``: the
    command's ``-S`` (a resumed run takes only their ``output.*``)."""
    if not resume:
        resume, finished = named_resume(cfg, store)
        if finished is not None:
            return RunChoice(cfg, finished=finished)
    return resumed_config(resume, store, cfg, overrides) if resume else RunChoice(cfg)


def named_resume(cfg: Config, store: TrackingStore) -> tuple[str | None, str | None]:
    """``--run-name``: (the run id to resume, or None to start one under the name; the line to print instead
    when that run already finished). A run of the name that ran another config is refused in one line: the
    name would otherwise continue someone else's experiment with this command's settings ignored."""
    name = cfg.tracking.run_name
    found = named_run(cfg, store)
    if found is None:
        return None, None
    if found.status == "FINISHED":
        return None, (
            f"run {found.run_id} named {name!r} in experiment '{store.experiment_name(cfg)}' already FINISHED; "
            "nothing to do"
        )
    differ = differences(cfg, resume_config(found.run_id, store))
    if differ:
        raise ConfigError(
            f"tracking.run_name={name!r}: run {found.run_id} of that name ran another config ({'; '.join(differ[:3])}"
            f"{f'; and {len(differ) - 3} more' if len(differ) > 3 else ''}); name this one otherwise, or continue "
            f"that run with its own config: dpops run --resume {found.run_id}"
        )
    return found.run_id, None


def resumed_config(run_id: str, store: TrackingStore, given: Config, overrides: Sequence[str]) -> RunChoice:
    """``--resume``: the run's own config with the ``-S output.*`` given (where its files go on this
    machine), after checking that no live process trains it (where it started, and where its files go
    now); warns of the ``-S`` values it leaves unused, notes which output locations moved and whether it
    takes over a stale lease."""
    recorded = resume_config(run_id, store)
    cfg, moved = resume_outputs(overrides, given, recorded)
    ignored = ignored_on_resume(overrides, given, cfg)
    check_lease(recorded, run_id)  # (a live process that still writes where the run started is refused too)
    lease = check_lease(cfg, run_id)
    warnings: list[str] = []
    notes: list[str] = []
    if ignored:
        warnings.append(f"--resume continues run {run_id} with its own config; ignored: -S " + ", -S ".join(ignored))
    if moved:
        notes.append(
            f"--resume continues run {run_id} writing -S " + ", -S ".join(moved) + "; its finished rounds' parts "
            "are restored there from DVC where missing, its checkpoint is read there"
        )
    if lease:
        notes.append(lease)
    return RunChoice(cfg, run_id, warnings=tuple(warnings), notes=tuple(notes))


def elastic_run_name(elastic_id: str) -> str:
    """The run name of a ``torchrun --max-restarts`` group (:func:`dp_ops.engine.dist.elastic_run_id`), which
    its restarts share: a restarted group finds its run by it and resumes it."""
    return f"torchrun-{name_safe(elastic_id)}"


def name_safe(text: str) -> str:
    """``text`` with what a run name cannot hold (``tracking.run_name``: letters, digits, '.', '_', '-',
    starting with a letter or digit) replaced by '-', and leading '.', '_', '-' dropped."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-") or "run"


def restore_loop(loop: DPLoop, tracker: MlflowTracker, versioner: DvcVersioner, ckpt: Path) -> dict[int, RoundVersion]:
    """O(parts), not O(images): the pool is exactly the bytes the store records. Each part's md5 is
    checked (DVC's state database answers for an unchanged file; only changed files are hashed), a damaged
    part is restored (DVC cache, then remote), its header must place it where the store does, and its
    labels must be classes of this run; nothing is decoded. Returns each restored round's version
    (``versioned_by="resumed"``)."""
    if not ckpt.is_file():
        logged = tracker.store.round_runs(tracker.run_id)
        if logged:
            raise DataError(
                f"{ckpt}: checkpoint missing, although round(s) up to {max(r.round for r in logged)} were logged "
                f"(deleted, or is output.checkpoints={str(ckpt.parent.parent)!r} not where the run wrote it?); "
                "restore it, or start a new run"
            )
        raise DataError(f"{ckpt}: no checkpoint, the run stopped before round 0 completed; start a new run")
    state = load_checkpoint(ckpt)
    last = state["records"][-1]["round"]
    kept = tracker.keep_rounds_through(last)
    store = tracker.store
    listings, digests = store.round_parts(kept), {r.round: r.tags.get("dpops.shard_md5") for r in kept}
    pool, shards = Pool(), {}
    for k in range(last + 1):
        folder, listing = versioner.round_path(k), listings.get(k)
        if listing is None:
            raise DataError(f"{folder}: round {k} has no parts listing in its round run; cannot resume it")
        parts = parse_parts(listing, digests.get(k))
        pool.add(adopt_round(versioner.root, parts, folder, k, loop.real.num_classes))
        entries = [vars(p) for p in parts]
        shards[k] = versioner.info(k, folder, entries, "resumed")
    loop.load_state_dict(state, pool)
    return shards


def restore_follower(loop: DPLoop, ckpt: Path, data_dir: Path) -> None:
    """A process other than rank 0 of a resumed run: its loop from the checkpoint and the round parts that
    rank 0 has checked and restored (read from their headers)."""
    state = load_checkpoint(ckpt)
    rounds = range(state["records"][-1]["round"] + 1)
    loop.load_state_dict(state, Pool([p for k in rounds for p in scan_round(round_dir(data_dir, k))]))


def restore_run_data(
    run_id: str,
    dest: Path,
    *,
    tracking_uri: str,
    round_index: int | None = None,
    pool: bool = False,
    root: Path | None = None,
) -> list[Path]:
    """Rebuild round folders of an MLflow run from the DVC cache (or remote) with only the store.

    No ``round_index``: every round (the final pool). ``round_index`` alone: that round's round_parts.
    With ``pool``: rounds 0..round_index, the pool as it stood after that round.
    """
    root = root or dvc_root(Path.cwd())
    if root is None:
        raise DataError(f"{Path.cwd()}: not inside a DVC workspace (no .dvc/ here or above)")
    store = TrackingStore(tracking_uri)
    rounds = store.round_runs(run_id)
    shards = {r.round: r.tags.get("dpops.shard_md5") for r in rounds}
    if round_index is not None and round_index not in shards:
        raise DataError(f"--round {round_index}: run {run_id} has rounds {sorted(shards)}")
    wanted = (
        sorted(shards)
        if round_index is None
        else ([k for k in sorted(shards) if k <= round_index] if pool else [round_index])
    )
    listings = store.round_parts([r for r in rounds if r.round in wanted])
    restored = []
    for k in wanted:
        listing = listings.get(k)
        if not shards[k] or listing is None:
            raise DataError(f"run {run_id} round {k}: no parts recorded (run made without versioning)")
        restored += restore_round(root, parse_parts(listing, shards[k]), round_dir(dest, k))
    return restored
