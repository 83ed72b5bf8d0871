"""Shared fixtures: tiny real components (8×8 images, a 2-level UNet, a width-8 timm convnet)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Two cores are shared by torch, BLAS and DVC/MLflow subprocesses: oversubscription makes tests crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest
import torch
import yaml

from dp_ops.config import Config, build_config, to_tree
from dp_ops.engine.backends.pixel import PixelDiffusion, train_generator
from dp_ops.engine.data import RealData, load_digits_data
from dp_ops.engine.saved import GeneratorMeta

torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "seed": 0,
    "data": {"resolution": 8},
    "generator": {
        "steps": 4,
        "cfg_scale": 2.0,
        "guide_every": 1,
        "batch_size": 64,
        "channels": [8, 16],
        "train_iterations": 30,
        "train_batch_size": 32,
        "train_lr": 0.002,
    },
    "dp": {
        "strategy": "dp",
        "initial_size": 40,
        "round_size": 20,
        "patience": 1,
        "incremental_patience": False,
        "omega": 0.1,
        "oversample_ratio": 3,
    },
    "learner": {"model": "dpops_convnet_tiny", "drop_rate": 0.0},
    "train": {"iterations": 60, "eval_every": 10, "batch_size": 16},
    "tracking": {"log_model": False},  # (seconds per run; tests/records/test_run_outputs.py logs models)
}


def tiny_tree(**sections: Any) -> dict[str, Any]:
    """TINY with some sections' keys replaced, e.g. tiny_tree(dp={"strategy": "static"})."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        if isinstance(values, dict):
            tree[name] = {**tree.get(name, {}), **values}
        else:
            tree[name] = values
    return tree


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return build_config(tiny_tree())


@pytest.fixture(scope="session")
def real(tiny_cfg: Config) -> RealData:
    return load_digits_data(tiny_cfg.data)


@pytest.fixture(scope="session")
def tiny_generator(tiny_cfg: Config, real: RealData) -> PixelDiffusion:
    return train_generator(
        tiny_cfg.generator, real.gen_train, meta=GeneratorMeta.of(tiny_cfg, real.num_classes), seed=0
    )


@pytest.fixture(autouse=True)
def _dvc_logs_to_this_tests_streams() -> None:
    """DVC's log handlers hold the sys.stdout/sys.stderr of when DVC was first imported; under pytest those
    are one test's captured streams, closed when it ends, and DVC raises on a closed stream. Point them at
    the running test's streams (as in a real process, where the streams outlive the run)."""
    import logging
    import sys

    if "dvc.logger" in sys.modules:
        for name in ("dvc", "dvc_objects", "dvc_data"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler):
                    # (not setStream: it flushes the closed one)
                    handler.stream = sys.stderr if handler.level >= logging.WARNING else sys.stdout


# ---- MLflow stores: one migrated template, a copy per test ---------------------------------------------
@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once per session: a fresh store runs every schema migration
    (seconds each time, ~9 s on 2 busy cores); a copy of a migrated one opens in milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables and runs the migrations
    return path


@pytest.fixture
def mlflow_store(mlflow_template: Path) -> Callable[[Path], str]:
    """``mlflow_store(folder)`` puts a fresh migrated store at ``folder/mlflow.db`` and returns its URI.

    Where the database lies is where the app puts the artifacts (``mlartifacts/`` beside it), so the copy goes
    to the folder the test would have created its store in; the template's own experiments are never used (the
    app creates its experiments with an explicit artifact location)."""

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@pytest.fixture
def mlflow_uri(mlflow_store: Callable[[Path], str], tmp_path: Path) -> str:
    """The URI of a fresh migrated store at ``tmp_path/mlflow.db``."""
    return mlflow_store(tmp_path)


def outputs_in(folder: Path) -> dict[str, str]:
    """An ``output`` section that puts a run's reports, rounds and checkpoints under ``folder``."""
    return {
        "metrics": str(folder / "metrics.json"),
        "rounds": str(folder / "rounds.json"),
        "shards": str(folder / "runs"),
        "checkpoints": str(folder / "checkpoints"),
    }


def write_tiny_params(folder: Path, **sections: Any) -> Path:
    """``folder/params.yaml`` of TINY with ``sections`` replaced, written whole (every key, as DVC's ``params``
    need); a ``sweep`` section is written as given (it is read apart from the run's config)."""
    sweep = sections.pop("sweep", None)
    tree = to_tree(build_config(tiny_tree(**sections)))
    if sweep is not None:
        tree["sweep"] = sweep
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(tree))
    return folder / "params.yaml"


@pytest.fixture
def tiny_params() -> Callable[..., Path]:
    """``tiny_params(folder, **sections)``: writes ``folder/params.yaml`` of TINY with ``sections`` replaced
    (e.g. ``tiny_params(tmp_path, dp={"max_rounds": 2}, output=outputs_in(tmp_path / "out"))``) and returns
    its path."""
    return write_tiny_params


class Workspace(NamedTuple):
    """A DVC workspace and the environment for ``dpops`` subprocesses run in it."""

    path: Path
    env: dict[str, str]


def make_dvc_workspace(ws: Path, store: Path, trained: PixelDiffusion | None = None, **sections: Any) -> Workspace:
    """A git + DVC repository at ``ws`` with a copy of the migrated MLflow ``store`` as its default store
    (``sqlite:///mlflow.db``), the ``trained`` generator (if any) at ``models/generator`` and the
    ``params.yaml`` of :func:`write_tiny_params`; its environment has a git identity and this interpreter's
    scripts first on ``PATH`` (for commits and ``dpops`` in DVC stages), and no variable that would point a
    run elsewhere (a tracking URI, a DVC stage, a torchrun rank)."""
    ws.mkdir(parents=True)
    shutil.copyfile(store, ws / "mlflow.db")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for key in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True, env=env)
    if trained is not None:
        trained.save(ws / "models" / "generator")
    write_tiny_params(ws, **sections)
    return Workspace(ws, env)


@pytest.fixture
def dvc_workspace(
    tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Callable[..., Workspace]:
    """``dvc_workspace(**sections)``: :func:`make_dvc_workspace` at ``tmp_path/ws`` with the tiny generator.

    Variants: ``with_generator=False`` leaves the generator out (a pipeline that trains its own, a test that runs
    in-process with ``tiny_generator``); ``here=True`` also makes the workspace this process's working folder,
    outside any DVC stage, for runs made in-process where ``dpops run`` makes them."""

    def make(*, with_generator: bool = True, here: bool = False, **sections: Any) -> Workspace:
        trained = request.getfixturevalue("tiny_generator") if with_generator else None
        workspace = make_dvc_workspace(tmp_path / "ws", mlflow_template, trained, **sections)
        if here:
            monkeypatch.chdir(workspace.path)
            monkeypatch.delenv("DVC_STAGE", raising=False)
        return workspace

    return make


# ---- the text-to-image world: tiny image folders --------------------------------------------------------
FOLDER_CLASSES = ("cat", "dog", "red_fox")


def make_image_folder(
    root: Path, classes: Sequence[str] = FOLDER_CLASSES, per_class: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """``root/<class>/<i>.png``: class k is noise over a bright channel k (so classes are separable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3))
            img[..., k % 3] += 180
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return root
