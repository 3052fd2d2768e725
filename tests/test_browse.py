"""End to end on one small study (launched once per module through the CLI): the study report,
lineage notes and links, both dashboards in a real headless Chromium, and MLflow's own serving
of the champion. Screenshots land in test-artifacts/screenshots/."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import CARS, ROOT, free_port, mlflow_store, need, tuner_env, write_study

pytestmark = pytest.mark.slow

SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
N_TRIALS = 6
# Median pruning from the third trial on, after one epoch: the study has pruned trials to show.
PRUNER = '[pruner]\nname = "median"\noptions = { n_startup_trials = 2, n_warmup_steps = 1 }\n'
SPACE = (
    'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 3, high = 4 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)


@dataclass
class Launched:
    folder: Path
    study_file: Path
    tracking_uri: str
    storage_url: str
    stderr: str


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    folder = tmp_path_factory.mktemp("browse")
    path = write_study(folder, "browse", n_trials=N_TRIALS, body=PRUNER, space=SPACE)
    tracking = mlflow_store(folder / "mlflow.db")
    # In this process: the interpreter start-up and imports of a subprocess cost more than the study.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main("launch", str(path), "--tracking-uri", tracking)
    assert code == 0, err.getvalue()
    return Launched(folder, path, tracking, f"sqlite:///{folder / 'browse.db'}", err.getvalue())


def _study(launched: Launched) -> Any:
    from tuner.config import load_spec
    from tuner.study import open_study

    spec = load_spec(launched.study_file)
    return spec, open_study(spec, create=False)


def _main(*args: str) -> int:
    from tuner.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    try:
        return main(list(args))
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() turns SIGTERM into KeyboardInterrupt


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``tuner ARGS`` in this process (no second interpreter start-up): exit code, stdout, stderr."""
    code = _main(*args)
    out, err = capsys.readouterr()
    return code, out, err


def _client(launched: Launched) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=launched.tracking_uri, registry_uri=launched.tracking_uri)


# -- progress, report, lineage ---------------------------------------------------------------


