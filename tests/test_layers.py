"""The layer rule, checked: foundation < engine < records < runner < studies < render, cli (< __main__).

A module imports only from its own layer or lower ones, at module level and inside functions alike; the engine
runs without the tracking, versioning, sweep and CLI libraries; `import dp_ops.cli` stays light (heavy libraries
are imported by the command that needs them).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dp_ops"

# Lowest first. A module not named here is an error of the test itself (a new module must be given a layer).
LAYERS: dict[str, int] = {
    "dp_ops": 0,
    "dp_ops.config": 0,
    "dp_ops.errors": 0,
    "dp_ops.files": 0,
    "dp_ops.formats": 0,
    "dp_ops.generators": 0,
    "dp_ops.signals": 0,
    "dp_ops.engine": 1,
    "dp_ops.records": 2,
    "dp_ops.paths": 3,
    "dp_ops.resume": 3,
    "dp_ops.runner": 3,
    "dp_ops.studies": 4,
    "dp_ops.render": 5,
    "dp_ops.cli": 5,
    "dp_ops.__main__": 6,
}
LAYER_NAMES = ["foundation", "engine", "records", "runner", "studies", "render/cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of a dp_ops module: the longest LAYERS prefix that names it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS and (n > 1 or module == "dp_ops"):
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def is_module(name: str) -> bool:
    """Whether dotted `name` is a dp_ops module or package (so `from pkg import name` imports it)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every dp_ops module that the code `source` of module `name` imports, wherever the statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..records import y`
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            # `from dp_ops import runner`, `from dp_ops.studies import bench`: the names are modules.
            found.update(f"{origin}.{a.name}" for a in node.names if is_module(f"{origin}.{a.name}"))
    return {m for m in found if m == "dp_ops" or m.startswith("dp_ops.")}


def imported_modules(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def upward_edges(source: str, imports: set[str]) -> list[str]:
    return [
        f"{source} ({LAYER_NAMES[layer_of(source)]}) -> {target} ({LAYER_NAMES[layer_of(target)]})"
        for target in sorted(imports)
        if target != "dp_ops" and layer_of(target) > layer_of(source)
    ]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    for path in modules():
        layer_of(module_name(path))


def test_the_import_scan_sees_every_form_of_an_upward_import():
    code = (
        "import dp_ops.runner\n"
        "from dp_ops.studies.sweep import run_sweep\n"
        "from dp_ops import cli\n"
        "from ..records import tracking\n"
        "from .loop import DPLoop\n"
        "def later():\n"
        "    from dp_ops.render import RichObserver\n"
    )
    imports = imports_in(code, "dp_ops.engine.data")
    assert {
        "dp_ops.runner",
        "dp_ops.studies.sweep",
        "dp_ops.cli",
        "dp_ops.records.tracking",
        "dp_ops.render",
        "dp_ops.engine.loop",
    } <= imports
    targets = {edge.split(" -> ")[1].split()[0] for edge in upward_edges("dp_ops.engine.data", imports)}
    assert targets == {
        "dp_ops.runner",
        "dp_ops.studies.sweep",
        "dp_ops.cli",
        "dp_ops.records",
        "dp_ops.records.tracking",
        "dp_ops.render",
    }


def test_no_module_imports_a_higher_layer():
    upward = [edge for path in modules() for edge in upward_edges(module_name(path), imported_modules(path))]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def _loaded_after(code: str) -> set[str]:
    """Top-level package names in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_engine_runs_without_tracking_versioning_sweeps_or_the_cli():
    code = (
        "import pkgutil, importlib, dp_ops.engine\n"
        "for m in pkgutil.walk_packages(dp_ops.engine.__path__, 'dp_ops.engine.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    loaded = _loaded_after(code)
    assert "dp_ops" in loaded
    assert not loaded & {"mlflow", "dvc", "optuna", "typer"}, sorted(loaded & {"mlflow", "dvc", "optuna", "typer"})


def test_importing_the_cli_loads_no_heavy_library():
    heavy = {"torch", "mlflow", "dvc", "optuna", "diffusers", "scipy"}
    loaded = _loaded_after("import dp_ops.cli")
    assert "typer" in loaded
    assert not loaded & heavy, f"`import dp_ops.cli` imports {sorted(loaded & heavy)}"


def test_torch_distributed_has_one_home():
    """Every collective of a run goes through engine/dist.py (DDP wraps the learner in engine/learner.py)."""
    users = set()
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                users.add(module_name(path))
    assert users == {"dp_ops.engine.dist"}, sorted(users)
