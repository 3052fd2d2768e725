"""Shared fixtures: real SQLite/MLflow stores in tmp_path, a CLI runner in a subprocess, and the
service gate (skip with a reason locally, fail in CI where TUNER_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARS = ROOT / "data" / "cars.csv"
STUDIES = ROOT / "studies"
REQUIRE_SERVICES = os.environ.get("TUNER_REQUIRE_SERVICES") == "1"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def need(ok: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when an outside service the test needs is missing."""
    if ok:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def tuner_env(**extra: str) -> dict[str, str]:
    """Environment for a `python -m tuner` subprocess that imports this checkout's package."""
    env = dict(os.environ)
    # mlflow.set_tracking_uri() in an in-process test also sets this variable: a subprocess must
    # not inherit another test's store (pass it in ``extra`` where a test means it).
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # An in-process launch of an earlier test ran mlflow.set_tracking_uri, which exports these:
    # a subprocess must not inherit that test's (deleted) store.
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(extra)
    return env


def run_tuner(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env=env or tuner_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def write_study(
    folder: Path, name: str = "study", *, data: Path | str = CARS, body: str = "", space: str | None = None, **top: Any
) -> Path:
    """A small, fast study file in ``folder`` (2-3 epochs), overridable key by key."""
    defaults: dict[str, Any] = {"name": name, "target": "mpg", "n_trials": 3, "seed": 0}
    if Path(data) == CARS and "features" not in top:
        defaults["exclude"] = ["model"]  # the car names: a row id, as the shipped studies say
    defaults.update(top)
    lines = [f'data = "{Path(data).as_posix()}"']
    for k, v in defaults.items():
        if v is None:
            continue
        lines.append(f"{k} = {_toml(v)}")
    space = space or (
        'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
        'epochs = { type = "int", low = 2, high = 3 }\n'
        'batch_size = { type = "categorical", choices = [8, 16] }\n'
        'hidden_size = { type = "int", low = 2, high = 8 }\n'
        'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    )
    text = "\n".join(lines) + "\n" + body + "\n[space]\n" + space
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


_MLFLOW_URIS_AT_START = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _fresh_mlflow_uris() -> Iterator[None]:
    """tuner calls mlflow.set_tracking_uri/set_registry_uri in-process: process-global state that
    MLflow also writes to MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI. Reset both after every test so
    no later test (or its subprocesses) reads another test's store."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    for key, value in _MLFLOW_URIS_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with the shipped studies and data, as a user's checkout has them."""
    shutil.copytree(STUDIES, tmp_path / "studies", ignore=shutil.ignore_patterns("*.db*"))
    shutil.copytree(ROOT / "data", tmp_path / "data")
    # A checkout's root marker: the MLflow store of its studies is mlflow.db here (tuner.stores).
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _mlflow_template_folder() -> Path:
    # Keyed by the pytest process, not a module global: this file is imported both as `conftest`
    # and as `tests.conftest`, and both must find the same template.
    return Path(tempfile.gettempdir()) / f"tuner-tests-{os.getpid()}-mlflow-template"


@pytest.fixture(scope="session", autouse=True)
def _remove_mlflow_template() -> Iterator[None]:
    yield
    shutil.rmtree(_mlflow_template_folder(), ignore_errors=True)


def mlflow_store(db: Path) -> str:
    """``sqlite:///DB`` for an MLflow store at ``db``: a new one is an empty store copied from one
    migrated once per session; an existing one is left as it is. MLflow runs ~1.5 s CPU of Alembic
    migrations on every new SQLite store; tests about something else start from a copy (the same
    schema, a real SQLite file of their own). Tests about creating stores (default paths,
    processes racing on an empty store) do not use this."""
    import sqlite3

    if db.exists():
        return f"sqlite:///{db}"
    template = _mlflow_template_folder() / "mlflow.db"
    if not template.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        template.parent.mkdir(exist_ok=True)
        building = template.with_name("building.db")
        store = SqlAlchemyStore(f"sqlite:///{building}", (template.parent / "mlruns").as_uri())
        store.engine.dispose()
        building.rename(template)
    # The backup API copies a consistent snapshot, whatever MLflow's journal mode.
    with closing(sqlite3.connect(template)) as src, closing(sqlite3.connect(db)) as dst:
        src.backup(dst)
    return f"sqlite:///{db}"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return mlflow_store(tmp_path / "mlflow.db")


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL server of this test's own (tests/pgcluster.py): free to stop,
    restart or fill. Yields a ``PgCluster`` (``host``, ``port``, ``url(db)``,
    ``create_database(name)``, ``restart()``, ``stop(mode)``, ``start()``); stopped and removed after."""
    from pgcluster import PG_CLUSTER_MISSING, PgCluster

    need(PG_CLUSTER_MISSING is None, PG_CLUSTER_MISSING or "")
    cluster = PgCluster(free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
