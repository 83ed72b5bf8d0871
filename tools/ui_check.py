"""Look at a run the way a user does: `mlflow ui` and optuna-dashboard in a real (headless) Chromium.

    python tools/ui_check.py                      # a tiny `dpops run` in a temporary folder, then the checks
    python tools/ui_check.py --store sqlite:///mlflow.db --out /tmp/shots

Over an MLflow store (by default one a tiny `dpops run` makes) it starts `mlflow ui` on 127.0.0.1, opens the
experiment, its newest dp_ops parent run, a round run and the run's logged model in Chromium, and checks that

- the experiment is a model-training experiment (tag ``mlflow.experimentKind=custom_model_development``) and
  opens in the UI's model-training mode (the runs table, not the GenAI traces dashboard);
- the parent run shows a logged model;
- the validation curve (``val_acc`` over iterations) is a line chart on the run's "Model metrics";
- the sample image (``log_image(key="samples", step=round)``) is an image chart there (its slider: the steps).

MLflow 3.17 chooses GenAI or model-training mode per browser (the toggle at the top left, remembered by the
browser; GenAI for a browser that never chose) or per URL (``?workflowType=machine_learning``), whatever the
experiment's tag says: the pages are opened with that URL parameter, as the README tells a user to.

It saves ``ui-experiment.png``, ``ui-run.png``, ``ui-round.png``, ``ui-model.png`` and ``ui-optuna.png`` (an
optuna-dashboard over a 2-trial study made here) in ``--out`` (default ``docs/``). Every failed check is one
line of the one error raised at the end (exit 1). Needs Debian's ``chromium`` and ``chromium-driver``, and
the ``test`` extra (selenium, optuna-dashboard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's, given explicitly: Selenium Manager downloads nothing
WAIT_S = 60  # for one page's text to show (a first page load compiles nothing, but 2 busy cores are slow)
START_S = 180  # for a server to answer
ML_MODE = "workflowType=machine_learning"  # the URL parameter of MLflow 3.17's model-training mode
MODEL_KIND = "custom_model_development"

# `dpops run -S …`: a run of about 20 s on 2 cores with a few rounds (tests/conftest.py's TINY, in -S form).
TINY_SETTINGS = {
    "seed": 0,
    "data.resolution": 8,
    "generator.steps": 4,
    "generator.guide_every": 1,
    "generator.batch_size": 64,
    "generator.channels": "[8,16]",
    "generator.train_iterations": 30,
    "generator.train_batch_size": 32,
    "dp.initial_size": 40,
    "dp.round_size": 20,
    "dp.patience": 1,
    "dp.incremental_patience": "false",
    "dp.omega": 0.1,
    "learner.model": "dpops_convnet_tiny",
    "learner.drop_rate": 0.0,
    "train.iterations": 60,
    "train.eval_every": 10,
    "train.batch_size": 16,
}


class CheckFailed(Exception):
    """One or more checks failed; the message has one line per failed check."""


def browser_missing() -> str | None:
    """Why Chromium cannot be driven here (None when it can)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        return f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
    return None


def tiny_run(folder: Path) -> str:
    """A tiny `dpops run` of this checkout in ``folder`` (its generator trained first unless
    ``folder/models/generator`` holds one); returns the URI of its MLflow store, ``folder/mlflow.db``."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    settings = {**TINY_SETTINGS, "tracking.uri": uri}
    cmd = [sys.executable, "-m", "dp_ops", "run", "--params", str(ROOT / "params.yaml")]
    cmd += [arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        raise CheckFailed(f"the tiny `dpops run` failed (exit {done.returncode}):\n{output}")
    return uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server started in a process group of its own; ``stop`` ends the whole group."""

    def __init__(self, cmd: list[str], root: str, ready: str, log: Path, env: dict[str, str] | None = None):
        self.cmd, self.root, self.ready, self.log = cmd, root, root + ready, log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def base(self) -> str:
        """Waits until the ``ready`` URL answers 200; returns the server's root URL."""
        deadline = time.monotonic() + START_S
        while True:
            if self.proc.poll() is not None:
                raise CheckFailed(f"{self.cmd[0]} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.ready, timeout=5) as answer:
                    if answer.status == 200:
                        return self.root
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(f"{self.cmd[0]} did not answer {self.ready} within {START_S} s")
            time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def mlflow_ui(uri: str, work: Path) -> Server:
    port = free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    # One worker and no job runner (it serves GenAI judges): MLflow's default 4 workers and job runner take ~4×
    # as long to start on 2 cores, and one browser needs one worker.
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server(cmd, f"http://127.0.0.1:{port}", "/health", work / "mlflow-ui.log", env)


def optuna_dashboard(storage: str, work: Path) -> Server:
    port = free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    cmd = [dashboard, storage, "--host", "127.0.0.1", "--port", str(port)]
    return Server(cmd, f"http://127.0.0.1:{port}", "/dashboard", work / "optuna-dashboard.log")


@contextmanager
def chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,1000", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ---- what the store holds, through the server's REST API (the same server the browser reads) ------------
class Rest:
    def __init__(self, base: str):
        self.base = base

    def get(self, endpoint: str, **query: str) -> dict:
        with urllib.request.urlopen(f"{self.base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}") as r:
            return json.load(r)

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.base}/api/2.0/mlflow/{endpoint}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as r:
            return json.load(r)


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@dataclass(frozen=True)
class Facts:
    """What the pages are checked against."""

    experiment_id: str
    experiment_kind: str | None
    run_id: str
    run_name: str
    round_id: str
    round_name: str
    model_id: str | None
    model_name: str | None
    val_acc_steps: list[int]
    has_samples: bool


