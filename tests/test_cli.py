"""The CLI end to end, each command in its own process, on real stores and real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT, free_port, mlflow_store, run_tuner, tuner_env, write_study


def test_help_lists_the_commands_without_importing_heavy_packages() -> None:
    code = "import sys; from tuner.cli import _parser; _parser(); print(sorted(m for m in ('torch','optuna','mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=tuner_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "tuner", "--help"], env=tuner_env(), capture_output=True, text=True)
    for command in ("launch", "best", "predict", "dashboard", "ui"):
        assert command in help_text.stdout


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_study", r"^error: study file 'nope.toml' does not exist"),
        ("bad_target", r"^error: target column 'MPG' \(did you mean 'mpg'\?\) is not in .*cars.csv; columns are \['model', 'mpg'"),
        ("missing_data", r"^error: data file '.*absent.csv' does not exist"),
        ("bad_space", r"^error: .*space.lr: low \(1.0\) > high \(0.1\); swap them"),
    ],
)
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(tmp_path: Path, setup: str, message: str) -> None:
    import re

    args = {
        "missing_study": lambda: ["nope.toml"],
        "bad_target": lambda: [str(write_study(tmp_path, target="MPG"))],
        "missing_data": lambda: [str(write_study(tmp_path, data=tmp_path / "absent.csv"))],
        "bad_space": lambda: [str(write_study(tmp_path, space=(
            'lr = { type = "float", low = 1.0, high = 0.1 }\nepochs = { type = "int", low = 2, high = 3 }\n'
            'batch_size = { type = "fixed", value = 8 }\nhidden_size = { type = "fixed", value = 4 }\n'
            'activation = { type = "fixed", value = "relu" }\n'
        )))],
    }[setup]()
    result = run_tuner("launch", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(message, lines[0])
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.db"))  # nothing written


@pytest.mark.parametrize("args", [["--debug", "launch", "nope.toml"], ["launch", "nope.toml", "--debug"]],
                         ids=["before-the-command", "after-it"])
def test_debug_shows_the_error_itself_wherever_it_is_given(args: list[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.cli import main
    from tuner.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="study file 'nope.toml' does not exist"):
        main(args)
    assert main(["launch", "nope.toml"]) == 2  # without it: the one line and exit code 2


@pytest.mark.slow
def test_launch_predict_and_reload_end_to_end(workdir: Path) -> None:
    """Acceptance: 6 trials, parent + 6 child runs, champion; pickle-free reload in a new process
    gives the same predictions as `tuner predict`, whose validation RMSE equals the logged one."""
    # One split without the refit (the shipped file cross-validates and every champion is refit on
    # all rows; tests/test_promotion.py covers that): the champion is then the trial's own model,
    # checked against its logged RMSE.
    study_file = workdir / "studies" / "cars_mlp.toml"
    study_file.write_text(study_file.read_text().replace("folds = 5", "fraction = 0.2\nrefit = false"))
    launched = run_tuner("launch", "studies/cars_mlp.toml", "--n-trials", "6", cwd=workdir)
    assert launched.returncode == 0, launched.stderr
    assert "model registered: models:/cars-mpg/1 -> alias champion" in launched.stdout
    assert "least_squares" in launched.stdout and "mean" in launched.stdout

    storage = f"sqlite:///{workdir / 'studies' / 'cars_mlp.db'}"
    study = optuna.load_study(study_name="cars-mlp", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 6 == len(study.trials)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cars-mlp")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert sum(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in runs) == 6
    champion = client.get_model_version_by_alias("cars-mpg", "champion")
    assert champion.tags["tuner.trial"] == str(study.best_trial.number)

    env = tuner_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    predicted = run_tuner("predict", "cars-mpg@champion", "--input", "data/cars.csv", "--output", "preds.csv", cwd=workdir, env=env)
    assert predicted.returncode == 0, predicted.stderr
    via_cli = pd.read_csv(workdir / "preds.csv")["prediction"].to_numpy()
    code = (
        "import mlflow, pandas as pd, sys; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
        "m = mlflow.pyfunc.load_model('models:/cars-mpg@champion');"
        "pd.Series(m.predict(pd.read_csv('data/cars.csv'))).to_csv(sys.stdout, index=False)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    via_pyfunc = pd.read_csv(__import__("io").StringIO(loaded.stdout)).iloc[:, 0].to_numpy()
    np.testing.assert_allclose(via_cli, via_pyfunc, rtol=1e-6)

    from tuner.config import load_spec
    from tuner.inputs import load_data

    prepared, frame = load_data(load_spec(workdir / "studies" / "cars_mlp.toml"))
    val = prepared.val_index
    rmse = float(np.sqrt(np.mean((via_cli[val] - frame["mpg"].to_numpy()[val]) ** 2)))
    assert rmse == pytest.approx(study.best_value, rel=1e-4)

    best = run_tuner("best", "studies/cars_mlp.toml", "--json", cwd=workdir)
    info = json.loads(best.stdout)
    assert info["best_trial"] == study.best_trial.number
    assert info["champion"]["model_uri"] == "models:/cars-mpg@champion"


@pytest.mark.slow
def test_predict_refuses_a_csv_without_the_model_columns(workdir: Path) -> None:
    from tuner.config import load_spec
    from tuner.session import launch

    # The model to predict with, launched in this process (the commands under test run in their own).
    spec = load_spec(workdir / "studies" / "cars_linear.toml")
    launch(spec, n_trials=1, tracking_uri=mlflow_store(workdir / "mlflow.db"), progress=False, report=False)
    (workdir / "few.csv").write_text("mpg,hp\n21,110\n")
    result = run_tuner("predict", "cars-linear@champion", "--input", "few.csv", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: few.csv lacks the model's feature column(s) ['wt']; it needs ['wt']"
    unknown = run_tuner("predict", "cars-nothing@champion", "--input", "few.csv", cwd=workdir)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: model 'cars-nothing@champion' not found")


@pytest.mark.slow
def test_sigint_marks_the_running_trial_failed_and_relaunch_completes_the_study(tmp_path: Path) -> None:
    space = (
        'lr = { type = "float", low = 1e-3, high = 1e-2, log = true }\n'
        'epochs = { type = "int", low = 400, high = 500 }\n'
        'batch_size = { type = "fixed", value = 2 }\n'
        'hidden_size = { type = "int", low = 16, high = 32 }\n'
        'activation = { type = "fixed", value = "tanh" }\n'
    )
    # One split: 32 rows would default to 5-fold CV, five times the training time of this test.
    study_file = write_study(tmp_path, n_trials=1, space=space, body='[validation]\nfraction = 0.2\n[pruner]\nname = "none"\n')
    tracking = mlflow_store(tmp_path / "m.db")
    args = ["launch", str(study_file), "--tracking-uri", tracking, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "tuner", *args], cwd=tmp_path, env=tuner_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a trial is running
        time.sleep(0.5)
        try:
            if optuna.load_study(study_name="study", storage=storage).get_trials(states=(TrialState.RUNNING,)):
                break
        except KeyError:
            continue
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # tuner returns 130. CPython then exits through SIGINT itself (-2 here; a shell shows 130 for
    # both) when the KeyboardInterrupt passed through code run by exec()/eval() of a string, e.g.
    # a dataclass created by a lazy import: it marks the interrupt "unhandled" although main()
    # handled it. Seen in about 1 in 12 runs on a loaded machine (strace: kill(self, SIGINT)).
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "interrupted" in err and "Traceback" not in err
    study = optuna.load_study(study_name="study", storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    client = MlflowClient(tracking)
    run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED", (run.data.tags, failed[0].user_attrs, err)

    resumed = run_tuner("launch", str(study_file), "--tracking-uri", tracking, "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="study", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 1
    assert not study.get_trials(states=(TrialState.RUNNING,))


@pytest.mark.slow
def test_dashboard_serves_the_study_and_optuna_cli_reads_the_storage(tmp_path: Path) -> None:
    from tuner.config import load_spec
    from tuner.session import launch

    study_file = write_study(tmp_path, n_trials=2)
    # The study to serve, launched in this process (the commands under test run in their own).
    launch(load_spec(study_file), tracking_uri=mlflow_store(tmp_path / "m.db"), progress=False, report=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "dashboard", str(study_file), "--port", str(port)],
                            cwd=tmp_path, env=tuner_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard/" in first
        studies = None
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "dashboard did not answer"
        assert [s["study_name"] for s in studies] == ["study"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=5) as r:
            detail = json.load(r)
        assert len(detail["trials"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    optuna_cli = Path(sys.executable).with_name("optuna")
    listed = subprocess.run([str(optuna_cli), "trials", "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                             "--study-name", "study", "-f", "json"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2


def test_ui_and_dashboard_warn_when_bound_beyond_localhost(capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.browse import check_served_address

    check_served_address("127.0.0.1", free_port())
    assert capsys.readouterr().err == ""
    check_served_address("0.0.0.0", free_port())
    assert "warning: binding to 0.0.0.0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_ui_and_dashboard_on_a_taken_port_are_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    import socket

    study_file = write_study(tmp_path)
    with socket.socket() as taken:  # another server listening on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "mlflow.db").write_bytes(b"")  # ui without a study finds this store (it is not opened)
        (tmp_path / "study.db").write_bytes(b"")
        args = ["ui"] if command == "ui" else ["dashboard", str(study_file)]
        r = run_tuner(*args, "--port", str(port), cwd=tmp_path)
        bad = run_tuner(*args, "--port", "70000", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve on 127.0.0.1:{port}: Address already in use; pass another --port (or --host)"
    )
    assert bad.returncode == 2 and bad.stderr.strip().endswith("error: --port 70000 is not a port number; pass one from 1 to 65535")


_ = (os, ROOT)
