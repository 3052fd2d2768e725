"""What a tuner command sets for its own process: a rarer collector, and a quick exit that closes
its database connections first (tuner/process.py). Each command runs in its own process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from tests.conftest import run_tuner, tuner_env, write_study


def test_a_tuner_process_collects_garbage_less_often_than_pythons_default(tmp_path: Path) -> None:
    code = (
        "import gc; from tuner.cli import main; before = gc.get_threshold(); "
        f"main(['studies', 'sqlite:///{tmp_path / 'none.db'}']); print(before, gc.get_threshold())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=tuner_env(), cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "(700, 10, 10) (50000, 20, 20)", out.stderr


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(("-wal", "-shm", "-journal")))


def test_commands_exit_with_every_sqlite_write_in_the_database_files(tmp_path: Path) -> None:
    study = write_study(tmp_path, n_trials=1, registered_model="cars", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # `best` opens the MLflow store read-only as well: a reader left open kept the -wal file.
    for command in (["launch", str(study), "--no-progress"], ["best", str(study)], ["trials", str(study)]):
        result = run_tuner(*command, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert _leftovers(tmp_path) == [], command  # each file whole: a copy of it alone loses nothing
    with closing(sqlite3.connect(tmp_path / "study.db")) as conn:
        assert conn.execute("SELECT state FROM trials").fetchall() == [("COMPLETE",)]
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as conn:
        assert conn.execute("SELECT alias FROM registered_model_aliases WHERE name = 'cars'").fetchall() == [("champion",)]