def store_facts(rest: Rest) -> Facts:
    experiments = rest.post("experiments/search", {"max_results": 1000}).get("experiments", [])
    runs = rest.post(
        "runs/search",
        {
            "experiment_ids": [e["experiment_id"] for e in experiments],
            "filter": "tags.`dpops.role` = 'experiment'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1,
        },
    ).get("runs", [])
    if not runs:
        raise CheckFailed("the store holds no dp_ops parent run (tag dpops.role=experiment)")
    run = runs[0]["info"]
    experiment = next(e for e in experiments if e["experiment_id"] == run["experiment_id"])
    rounds = rest.post(
        "runs/search",
        {
            "experiment_ids": [run["experiment_id"]],
            "filter": f"tags.`mlflow.parentRunId` = '{run['run_id']}' and tags.`dpops.role` = 'round'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1,
        },
    ).get("runs", [])
    if not rounds:
        raise CheckFailed(f"run {run['run_id']} has no round run (tag dpops.round)")
    models = rest.post(
        "logged-models/search",
        {"experiment_ids": [run["experiment_id"]], "filter": f"source_run_id = '{run['run_id']}'"},
    ).get("models", [])
    history = rest.get("metrics/get-history", run_id=run["run_id"], metric_key="val_acc").get("metrics", [])
    artifacts = rest.get("artifacts/list", run_id=run["run_id"], path="images").get("files", [])
    model = models[0]["info"] if models else {}
    return Facts(
        experiment_id=run["experiment_id"],
        experiment_kind=_tags(experiment).get("mlflow.experimentKind"),
        run_id=run["run_id"],
        run_name=run["run_name"],
        round_id=rounds[0]["info"]["run_id"],
        round_name=rounds[0]["info"]["run_name"],
        model_id=model.get("model_id"),
        model_name=model.get("name"),
        val_acc_steps=sorted(int(m.get("step", 0)) for m in history),
        has_samples=any(Path(f["path"]).name.startswith("samples+step+") for f in artifacts),
    )


# ---- the browser ------------------------------------------------------------------------------------------
class Page:
    """One browser on one server: open a route, wait for what a user would see, save what it shows."""

    def __init__(self, driver, base: str, out: Path):
        self.driver, self.base, self.out = driver, base, out

    def open(self, route: str) -> None:
        self.driver.get(f"{self.base}/{route}")

    def body(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.TAG_NAME, "body").text)  # visible text only

    def wait(self, what: str, until: Callable[[], object], seen: Callable[[], str] | None = None) -> None:
        """Waits until ``until()`` is true; CheckFailed naming ``what`` (and ``seen()``: what the page showed
        instead) if it never is."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.driver, WAIT_S, ignored_exceptions=(WebDriverException,)).until(lambda _: until())
        except TimeoutException:
            instead = ""
            if seen is not None:
                try:
                    instead = f"; shown instead: {seen()}"
                except WebDriverException as exc:
                    instead = f"; the page could not be read: {type(exc).__name__}"
            raise CheckFailed(f"{what} (not shown within {WAIT_S} s at {self.driver.current_url}{instead})") from None

    def wait_text(self, what: str, *texts: str) -> None:
        self.wait(what, lambda: all(t in self.body() for t in texts))

    def shot(self, name: str) -> Path:
        path = self.out / name
        self.driver.save_screenshot(str(path))
        return path


CARD = "//*[@data-testid='experiment-view-compare-runs-card']"  # a chart on a run's "Model metrics" tab


def _card(page: Page, title: str):
    """The chart card titled ``title`` on a run's "Model metrics" tab, or None."""
    from selenium.webdriver.common.by import By

    cards = page.driver.find_elements(By.XPATH, f"{CARD}[.//h4[@title='{title}']]")
    return cards[0] if cards else None


SEARCH = "input[placeholder='Search metric charts']"