def test_launch_prints_one_progress_line_per_trial_without_a_tty(launched: Launched) -> None:
    lines = [line for line in launched.stderr.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert len(lines) == N_TRIALS
    assert lines[-1].startswith(f"[{N_TRIALS}/{N_TRIALS}] running 0, pruned ")
    assert all(" | best " in line and ", ETA " in line and " | trial " in line for line in lines)


def test_report_command_writes_html_with_every_plot_and_pngs(launched: Launched, capsys: Any) -> None:
    from tuner.report import SECTIONS

    out = launched.folder / "out" / "report.html"
    code, stdout, stderr = cli(capsys, "report", str(launched.study_file), "--tracking-uri", launched.tracking_uri,
                               "--output", str(out))
    assert code == 0, stderr
    assert f"wrote {out} and {len(SECTIONS)} PNGs" in stdout
    text = out.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in text
        assert f'id="plot-{key}"' in text, key
        png = out.with_name(f"report.{key}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # Self-contained: plotly.js is inlined (once), nothing is fetched from elsewhere.
    assert text.count("Plotly.newPlot(") == len(SECTIONS) and "<script src=" not in text
    assert "least_squares" in text and "browse version 1 (@champion" in text
    spec, study = _study(launched)
    n_pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    assert f"{n_pruned} PRUNED" in text


def test_every_launch_logs_the_report_on_its_parent_run(launched: Launched) -> None:
    from tuner.report import SECTIONS

    client = _client(launched)
    [experiment] = [e for e in client.search_experiments() if e.name == "browse"]
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.`tuner.role` = 'launch'")
    names = sorted(f.path for f in client.list_artifacts(parent.info.run_id, "report"))
    # The interactive HTML only: `tuner report` draws the PNGs (seconds a launch need not pay).
    assert names == ["report/report.html"]
    html = client.download_artifacts(parent.info.run_id, "report/report.html")
    text = open(html, encoding="utf-8").read()
    assert all(f'id="{key}"' in text for key in SECTIONS)
    assert "drawn by `tuner report`" in text  # importances: the full report draws them
    _, study = _study(launched)
    assert parent.data.tags["tuner.dashboard_url"] == f"http://127.0.0.1:8080/dashboard/studies/{study._study_id}"


def test_notes_tags_and_best_link_trials_runs_and_model(launched: Launched, capsys: Any) -> None:
    from tuner.lineage import read_note

    spec, study = _study(launched)
    client = _client(launched)
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        note = read_note(study, t)
        assert note.startswith(f"**{t.state.name}**")
        assert "/#/experiments/" in note and f"/runs/{run_id})" in note
        if t.state.name == "COMPLETE":
            assert f"validation rmse = {t.value:.6g}" in note
        tags = client.get_run(run_id).data.tags
        assert (tags["tuner.study"], tags["tuner.trial"]) == ("browse", str(t.number))
    assert "browse version 1" in read_note(study) and "alias `champion`" in read_note(study)

    best = study.best_trial
    version = client.get_model_version_by_alias("browse", "champion")
    assert version.tags["tuner.study"] == "browse"
    assert version.tags["tuner.trial"] == str(best.number)
    assert version.tags["tuner.metric"] == "rmse"
    assert version.tags["tuner.space_hash"] == spec.space_hash()
    assert "mlflow.pyfunc.load_model('models:/browse/1')" in version.description
    assert "mlflow models serve -m models:/browse/1" in version.description

    code, stdout, stderr = cli(capsys, "best", str(launched.study_file), "--tracking-uri", launched.tracking_uri)
    assert code == 0, stderr
    run_id = best.user_attrs["mlflow_run_id"]
    assert "mlflow run link: http://127.0.0.1:5000/#/experiments/" in stdout and f"/runs/{run_id}\n" in stdout
    assert "champion model version: http://127.0.0.1:5000/#/models/browse/versions/1" in stdout
    trial_page = f"/dashboard/studies/{study._study_id}/trials?numbers={best.number}"
    assert f"dashboard trial: http://127.0.0.1:8080{trial_page}" in stdout
    assert f"tuner.space_hash={spec.space_hash()}" in stdout


# -- real servers, real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need(os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER),
         "headless Chromium missing: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tuner-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1400,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Server:
    """A command in its own process group, ready once ``url`` answers 200; the group is stopped after."""

    def __init__(self, cmd: list[str], url: str, *, cwd: Path, env: dict[str, str], timeout: float = 90) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"{cmd[:4]} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"{cmd[:4]} not ready at {url} within {timeout}s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 45) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(SCREENSHOTS / f"failed-{what.replace(' ', '-')}.png"))
        body = driver.find_element("tag name", "body").text[:1500]
        pytest.fail(f"browser: {what} not shown within {timeout}s; page text: {body!r}")


def _body(driver: Any) -> str:
    return str(driver.find_element("tag name", "body").text)


def test_dashboard_shows_study_trials_best_value_plot_and_notes(launched: Launched, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    spec, study = _study(launched)
    best = study.best_trial
    port = free_port()
    base = f"http://127.0.0.1:{port}/dashboard"
    server = Server([sys.executable, "-m", "tuner", "dashboard", str(launched.study_file), "--port", str(port)],
                    f"http://127.0.0.1:{port}/api/studies", cwd=launched.folder, env=tuner_env())
    try:
        browser.get(f"{base}/")
        _wait(browser, lambda d: "browse" in _body(d) and "Direction: MINIMIZE" in _body(d), "study list")

        browser.get(f"{base}/studies/{study._study_id}")
        _wait(browser, lambda d: f"Best Trial (number={best.number})" in _body(d), "best trial")
        assert str(best.value)[:8] in _body(browser)
        # The history plot is drawn: plotly's SVG holds one marker per trial with a value.
        points = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer path.point"),
                       "history plot points")
        assert len(points) >= len(study.trials) - 1
        browser.save_screenshot(str(SCREENSHOTS / "dashboard-study.png"))

        browser.get(f"{base}/studies/{study._study_id}/trials?numbers={best.number}")
        _wait(browser, lambda d: f"{len(study.trials)} Trials" in _body(d), "trial list")
        text = _body(browser)
        for t in study.trials:
            assert f"Trial {t.number}\n{t.state.name.capitalize()}" in text
        run_link = _wait(browser, lambda d: d.find_elements(By.PARTIAL_LINK_TEXT, best.user_attrs["mlflow_run_id"]),
                         "note with MLflow run link")
        assert run_link[0].get_attribute("href").endswith(f"/runs/{best.user_attrs['mlflow_run_id']}")
        assert f"COMPLETE · validation rmse = {best.value:.6g}" in _body(browser)
        browser.save_screenshot(str(SCREENSHOTS / "dashboard-trials.png"))
    finally:
        server.stop()


