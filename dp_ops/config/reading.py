"""Reading YAML within bounds: a params file, one ``-S`` value or a stored MLflow param.

Their size, node count (an alias counted as all it repeats) and depth are checked on PyYAML's events before
anything is built, so that a hostile or broken text is refused in milliseconds; a key given twice in one
mapping is an error rather than the last one silently winning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dp_ops.config.bounds import shown
from dp_ops.errors import ConfigError

# What a params file (or one -S value, or a stored MLflow param) may be before YAML builds it: params.yaml
# is ~100 values three levels deep in a few KB; beyond these it is hostile or broken, and refused in
# milliseconds rather than expanded (an alias bomb doubles at every level: 13.8 GB in 7 minutes), recursed
# into (10,000 levels exhaust Python's stack) or echoed back.
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_NODES = 10_000  # scalars, lists and mappings, an alias counted as all it repeats
MAX_PARAMS_DEPTH = 20


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {shown(key)} appears twice (lines {first} and {again}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps
    the last silently, so the earlier value someone is looking at would not be the one used."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # (merge keys `<<:` first, as SafeLoader does)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep=deep)


class _TooBig(ValueError):
    """YAML text beyond what a params file may be (:data:`MAX_PARAMS_BYTES`, ``_NODES``, ``_DEPTH``)."""


def _load_bounded(text: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """YAML ``text`` loaded with ``loader`` once its size, node count and depth are known to be within
    bounds (:class:`_TooBig` if not; a YAML syntax error is PyYAML's own)."""
    if len(text) > MAX_PARAMS_BYTES:
        raise _TooBig(f"{len(text)} characters: at most {MAX_PARAMS_BYTES} (1 MiB)")
    _check_shape(text)
    try:
        return yaml.load(text, Loader=loader)
    except ValueError as exc:  # (PyYAML's int(): Python reads no integer of over 4300 digits)
        if isinstance(exc, yaml.YAMLError):
            raise
        raise _TooBig("an integer of more than 4300 digits") from None


def _check_shape(text: str) -> None:
    """One pass over PyYAML's events, nothing built and no recursion: every node counted, an alias as the
    nodes and depth of what it repeats (which is what loading it would build and later code walk)."""
    loader = yaml.SafeLoader(text)
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, depth) of its node
    ancestors: list[list[Any]] = []  # per collection being read: [its nodes so far, its depth, its anchor]
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                ancestors.append([1, 1, event.anchor])
                if len(ancestors) > MAX_PARAMS_DEPTH:
                    raise _TooBig(f"nested deeper than {MAX_PARAMS_DEPTH} levels (line {event.start_mark.line + 1})")
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                nodes, depth, anchor = ancestors.pop()
            elif isinstance(event, yaml.AliasEvent):
                (nodes, depth), anchor = anchors.get(event.anchor, (1, 0)), None
            elif isinstance(event, yaml.ScalarEvent):
                nodes, depth, anchor = 1, 0, event.anchor
            else:
                continue
            _add_node(anchors, ancestors, anchor, nodes, depth, event.start_mark.line + 1)
    finally:
        loader.dispose()


def _add_node(
    anchors: dict[str, tuple[int, int]],
    ancestors: list[list[Any]],
    anchor: str | None,
    nodes: int,
    depth: int,
    line: int,
) -> None:
    """Count a finished node (``nodes`` of it, ``depth`` levels of collections) into its parent."""
    if anchor is not None:
        anchors[anchor] = (nodes, depth)
    if len(ancestors) + depth > MAX_PARAMS_DEPTH:
        raise _TooBig(f"nested deeper than {MAX_PARAMS_DEPTH} levels once aliases are expanded (line {line})")
    if ancestors:
        parent = ancestors[-1]
        parent[0], parent[1] = parent[0] + nodes, max(parent[1], depth + 1)
        nodes = parent[0]
    if nodes > MAX_PARAMS_NODES:
        raise _TooBig(f"more than {MAX_PARAMS_NODES} values by line {line} (an alias counts as all it repeats)")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--params {path}: file not found")
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:  # (refused before reading it)
            raise ConfigError(f"--params {path}: {size} bytes; a params file may be at most {MAX_PARAMS_BYTES} (1 MiB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--params {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--params {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        tree = _load_bounded(text, _UniqueKeyLoader) or {}
    except (_DuplicateKey, _TooBig) as exc:
        raise ConfigError(f"--params {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--params {path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--params {path}: must be a mapping of keys to values")
    return tree