def _filter_charts(page: Page, text: str) -> None:
    """Types ``text`` into the charts' search box, replacing what was there, and waits until the box holds it
    (a keystroke React re-renders over is typed again)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def typed() -> bool:
        box = page.driver.find_element(By.CSS_SELECTOR, SEARCH)
        if box.get_attribute("value") != text:
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.BACKSPACE)
            box.send_keys(text)
        return bool(box.get_attribute("value") == text)

    page.wait(f"the chart search {text!r}", typed, lambda: _charts_seen(page))


def _charts_seen(page: Page) -> str:
    """What the "Model metrics" tab shows: the search box's text, each card's title and its images' state."""
    from selenium.webdriver.common.by import By

    boxes = page.driver.find_elements(By.CSS_SELECTOR, SEARCH)
    cards = []
    for card in page.driver.find_elements(By.XPATH, CARD):
        titles = [h.get_attribute("title") for h in card.find_elements(By.XPATH, ".//h4")]
        images = []
        for img in card.find_elements(By.TAG_NAME, "img"):
            src = img.get_attribute("src") or ""
            path = src.partition("path=")[2].partition("&")[0] or src[:60]
            images.append(f"{path} width {img.get_attribute('naturalWidth')}")
        cards.append(f"{titles} {images}" if images else str(titles))
    search = repr(boxes[0].get_attribute("value")) if boxes else "no search box"
    return f"search {search}, cards {cards or 'none'}"


