"""Issue 3, bad input beyond the basic cases: `tuner launch` answers each with one clear line on
stderr and exit code 2, and writes nothing to the study storage or the MLflow store."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CARS, free_port, mlflow_store, run_tuner, write_study

from tuner.cli import main
from tuner.config import load_spec
from tuner.errors import StorageError, TrackingError

CARS_TEXT = CARS.read_text()

# name -> (CSV contents, expected message)
CSV_CASES: dict[str, tuple[str | bytes, str]] = {
    "wrong_delimiter": (
        CARS_TEXT.replace(",", ";"),
        r"has one column 'model;mpg;cyl;disp;hp;drat;wt;qsec;vs;am;gear;carb'; "
        r"it looks ';'-separated: save it comma-separated",
    ),
    "undecodable_bytes": (
        CARS_TEXT.encode().replace(b"Mazda RX4 Wag", b"Mazda RX4 W\xe4g"),
        r"is not UTF-8 text \(byte \d+: b'\\xe4'\); save it as UTF-8 CSV",
    ),
    "duplicate_columns": (
        CARS_TEXT.replace("qsec", "wt", 1),
        r"has duplicate column names \['wt'\]; rename them",
    ),
    "thousands_separators": (
        CARS_TEXT.replace(",160,110,", ',"1,160",110,', 1),
        r"column 'disp' holds numbers but 1 cell\(s\) are not: row 2 '1,160' \(thousands separators\? write 1234.5, not 1,234.5\)",
    ),
    "one_question_mark": (
        CARS_TEXT.replace(",175,", ",?,", 1),
        r"column 'hp' holds numbers but 1 cell\(s\) are not: row 6 '\?'; fix those cells or leave them empty",
    ),
    "single_target_value": (
        "\n".join([CARS_TEXT.splitlines()[0]] + [",".join([r.split(",")[0], "21", *r.split(",")[2:]]) for r in CARS_TEXT.splitlines()[1:]]),
        r"target 'mpg' has a single value \(21\) in every row; there is nothing to learn",
    ),
    "infinite_target": (
        CARS_TEXT.replace("Mazda RX4 Wag,21,", "Mazda RX4 Wag,inf,", 1),
        r"target 'mpg' is infinite at row 3; fix or drop those rows",
    ),
    "empty_validation_split": (
        "\n".join(CARS_TEXT.splitlines()[:3]),
        r"2 row\(s\) are too few for a validation fraction of 0.2: need at least 3 rows",
    ),
}

SPACE = (
    'epochs = { type = "int", low = 2, high = 3 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)
LR = 'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'

# name -> (keyword arguments of write_study, expected message)
STUDY_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "not_toml": ({"body": "[pruner\nname = 'median'\n"}, r"is not valid TOML: .*\(at line \d+, column \d+\)"),
    "zero_width_range": (
        {"space": 'lr = { type = "float", low = 0.01, high = 0.01 }\n' + SPACE},
        r"space.lr: low == high \(0.01\) is a zero-width range; use \{ type = 'fixed', value = 0.01 \}",
    ),
    "log_range_with_zero": (
        {"space": 'lr = { type = "float", low = 0.0, high = 0.1, log = true }\n' + SPACE},
        r"space.lr: log = true needs low > 0 \(got low = 0.0\)",
    ),
    "log_range_negative": (
        {"space": LR + SPACE.replace("low = 2, high = 8 }", "low = -4, high = 8, log = true }")},
        r"space.hidden_size: log = true needs low > 0 \(got low = -4\)",
    ),
    "n_trials_zero": ({"n_trials": 0}, r"n_trials: Input should be greater than 0"),
    "n_trials_negative": ({"n_trials": -3}, r"n_trials: Input should be greater than 0"),
    "unknown_sampler_option": (
        {"body": '[sampler]\nname = "tpe"\noptions = { n_startup = 3 }\n'},
        r"unknown sampler option\(s\) \['n_startup'\]; TPESampler takes \[.*'n_startup_trials'",
    ),
    "unknown_pruner_option": (
        {"body": '[pruner]\nname = "median"\noptions = { warmup = 3 }\n'},
        r"unknown pruner option\(s\) \['warmup'\]; MedianPruner takes \[.*'n_warmup_steps'",
    ),
}


# A classification study whose task cannot be inferred (the data are missing): the data problem
# is named, not "metric 'accuracy' does not fit task 'regression'".
# name -> (keyword arguments of write_study, expected message)
MISSING_DATA_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "missing_file": ({"data": "nosuch.csv"}, r"data file '.*nosuch.csv' does not exist; set `data` in the study file"),
    "missing_target": ({"target": "MPG"}, r"target column 'MPG' \(did you mean 'mpg'\?\) is not in .*; columns are \['model', 'mpg', "),
}


def _refused(tmp_path: Path, capsys: Any, argv: list[str], match: str) -> str:
    """Run `tuner ARGV`; assert exit 2, one `error:` line matching, and no store written."""
    import re

    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert re.search(match, lines[0]), lines[0]
    # (an empty `.db.lock` beside a SQLite study may exist: it is the workers' lock, not the study)
    written = sorted(p.name for p in tmp_path.rglob("*") if p.suffix == ".db" or p.name == "mlartifacts")
    assert written == [], f"written despite the error: {written}"
    return lines[0]


def _stores(tmp_path: Path) -> list[str]:
    return ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_csv_is_refused_in_one_line_before_anything_is_written(tmp_path: Path, capsys: Any, case: str) -> None:
    contents, match = CSV_CASES[case]
    data = tmp_path / "data.csv"
    data.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    study = write_study(tmp_path, "bad", data=data)
    _refused(tmp_path, capsys, ["launch", str(study), *_stores(tmp_path)], match)


def test_an_infinite_target_is_the_one_line_on_stderr(tmp_path: Path) -> None:
    # in a process of its own: pytest would capture numpy's RuntimeWarning ("invalid value
    # encountered in remainder") that the user saw printed before the error line
    data = tmp_path / "inf.csv"
    data.write_text(CSV_CASES["infinite_target"][0])  # type: ignore[arg-type]
    r = run_tuner("launch", str(write_study(tmp_path, "inf", data=data)), *_stores(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {data}: target 'mpg' is infinite at row 3; fix or drop those rows"]


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_bad_study_file_is_refused_in_one_line_before_anything_is_written(tmp_path: Path, capsys: Any, case: str) -> None:
    kwargs, match = STUDY_CASES[case]
    study = write_study(tmp_path, "bad", **kwargs)
    _refused(tmp_path, capsys, ["launch", str(study), *_stores(tmp_path)], match)


@pytest.mark.parametrize("case", sorted(MISSING_DATA_CASES))
def test_missing_data_of_a_classification_study_is_named_not_its_metric(tmp_path: Path, capsys: Any, case: str) -> None:
    kwargs, match = MISSING_DATA_CASES[case]
    study = write_study(tmp_path, "bad", metric="accuracy", **kwargs)
    line = _refused(tmp_path, capsys, ["launch", str(study), *_stores(tmp_path)], match)
    assert "does not fit task" not in line


def test_n_trials_zero_on_the_command_line_is_refused_not_ignored(tmp_path: Path, capsys: Any) -> None:
    study = write_study(tmp_path, "bad")
    _refused(
        tmp_path,
        capsys,
        ["launch", str(study), "--n-trials", "0", *_stores(tmp_path)],
        r"n_trials must be > 0 \(got 0\)",
    )


def test_fewer_rows_than_the_largest_batch_size_clamps_with_a_warning(tmp_path: Path) -> None:
    from tuner.inputs import check_batch_sizes

    spec = load_spec(write_study(tmp_path, "big", space=LR + SPACE.replace("[8, 16]", "[8, 64]")))
    with pytest.warns(UserWarning, match=r"batch sizes up to 64 exceed the 26 training rows; those trials use full batches of 26"):
        check_batch_sizes(spec, 26)


def test_storage_folder_that_does_not_exist(tmp_path: Path, capsys: Any) -> None:
    study = write_study(tmp_path, "s")
    argv = [
        "launch",
        str(study),
        "--storage",
        f"sqlite:///{tmp_path / 'nope' / 'optuna.db'}",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    _refused(tmp_path, capsys, argv, rf"storage folder '{tmp_path / 'nope'}' does not exist .*; create it or pass --storage")


def test_read_only_storage_folder(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    # Tests may run as root, which writes anywhere: simulate the read-only folder at the check.
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    study = write_study(tmp_path, "s")
    argv = [
        "launch",
        str(study),
        "--storage",
        f"sqlite:///{folder / 'optuna.db'}",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    _refused(tmp_path, capsys, argv, r"storage sqlite:///.*/ro/optuna.db is not writable; pass a writable --storage")


def test_unreachable_tracking_server_fails_after_a_bounded_wait_with_the_password_hidden(tmp_path: Path, capsys: Any) -> None:
    study = write_study(tmp_path, "s")
    uri = f"http://alice:Tr4ckPw@127.0.0.1:{free_port()}"
    start = time.monotonic()
    line = _refused(
        tmp_path,
        capsys,
        ["launch", str(study), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", uri],
        r"cannot open MLflow tracking store http://alice:\*\*\*@127.0.0.1:\d+: .*; check the URI",
    )
    assert time.monotonic() - start < 60  # retries are bounded (tuner's MLflow defaults: 2 retries)
    assert "Tr4ckPw" not in line


def test_unreachable_storage_server_error_hides_the_password(tmp_path: Path) -> None:
    from tuner.study import open_storage

    with pytest.raises(StorageError, match=r"cannot open study storage postgresql://bob:\*\*\*@127.0.0.1:\d+/db: ") as err:
        open_storage(f"postgresql://bob:St0rPw@127.0.0.1:{free_port()}/db")
    assert "St0rPw" not in str(err.value)


def test_a_postgresql_database_that_does_not_exist_is_one_line_naming_createdb(
    tmp_path: Path, capsys: Any, pg_cluster: Any
) -> None:
    study = write_study(tmp_path, "pg")
    createdb = rf"\(create it once: createdb -h 127.0.0.1 -p {pg_cluster.port} -U \w+ nosuch\); "
    argv = ["launch", str(study), "--storage", pg_cluster.url("nosuch"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    storage = r"^error: cannot open study storage postgresql\S*/nosuch: the server has no database 'nosuch' "
    _refused(tmp_path, capsys, argv, storage + createdb)
    # the MLflow store says it the same way, for a launch and for predict
    tracking = ["--tracking-uri", pg_cluster.url("nosuch")]
    store = r"^error: cannot open MLflow tracking store postgresql\S*/nosuch: the server has no database 'nosuch' "
    _refused(tmp_path, capsys, ["launch", str(study), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", *tracking], store + createdb)
    _refused(tmp_path, capsys, ["predict", "cars-mpg@champion", "--input", str(CARS), *tracking], store + createdb)


@pytest.mark.parametrize("where", ["folder", "missing_folder"])
def test_predict_output_that_cannot_be_written_is_refused_before_the_model_is_loaded(
    tmp_path: Path, capsys: Any, where: str
) -> None:
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" if where == "folder" else tmp_path / "nope" / "p.csv"
    expected = {
        "folder": rf"^error: --output '{output}' is a folder; pass a file path, e\.g\. '{output / 'predictions.csv'}'$",
        "missing_folder": rf"^error: --output '{output}': its folder '{output.parent}' does not exist; create it or pass another path$",
    }[where]
    # no store exists either: the output is checked first, before any model or store is read
    _refused(tmp_path, capsys, ["predict", "cars-mpg@champion", "--input", str(CARS), "--output", str(output),
                                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], expected)
    if where == "folder":  # the report's too (a folder that does not exist yet is made for it)
        study = write_study(tmp_path, "r")
        _refused(tmp_path, capsys, ["report", str(study), "--output", str(output)],
                 rf"^error: --output '{output}' is a folder; pass a file path, e\.g\. '{output / 'r-report.html'}'$")


def test_a_file_tracking_store_is_one_line_naming_a_database_instead(tmp_path: Path, capsys: Any) -> None:
    study = write_study(tmp_path, "files")
    tracking = ["--tracking-uri", (tmp_path / "mlruns").as_uri()]
    refused = r"MLflow 3 keeps no new runs in a file store; pass a database \(sqlite:///PATH/mlflow.db\) or a server URI$"
    _refused(tmp_path, capsys, ["launch", str(study), *_stores(tmp_path)[:2], *tracking], refused)
    _refused(tmp_path, capsys, ["predict", "cars-mpg@champion", "--input", str(CARS), *tracking], refused)


def test_tracking_store_folder_that_does_not_exist(tmp_path: Path) -> None:
    from tuner.tracking import Tracker

    with pytest.raises(
        TrackingError,
        match=r"MLflow store folder '.*/missing' does not exist; create it or pass another --tracking-uri",
    ):
        Tracker(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", "s")


def test_changed_search_space_is_refused_with_the_difference_then_allowed(tmp_path: Path, capsys: Any) -> None:
    from tuner.session import launch
    from tuner.tracking import Tracker

    tracking = mlflow_store(tmp_path / "mlflow.db")
    path = write_study(tmp_path, "space", n_trials=2, tracking_uri=tracking)
    launch(load_spec(path), progress=False, promote=False)
    trials_before = _trials(path)
    path.write_text(path.read_text().replace("high = 1e-1", "high = 0.5").replace("[8, 16]", "[8, 16, 32]"))

    rc = main(["launch", str(path)])
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2
    assert err == (
        "error: study 'space' was run with another search space (batch_size: choices [8, 16] -> [8, 16, 32]; "
        "lr: high 0.1 -> 0.5); its trials are untouched: use a new study name, or relaunch with --allow-space-change"
    )
    assert _trials(path) == trials_before
    runs = Tracker(tracking, "space").client.search_runs([Tracker(tracking, "space").experiment_id])
    assert len(runs) == 3  # the first launch's parent + 2 trials: the refused launch wrote none

    # New choices cannot join a study (Optuna keeps one distribution per name); a new range can.
    assert main(["launch", str(path), "--allow-space-change"]) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert err == (
        "error: study 'space': --allow-space-change cannot apply batch_size choices changed from [8, 16] to "
        "[8, 16, 32] (Optuna keeps one distribution per parameter name in a study; ranges may change); "
        "use a new study name"
    )
    path.write_text(path.read_text().replace("[8, 16, 32]", "[8, 16]"))
    assert main(["launch", str(path), "--n-trials", "3", "--allow-space-change", "--no-progress"]) == 0
    after = _trials(path)
    assert after[:2] == trials_before and len(after) == 3 and after[2][1] == "COMPLETE"


def test_changed_data_file_is_refused_then_allowed(tmp_path: Path, capsys: Any) -> None:
    import hashlib

    from tuner.session import launch

    data = tmp_path / "cars.csv"
    data.write_text(CARS_TEXT)
    path = write_study(tmp_path, "data", data=data, n_trials=2, tracking_uri=mlflow_store(tmp_path / "mlflow.db"))
    launch(load_spec(path), progress=False, promote=False)
    trials_before = _trials(path)
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    data.write_text("\n".join(CARS_TEXT.splitlines()[:25]) + "\n")  # rows dropped: scores would not compare
    now = hashlib.sha256(data.read_bytes()).hexdigest()

    rc = main(["launch", str(path), "--n-trials", "3"])
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2
    assert err == (
        f"error: study 'data' was run on other data: {data} changed since (SHA-256 {before[:12]} then, {now[:12]} now), "
        "and its trials were scored on the old rows; its trials are untouched: use a new study name, or relaunch "
        "with --allow-data-change"
    )
    assert _trials(path) == trials_before

    assert main(["launch", str(path), "--n-trials", "3", "--allow-data-change", "--no-progress"]) == 0
    after = _trials(path)
    assert after[:2] == trials_before and len(after) == 3 and after[2][1] == "COMPLETE"
    # the new file is the study's data from now on: the next resume needs no flag
    assert main(["launch", str(path), "--n-trials", "4", "--no-progress"]) == 0
    assert len(_trials(path)) == 4
    # a study from before the attribute: its trials' provenance tells the data they were scored on
    import optuna

    optuna.load_study(study_name="data", storage=load_spec(path).storage_url).set_user_attr("data_sha256", None)
    data.write_text(CARS_TEXT)
    capsys.readouterr()
    assert main(["launch", str(path), "--n-trials", "5"]) == 2
    assert f"(SHA-256 {now[:12]} then, {before[:12]} now)" in capsys.readouterr().err


def _trials(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    import optuna

    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    return [(t.number, t.state.name, t.params) for t in study.trials]
