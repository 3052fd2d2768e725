"""Where the stores live (tuner/stores.py): one rule from the study file, whatever the folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CARS, write_study
from tuner.config import load_spec
from tuner.errors import StorageError, TrackingError
from tuner.stores import find_tracking_uri, project_root, require_storage, require_tracking_store


def _study_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_study(folder, "s", data=CARS)


@pytest.mark.parametrize("marker", ["pyproject.toml", ".git"])
def test_project_root_is_the_nearest_folder_above_the_study_with_a_project_marker(tmp_path: Path, marker: str) -> None:
    (tmp_path / marker).mkdir() if marker == ".git" else (tmp_path / marker).write_text("")
    study = _study_in(tmp_path / "studies" / "deep")
    assert project_root(study) == tmp_path
    # wherever the command runs, the default MLflow store is the project's
    assert load_spec(study).tracking == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # and the Optuna storage stays next to the study file
    assert load_spec(study).storage_url == f"sqlite:///{tmp_path / 'studies' / 'deep' / 's.db'}"


def test_a_project_marker_wins_over_a_stray_mlflow_db_beside_the_study(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    study = _study_in(tmp_path / "studies")
    (tmp_path / "studies" / "mlflow.db").write_bytes(b"")  # what `tuner best` run in studies/ used to leave
    assert project_root(study) == tmp_path


def test_without_a_project_an_existing_mlflow_db_in_the_parent_is_kept_else_the_study_folder(tmp_path: Path) -> None:
    study = _study_in(tmp_path / "studies")
    assert project_root(study) == tmp_path / "studies"
    (tmp_path / "mlflow.db").write_bytes(b"")  # a store an earlier version made in the folder run from
    assert project_root(study) == tmp_path


def test_relative_sqlite_paths_in_the_study_file_are_relative_to_it(tmp_path: Path, monkeypatch: Any) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    study = write_study(folder, "s", storage="sqlite:///stores/optuna.db?timeout=5", tracking_uri="sqlite:///../ml.db")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(study)
    assert spec.storage_url == f"sqlite:///{folder / 'stores' / 'optuna.db'}?timeout=5"
    assert spec.tracking == f"sqlite:///{tmp_path / 'ml.db'}"


def test_the_study_file_then_the_environment_then_the_default(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_spec(write_study(tmp_path, "a")).tracking == "http://mlflow:5000"
    assert load_spec(write_study(tmp_path, "b", tracking_uri="http://other:5000")).tracking == "http://other:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_spec(write_study(tmp_path, "a")).tracking == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_commands_without_a_study_find_the_first_mlflow_db_here_or_above(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    with pytest.raises(TrackingError, match=rf"^no MLflow store found: no mlflow.db in {deep} or any folder above it; .*--tracking-uri"):
        find_tracking_uri(start=deep)
    # a project without pyproject.toml keeps its store beside the study files: named as the fix
    (deep / "studies").mkdir()
    (deep / "studies" / "mlflow.db").write_bytes(b"")
    below = deep / "studies" / "mlflow.db"
    expected = rf"^no MLflow store found in {deep} or any folder above it, but {below} is one; run this in {below.parent}, "
    with pytest.raises(TrackingError, match=expected + rf"or pass --tracking-uri sqlite:///{below}$"):
        find_tracking_uri(start=deep)
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert find_tracking_uri(start=deep) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert find_tracking_uri("http://x:5000", start=deep) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert find_tracking_uri(start=deep) == "http://env:5000"


def test_missing_sqlite_stores_are_refused_not_created(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=rf"^study storage {tmp_path / 'x.db'} does not exist; run `tuner launch s.toml` first"):
        require_storage(f"sqlite:///{tmp_path / 'x.db'}", "s.toml")
    with pytest.raises(TrackingError, match=rf"^MLflow store {tmp_path / 'm.db'} does not exist; run `tuner launch STUDY` first"):
        require_tracking_store(f"sqlite:///{tmp_path / 'm.db'}")
    require_storage("postgresql://u@h/db")  # servers are not checked here
    assert list(tmp_path.iterdir()) == []