def _show_side_by_side(page: Page, *titles: str) -> None:
    """For the shot: only these charts (the search box takes a regular expression), the image in view."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        _filter_charts(page, f"^({'|'.join(titles)})$")
        shown = lambda: {h.get_attribute("title") for h in page.driver.find_elements(By.XPATH, f"{CARD}//h4")}
        # (the search filters metric charts; image cards, e.g. `entropy`, stay): wait until the round_* ones went
        page.wait(
            "the filtered charts", lambda: set(titles) <= shown() and not any(t.startswith("round_") for t in shown())
        )
        cards = [c for c in (_card(page, t) for t in titles) if c is not None and c.find_elements(By.TAG_NAME, "img")]
        for card in cards[:1]:
            page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    except (CheckFailed, WebDriverException):
        pass  # a missing chart is a failed check already; the shot shows what there is


def _line_chart(page: Page, title: str) -> bool:
    card = _card(page, title)
    return card is not None and "Step" in card.text  # a metric with one value is drawn as a bar, without a Step axis


def _image_shown(page: Page, key: str) -> bool:
    from selenium.webdriver.common.by import By

    card = _card(page, key)
    if card is None:
        return False
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)  # (an image loads in view)
    # (the card titled with the key; its image's src is the artifact's URL up to MLflow 3.17, a blob: URL of the
    # fetched file from 3.18 on: either way drawn means a natural width)
    images = card.find_elements(By.TAG_NAME, "img")
    return any(int(img.get_attribute("naturalWidth") or 0) > 0 for img in images)


def _picture_shown(page: Page, name: str) -> bool:
    """An artifact picture whose file name starts with ``name`` drawn on the page (a run description's)."""
    from selenium.webdriver.common.by import By

    images = page.driver.find_elements(By.XPATH, f"//img[contains(@src, 'get-artifact?path={name}')]")
    return any(int(img.get_attribute("naturalWidth") or 0) > 0 for img in images)


def check_mlflow(page: Page, facts: Facts) -> list[str]:
    """Opens the experiment, the parent run (overview, model metrics), a round run and the logged model;
    returns one line per failed check."""
    failures: list[str] = []

    def check(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except CheckFailed as exc:
            failures.append(f"{what}: {exc}")

    exp = f"#/experiments/{facts.experiment_id}"
    # Close the assistant panel MLflow opens on a browser's first visit (it would cover a third of each shot).
    page.open("health")
    page.driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )

    def experiment() -> None:
        page.open(f"{exp}?{ML_MODE}")
        page.wait_text("the runs table", facts.run_name, "Run Name")
        page.wait("the runs page", lambda: "/runs" in page.driver.current_url)
        if "Token Usage" in page.body():
            raise CheckFailed("the GenAI dashboard (Token Usage) is shown")
        if facts.experiment_kind != MODEL_KIND:
            raise CheckFailed(f"tag mlflow.experimentKind is {facts.experiment_kind!r}, not {MODEL_KIND!r}")

    check("experiment in model-training mode", experiment)
    page.shot("ui-experiment.png")

    def logged_model() -> None:
        page.open(f"{exp}/runs/{facts.run_id}?{ML_MODE}")
        page.wait_text("the run's overview", facts.run_name, "About this run")
        if facts.model_id is None:
            raise CheckFailed(f"run {facts.run_id} has no logged model (MLflow 3: log_model(name=...) in the run)")
        page.wait_text("the run's logged model", "Logged models (", str(facts.model_name))

    def pictures_first() -> None:  # (the description, atop the overview, leads with the latest round's pictures)
        page.wait("the round's sample grid atop the run's description", lambda: _picture_shown(page, "samples_round"))

    check("parent run shows a logged model", logged_model)
    check("parent run's description shows its round's pictures", pictures_first)

    page.open(f"{exp}/runs/{facts.run_id}/model-metrics?{ML_MODE}")

    def curve() -> None:
        if len(facts.val_acc_steps) < 2:
            raise CheckFailed(f"val_acc logged at steps {facts.val_acc_steps}: no curve over iterations")
        _filter_charts(page, "val_acc")
        page.wait(
            "the val_acc line chart (x axis: Step)", lambda: _line_chart(page, "val_acc"), lambda: _charts_seen(page)
        )

    def samples() -> None:
        if not facts.has_samples:
            raise CheckFailed(f"run {facts.run_id} has no image logged with key 'samples' (MlflowClient.log_image)")
        _filter_charts(page, "samples")
        page.wait("the 'samples' image chart", lambda: _image_shown(page, "samples"), lambda: _charts_seen(page))

    check("validation curve on the run's model metrics", curve)
    check("sample image on the run's model metrics", samples)
    _show_side_by_side(page, "val_acc", "samples")
    page.shot("ui-run.png")

    def round_run() -> None:
        page.open(f"{exp}/runs/{facts.round_id}?{ML_MODE}")
        page.wait_text("the round run with its parent", facts.round_name, "Parent run", facts.run_name, "dpops.round")

    check("round run", round_run)
    page.shot("ui-round.png")

    if facts.model_id is not None:

        def model_page() -> None:
            page.open(f"{exp}/models/{facts.model_id}?{ML_MODE}")
            page.wait_text("the model page with its source run", str(facts.model_name), "Source run", facts.run_name)

        check("logged model's page", model_page)
        page.shot("ui-model.png")
    return failures


def tiny_study(storage: str, name: str) -> None:
    """A 2-trial study shaped like a `dpops sweep` one: named metric, a curve per trial, an MLflow link."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # set_metric_names says so each call
        study.set_metric_names(["final_val_acc"])
    for number, omega in enumerate((0.05, 0.2)):
        trial = study.ask({"dp.omega": optuna.distributions.FloatDistribution(0.01, 0.5, log=True)})
        for iteration in range(50, 301, 50):
            trial.report(omega + iteration / 1000, step=iteration)
        trial.set_user_attr("dpops.mlflow_run_id", f"run-{number}")
        study.tell(trial, omega + 0.3)


def check_optuna(page: Page, study: str) -> list[str]:
    """The study's page on optuna-dashboard, with its metric name; saves ui-optuna.png."""
    page.open("dashboard/studies/1")
    try:
        page.wait_text("the study page with its metric name", study, "final_val_acc")
        return []
    except CheckFailed as exc:
        return [f"optuna-dashboard: {exc}"]
    finally:
        page.shot("ui-optuna.png")


SHOTS = ("ui-experiment.png", "ui-run.png", "ui-round.png", "ui-model.png", "ui-optuna.png")


def ui_check(store: str | None, out: Path, work: Path) -> list[Path]:
    """Every check above over ``store`` (a tiny run made in ``work`` when None); returns the screenshots, or
    raises CheckFailed with one line per failed check (the screenshots are saved either way)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SHOTS:
        (out / name).unlink(missing_ok=True)  # what is there afterwards is what this check saw
    uri = store or tiny_run(work)
    storage, study = f"sqlite:///{work / 'optuna.db'}", "dp-ops-sweep"
    tiny_study(storage, study)
    servers: list[Server] = []
    try:
        servers.append(mlflow_ui(uri, work))
        servers.append(optuna_dashboard(storage, work))  # both start while the browser does
        with chromium() as driver:
            base = servers[0].base()
            failures = check_mlflow(Page(driver, base, out), store_facts(Rest(base)))
            failures += check_optuna(Page(driver, servers[1].base(), out), study)
    finally:
        for server in servers:
            server.stop()
    if failures:
        raise CheckFailed("\n".join(failures))
    return [out / name for name in SHOTS if (out / name).is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="MLflow backend store URI (default: a tiny dpops run's, made here)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the screenshots go")
    args = parser.parse_args(argv)
    if why := browser_missing():
        print(f"ui check: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dpops-ui-") as work:
        try:
            shots = ui_check(args.store, args.out, Path(work))
        except CheckFailed as exc:
            print(f"ui check failed:\n{exc}", file=sys.stderr)
            return 1
    print("ui check passed; screenshots: " + ", ".join(str(p) for p in shots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
