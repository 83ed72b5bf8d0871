"""From ``params.yaml`` and ``-S`` overrides to a validated config, and back to a tree or from flat params.

:func:`load_tree` reads the file (:mod:`dp_ops.config.reading`) and :func:`apply_overrides` sets the ``-S``
values (parsed as YAML, as ``dvc exp run -S`` does); :func:`build_config` and :func:`sweep_config` validate the
run's sections and the ``sweep:`` section; :func:`validate` turns the first problem into one
:class:`~dp_ops.errors.ConfigError` line naming the key as params.yaml spells it, the value (:func:`shown`) and
what is allowed. :func:`to_tree` and :func:`from_flat` turn a config back into a tree, and flat MLflow params
into a config (a resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from dp_ops.config.bounds import _short, shown
from dp_ops.config.reading import _load_bounded, _read_yaml, _TooBig
from dp_ops.config.sections import Config
from dp_ops.config.sweep_section import SweepConfig
from dp_ops.errors import ConfigError
from dp_ops.files import workspace_storage

DEFAULT_PARAMS = Path("params.yaml")


def load_config(params: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params`` (default ``params.yaml`` if present, else built-in defaults) and apply overrides.

    Keys of the file that dp_ops does not own (DVC may keep other sections) are only allowed at the top
    level when they are listed in :data:`FOREIGN_SECTIONS`.
    """
    return build_config(load_tree(params, overrides))


def load_tree(params: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw parameter tree, foreign sections included, with ``-S`` overrides applied (not validated)."""
    tree: dict[str, Any] = {}
    path = Path(params) if params is not None else DEFAULT_PARAMS
    if params is not None or path.exists():
        tree = _read_yaml(path)
        _check_sections(tree, path)  # (before the overrides: a -S into `dp: 5` is the file's fault)
    return apply_overrides(tree, overrides)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``KEY=VALUE`` items (dotted keys, values parsed as YAML like ``dvc exp run -S``) in ``tree``."""
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return tree


# Sections of params.yaml read by other commands or by dvc.yaml (the sweep space and baseline sizes), not by a run.
FOREIGN_SECTIONS = ("sweep",)


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping into a :class:`Config`, turning the first problem into one line."""
    return validate(Config, {k: v for k, v in tree.items() if k not in FOREIGN_SECTIONS})


def sweep_config(tree: dict[str, Any]) -> SweepConfig:
    """Validate the ``sweep`` section of a parameter tree (see :func:`load_tree`)."""
    section = tree.get("sweep") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"sweep={shown(section)}: must be a section of keys (study, storage, n_trials, …)")
    sc = validate(SweepConfig, section, prefix="sweep.")
    storage = workspace_storage(sc.storage)  # (in a DVC experiment's temporary copy: the workspace's file)
    return sc if storage == sc.storage else sc.model_copy(update={"storage": storage})


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], tree: dict[str, Any], prefix: str = "") -> M:
    """Validate ``tree`` into ``model``; the first problem becomes one :class:`ConfigError` line whose
    keys are spelled from the top of params.yaml (``prefix``, e.g. ``"sweep."``, for a foreign section)."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, tree, model, prefix)) from None


def from_flat(flat: dict[str, str]) -> Config:
    """Rebuild a config from flat string params (as MLflow stores them), e.g. to resume a run."""
    tree: dict[str, Any] = {}
    for key, raw in flat.items():
        try:
            value = _load_bounded(raw) if raw.strip() else raw
        except _TooBig as exc:
            raise ConfigError(f"MLflow param {_short(key)}: the value has {exc}") from None
        _set_dotted(tree, key, value)
    return build_config(tree)


def to_tree(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. to write back a ``params.yaml``."""
    return yaml.safe_load(yaml.safe_dump(_plain(cfg.model_dump())))


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [_plain(v) for v in node]
    return node


def _check_sections(tree: dict[str, Any], path: Path) -> None:
    """A section of the file given as a value (``dp: 5``) is refused here, naming the file, rather than
    later by whichever ``-S`` first tries to set a key inside it."""
    models: list[tuple[dict[str, Any], type[BaseModel], str]] = [
        (tree, Config, ""),
        *([(tree["sweep"], SweepConfig, "sweep.")] if isinstance(tree.get("sweep"), dict) else []),
    ]
    if "sweep" in tree and not isinstance(tree["sweep"], dict):
        section = shown(tree["sweep"])
        raise ConfigError(f"--params {path}: sweep={section}: must be a section of keys (study, storage, …)")
    while models:
        node, model, prefix = models.pop()
        for name, field in model.model_fields.items():
            sub = field.annotation
            if name not in node or not isinstance(sub, type) or not issubclass(sub, BaseModel):
                continue
            if not isinstance(node[name], dict):
                keys = ", ".join(sorted(sub.model_fields))
                raise ConfigError(
                    f"--params {path}: {prefix}{name}={shown(node[name])}: must be a section of keys ({keys})"
                )
            models.append((node[name], sub, f"{prefix}{name}."))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-S {shown(item)}: expected KEY=VALUE with a dotted key, e.g. dp.omega=0.1")
    # YAML parsing gives the same types DVC's `-S` gives (0.1 -> float, true -> bool, [1,2] -> list).
    try:
        value = _load_bounded(raw) if raw.strip() else ""
    except _TooBig as exc:
        raise ConfigError(f"-S {_short(key)}: the value has {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"-S {_short(key)}: '{_short('.'.join(parts[: i + 1]))}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: ValidationError, tree: dict[str, Any], root: type[BaseModel], prefix: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = prefix + ".".join(loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        section = _section_fields(root, loc[:-1])
        allowed = ", ".join(sorted(section)) if section else "none"
        return f"{_short(key)}: unknown key (allowed here: {allowed})"
    if not loc or (err["type"] == "value_error" and _section_fields(root, loc)):
        # a model-level check: its message names the keys, a range's (sweep.omega) from within the range
        msg = msg.removeprefix("Value error, ")
        return msg if not loc or msg.startswith(loc[0]) else f"{key}.{msg}"
    value = _lookup(tree, loc)
    msg = msg.removeprefix("Value error, ")
    return f"{_short(key)}={shown(value)}: {msg[0].lower()}{msg[1:]}"


def _section_fields(root: type[BaseModel], loc: list[str]) -> list[str]:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _lookup(tree: dict[str, Any], loc: list[str]) -> Any:
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
