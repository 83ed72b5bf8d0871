"""`dvc plots show` of the real dvc.yaml, looked at in headless Chromium: every declared plot is drawn.

DVC writes each plot's id unescaped into the page's JavaScript and loads vega, vega-lite and vega-embed from a
CDN. Nothing but the package registries is reachable here, so the page's three CDN scripts are served from the
npm packages of the very versions DVC names (``npm pack``, cached by pytest); the plots are DVC's own markup.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from test_ui import _ui_check

REPO = Path(__file__).resolve().parents[1]
CDN = re.compile(r'src="https://cdn\.jsdelivr\.net/npm/((@?[^@"]+)@([^"/]+))"')
# errors and unhandled promise rejections (vega-embed's), collected from before the page's first script
CATCH = (
    "window.__errors = [];"
    "addEventListener('error', e => __errors.push(e.message));"
    "addEventListener('unhandledrejection', e => __errors.push(String(e.reason)));"
)


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _plot_inputs(ws):
    """What `dvc repro` leaves for the declared plots: those of their files that a stage writes (DVC's own
    list of the stages' outs), a few points each."""
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        outs = [Path(o.def_path) for o in repo.index.outs]
    for plot in yaml.safe_load((ws / "dvc.yaml").read_text())["plots"]:
        files = [plot] if isinstance(plot, str) else list(next(iter(plot.values()))["y"])
        for name in files:
            path = ws / name
            if not any(Path(name).is_relative_to(out) for out in outs):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".png":
                Image.new("RGB", (32, 24), "white").save(path)
            elif path.name == "rounds.json":
                rounds = [{"iteration": 50 * i, "pool_size": 10 + 5 * i, "entropy_mean": 1 - i / 10} for i in range(3)]
                path.write_text(json.dumps({"strategy": "dp", "rounds": rounds}))
            else:
                path.write_text(json.dumps([{"iteration": i * 50, "val_acc": 0.5 + 0.1 * i} for i in range(3)]))


def _offline(page, cache, env):
    """A copy of DVC's page whose CDN scripts are the files the CDN serves for them (the package's
    ``jsdelivr`` entry), from the npm packages of the same names and versions."""
    html = page.read_text()
    for spec, name, version in {m.groups() for m in CDN.finditer(html)}:
        folder = cache / f"{name.replace('/', '+')}-{version}"
        if not (folder / "package" / "package.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            packed = _run(["npm", "pack", "--silent", spec], folder, env).split()[-1]
            with tarfile.open(folder / packed) as tar:
                tar.extractall(folder, filter="data")
        meta = json.loads((folder / "package" / "package.json").read_text())
        script = folder / "package" / (meta.get("jsdelivr") or meta["unpkg"])
        html = html.replace(f'src="https://cdn.jsdelivr.net/npm/{spec}"', f'src="{script.as_uri()}"')
    assert "cdn.jsdelivr.net" not in html
    offline = page.with_name("offline.html")
    offline.write_text(html)
    return offline


def _settled(state, plots):
    """A script failed, or every one of the ``plots`` is drawn."""
    errors, drawn = state
    return bool(errors) or (len(drawn) == plots and all(ok for _, ok in drawn))


@pytest.mark.slow
def test_dvc_plots_show_draws_every_declared_plot_in_chromium(tmp_path, pytestconfig):  # ~6 s (first: +3 s npm)
    ui_check = _ui_check()
    why = ui_check.browser_missing() or (None if shutil.which("npm") else "npm missing (apt-get install npm)")
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs it")
        pytest.skip(why)
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("dvc.yaml", "params.yaml"):  # (params.yaml: the stages' foreach resolves from it)
        shutil.copy(REPO / name, ws / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _run(["git", "init", "-q"], ws, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], ws, env)
    _plot_inputs(ws)

    shown = _run([sys.executable, "-m", "dvc", "plots", "show"], ws, env)
    assert "failed to load" not in shown  # (a declared file that only `dpops bench` writes did that)
    page = _offline(ws / "dvc_plots" / "index.html", pytestconfig.cache.mkdir("dvc-plots-npm"), env)

    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    plots = yaml.safe_load((ws / "dvc.yaml").read_text())["plots"]
    declared = [p if isinstance(p, str) else next(iter(p)) for p in plots]
    state = (  # the scripts' errors, and per plot whether vega drew it (its canvas) or its image loaded
        "return [window.__errors, [...document.querySelectorAll('body > div')].map(d => [d.id,"
        " !!d.querySelector('canvas, svg.marks') || [...d.querySelectorAll('img')].some(i => i.naturalWidth > 0)])]"
    )
    with ui_check.chromium() as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH})
        driver.get(page.as_uri())
        with contextlib.suppress(TimeoutException):  # (then the assertions below say what is missing)
            WebDriverWait(driver, 15).until(lambda d: _settled(d.execute_script(state), len(declared)))
        errors, drawn = driver.execute_script(state)
    assert errors == []
    assert len(drawn) == len(declared) and all(ok for _, ok in drawn), drawn
