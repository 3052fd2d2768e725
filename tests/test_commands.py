"""The read-only commands (best, trials, studies, predict, report, dashboard, ui, replay) and the
small CLI features, on a real launched project: from any folder they find the study's two stores,
and they never create one."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from tests.conftest import CARS, mlflow_store, run_tuner, write_study
from tuner.cli import main

SPACE = (
    'lr = { type = "float", low = 1e-2, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 2, high = 3 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 4 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "mlartifacts" not in p.parts}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A user's project: pyproject.toml at the root, studies/ and data/ below, one launched
    2-fold study (so its champion is refit on all rows) with the default stores."""
    from tuner.config import load_spec
    from tuner.session import launch

    root = tmp_path_factory.mktemp("project")
    (root / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    (root / "data").mkdir()
    shutil.copy(CARS, root / "data" / "cars.csv")
    (root / "studies").mkdir()
    study = write_study(root / "studies", "s", data="../data/cars.csv", n_trials=3, body="[validation]\nfolds = 2\n", space=SPACE)
    mlflow_store(root / "mlflow.db")  # the default store of the project, from the migrated template
    spec = load_spec(study)
    assert spec.tracking == f"sqlite:///{root / 'mlflow.db'}"
    launch(spec, progress=False, report=False)
    yield root
    if "mlflow" in __import__("sys").modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_read_only_commands_from_other_folders_find_the_study_stores_and_create_none(project: Path, tmp_path: Path) -> None:
    before = _files(project)
    studies, data = project / "studies", project / "data"

    best = run_tuner("best", "s.toml", "--json", cwd=studies)
    assert best.returncode == 0, best.stderr
    info = json.loads(best.stdout)
    assert info["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    assert info["storage"] == f"sqlite:///{studies / 's.db'}"
    assert info["champion"]["model_uri"] == "models:/s@champion"
    # the runs table of the experiment, not MLflow 3's overview page
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs", info["mlflow_experiment_url"])

    predicted = run_tuner("predict", "s@champion", "--input", "cars.csv", "--keep", "model", cwd=data)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert lines[0] == "model,prediction" and lines[1].startswith("Mazda RX4,") and len(lines) == 33

    by_study = run_tuner("predict", "../studies/s.toml", "--input", "cars.csv", "--keep", "model", cwd=data)
    assert by_study.returncode == 0, by_study.stderr
    assert by_study.stdout.splitlines() == lines  # a study file stands for its champion

    report = run_tuner("report", "studies/s.toml", "--output", str(tmp_path / "r.html"), cwd=project)
    assert report.returncode == 0, report.stderr
    # the champion was refit on every row: the plot says so instead of "validation rows"
    assert "all 32 rows, in-sample (the champion was refit on them)" in (tmp_path / "r.html").read_text()

    assert _files(project) == before  # no stray mlflow.db in studies/ or data/, no new store


def test_read_only_commands_refuse_missing_stores_and_create_none(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    write_study(tmp_path, "s", space=SPACE)
    storage = tmp_path / "s.db"
    no_storage = rf"^error: study storage {storage} does not exist; run `tuner launch s.toml` first, or pass --storage$"
    no_mlflow = rf"^error: MLflow store {tmp_path / 'mlflow.db'} does not exist; run `tuner launch STUDY` first"
    no_store_here = rf"^error: no MLflow store found: no mlflow.db in {tmp_path} or any folder above it; "
    cases = [
        (["best", "s.toml"], no_storage),
        (["trials", "s.toml"], no_storage),
        (["report", "s.toml"], no_storage),
        (["dashboard", "s.toml"], no_storage),
        (["replay", "s.toml", "--trial", "0"], no_storage),
        (["studies", str(storage)], no_storage.replace("s.toml", "STUDY")),
        (["predict", "s@champion", "--input", str(CARS)], no_store_here),
        (["predict", "s.toml", "--input", str(CARS)], no_mlflow),
        (["ui"], no_store_here),
        (["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], no_mlflow),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]

    # The study exists, the MLflow store does not: the commands that read MLflow refuse too.
    made = optuna.create_study(storage=f"sqlite:///{storage}", study_name="s")
    made.add_trial(create_trial(params={}, distributions={}, value=3.0))
    for argv in (["best", "s.toml"], ["report", "s.toml"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(no_mlflow, err[0]), (argv, err)
    assert not (tmp_path / "mlflow.db").exists()


def test_best_against_another_store_that_lacks_the_run_is_one_line(project: Path, tmp_path: Path, capsys: Any) -> None:
    from tuner.tracking import Tracker

    other = mlflow_store(tmp_path / "other.db")
    Tracker(other, "s")  # an experiment of the same name, without the study's runs
    assert main(["best", str(project / "studies" / "s.toml"), "--tracking-uri", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(
        rf"^error: MLflow run [0-9a-f]+ of trial \d+ is not in {re.escape(other)}: study 's' was launched with another "
        "MLflow store; pass the --tracking-uri its launch used$",
        err[0],
    ), err


def test_version(capsys: Any) -> None:
    from tuner import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tuner {__version__}"


def test_trials_lists_every_trial_and_csv_exports_them_at_full_precision(project: Path, capsys: Any) -> None:
    study_file = project / "studies" / "s.toml"
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{project / 'studies' / 's.db'}").trials
    assert main(["trials", str(study_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["number", "state", "rmse", "duration_s", "lr", "epochs", "batch_size", "hidden_size", "activation"]
    assert len(lines) == 1 + len(stored)
    for line, t in zip(lines[1:], stored):
        cells = line.split()
        assert cells[:2] == [str(t.number), t.state.name]
        assert cells[4:] == [f"{t.params['lr']:.6g}", *(str(t.params[k]) for k in ("epochs", "batch_size", "hidden_size", "activation"))]

    assert main(["trials", str(study_file), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["number"]) for r in rows] == [t.number for t in stored]
    for r, t in zip(rows, stored):
        assert r["state"] == t.state.name
        assert (float(r["value"]) if r["value"] else None) == t.value
        assert float(r["lr"]) == t.params["lr"] and int(r["epochs"]) == t.params["epochs"]
        assert float(r["duration_s"]) == pytest.approx(t.duration.total_seconds())
        assert r["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]


def test_studies_lists_each_study_of_a_storage_with_counts_and_best_value(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path / 'many.db'}"
    dist = {"x": optuna.distributions.FloatDistribution(0, 10)}
    a = optuna.create_study(storage=url, study_name="alpha", direction="minimize")
    a.set_user_attr("metric", "rmse")
    for value, state in ((31918.539, TrialState.COMPLETE), (120391.7422, TrialState.COMPLETE), (None, TrialState.FAIL)):
        a.add_trial(create_trial(params={"x": 1.0}, distributions=dist, value=value, state=state))
    a.add_trial(create_trial(params={"x": 2.0}, distributions=dist, state=TrialState.PRUNED, intermediate_values={0: 5.0}))
    optuna.create_study(storage=url, study_name="beta", direction="maximize")

    assert main(["studies", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"storage {url}: 2 studies"
    header = out[1].split()
    assert header[:8] == ["study", "metric", "direction", "trials", "complete", "pruned", "failed", "running"]
    alpha = out[2].split()
    assert alpha == ["alpha", "rmse", "minimize", "4", "2", "1", "1", "0", "31918.5", "0"]
    assert out[3].split() == ["beta", "maximize", "0", "0", "0", "0", "0"]

    # Run where the study files are: their storages are found without naming one.
    (tmp_path / "studies").mkdir()
    write_study(tmp_path / "studies", "alpha", storage="sqlite:///../many.db")
    write_study(tmp_path / "studies", "nothing_yet")  # its storage does not exist: not listed, not created
    assert main(["studies", str(tmp_path / "studies" / "alpha.toml")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"storage {url}: 2 studies"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNER_STORAGE", raising=False)
    assert main(["studies"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"storage {url}: 2 studies"
    assert not (tmp_path / "studies" / "nothing_yet.db").exists()


def test_launched_study_names_its_metric_for_the_dashboard_and_plots(project: Path) -> None:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{project / 'studies' / 's.db'}")
    assert study.metric_names == ["rmse"]


def test_dashboard_moves_the_notes_mlflow_links_to_where_the_ui_is_served(
    project: Path, monkeypatch: Any, capsys: Any
) -> None:
    import optuna_dashboard

    from tuner.lineage import read_note, rebase_notes
    from tuner.links import DEFAULT_UI_URL

    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port: None)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{project / 'studies' / 's.db'}")
    assert f"({DEFAULT_UI_URL}/#/experiments/" in read_note(study)
    try:
        assert main(["dashboard", str(project / "studies" / "s.toml"), "--mlflow-url", "http://127.0.0.1:5999"]) == 0
        assert "their MLflow links now point at http://127.0.0.1:5999" in capsys.readouterr().err
        note = read_note(study)
        assert re.search(r"\(http://127\.0\.0\.1:5999/#/experiments/\d+/runs\)", note) and DEFAULT_UI_URL not in note
        for t in study.trials:
            assert re.search(r"\(http://127\.0\.0\.1:5999/#/experiments/\d+/runs/[0-9a-f]+\)", read_note(study, t))
        assert rebase_notes(study, "http://127.0.0.1:5999") == 0  # already there: nothing rewritten
    finally:
        rebase_notes(study, DEFAULT_UI_URL)


def test_old_notes_that_link_the_experiment_overview_are_pointed_at_its_runs(tmp_path: Path) -> None:
    from optuna_dashboard import save_note

    from tuner.lineage import read_note, rebase_notes

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="o")
    save_note(study, "MLflow experiment: [o](http://127.0.0.1:5000/#/experiments/7)")
    assert rebase_notes(study, "http://127.0.0.1:5000") == 1
    assert read_note(study) == "MLflow experiment: [o](http://127.0.0.1:5000/#/experiments/7/runs)"


def test_summary_table_keeps_columns_apart_for_large_values() -> None:
    from tuner.browse import metrics_table

    table = metrics_table(
        {"rmse": 31918.5391, "mae": 120391.7422, "r2": -0.5},
        {"mean": {"rmse": 1234567.0, "mae": 2.5, "r2": 0.0}, "least_squares_horsepower": {"rmse": 3.0}},
    )
    lines = table.splitlines()
    assert lines[0].split() == ["validation", "rmse", "mae", "r2"]
    assert lines[1].split() == ["tuned", "model", "31918.5391", "120391.7422", "-0.5000"]
    assert lines[2].split() == ["mean", "1234567.0000", "2.5000", "0.0000"]
    assert lines[3].split() == ["least_squares_horsepower", "3.0000"]
    assert len({len(line) for line in lines[:3]}) == 1  # right-aligned columns


def test_cli_overrides_and_server_defaults(tmp_path: Path) -> None:
    from tuner.cli import _parser, _spec

    study = write_study(tmp_path, "s", seed=0)
    args = _parser().parse_args(["launch", str(study), "--seed", "7", "--timeout", "30"])
    spec = _spec(args)
    assert (spec.seed, spec.timeout) == (7, 30.0)
    assert _spec(_parser().parse_args(["launch", str(study)])).seed == 0
    # `launch --workers N` hands its overrides to each `tuner worker` on the command line
    assert _spec(_parser().parse_args(["worker", str(study), "--seed", "7", "--timeout", "30"])).seed == 7
    assert _parser().parse_args(["ui"]).workers == 1  # one server worker, not MLflow's 4 (15 processes)


def test_version_in_a_subprocess_is_fast_and_plain(tmp_path: Path) -> None:
    out = run_tuner("--version", cwd=tmp_path)
    assert out.returncode == 0 and re.fullmatch(r"tuner \d+\.\d+\.\d+\n", out.stdout)