def test_mlflow_ui_shows_parent_run_nested_trials_and_champion(launched: Launched, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    spec, study = _study(launched)
    client = _client(launched)
    [experiment] = [e for e in client.search_experiments() if e.name == "browse"]
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.`tuner.role` = 'launch'")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = tuner_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = Server([sys.executable, "-m", "tuner", "ui", "--tracking-uri", launched.tracking_uri, "--port", str(port),
                     "--workers", "1"], f"{base}/health", cwd=launched.folder, env=env)
    try:
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs")
        _wait(browser, lambda d: parent.info.run_name in _body(d), "parent run")
        _wait(browser, lambda d: f"{N_TRIALS + 1} matching runs" in _body(d), "run count")
        _close_assistant(browser)
        row = browser.find_element(By.CSS_SELECTOR, f"[role=row][row-id='{parent.info.run_id}']")
        row.find_element(By.CSS_SELECTOR, "button").click()  # the expander of the nested runs
        _wait(browser, lambda d: all(f"trial-{t.number}" in _body(d) for t in study.trials), "nested trial runs")
        shown = {r.get_attribute("row-id") for r in browser.find_elements(By.CSS_SELECTOR, "[role=row][row-id]")}
        trial_runs = {t.user_attrs["mlflow_run_id"] for t in study.trials}
        assert trial_runs <= shown and parent.info.run_id in shown
        browser.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))

        browser.get(f"{base}/#/models/browse/versions/1")
        _wait(browser, lambda d: "@ champion" in _body(d) and "tuner.space_hash" in _body(d), "model version")
        text = _body(browser)
        assert f"trial-{study.best_trial.number}" in text  # the source run
        assert spec.space_hash() in text
        _close_assistant(browser)
        browser.save_screenshot(str(SCREENSHOTS / "mlflow-model.png"))
    finally:
        server.stop()


def _close_assistant(driver: Any) -> None:
    """MLflow 3 opens an assistant side panel; close it so the screenshot shows the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            time.sleep(0.3)
            return


# -- serving ---------------------------------------------------------------------------------


def test_mlflow_models_serve_answers_like_tuner_predict(launched: Launched, capsys: Any) -> None:
    import pandas as pd

    out = launched.folder / "predictions.csv"
    code, _, stderr = cli(capsys, "predict", "browse@champion", "--input", str(CARS), "--output", str(out),
                          "--tracking-uri", launched.tracking_uri)
    assert code == 0, stderr
    expected = pd.read_csv(out).iloc[:, 0].to_numpy()

    port = free_port()
    env = tuner_env(MLFLOW_TRACKING_URI=launched.tracking_uri)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # serve execs uvicorn
    server = Server([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/browse@champion",
                     "--env-manager", "local", "--port", str(port), "--workers", "1"],
                    f"http://127.0.0.1:{port}/ping", cwd=launched.folder, env=env)
    try:
        frame = pd.read_csv(CARS)  # every column of the file, as a client would send a row
        body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        server.stop()
    assert len(served) == len(frame) == 32
    assert served == pytest.approx(list(expected), rel=1e-5, abs=1e-4)
