"""Where a study's two stores live, decided once for every command and every working folder.

The rule (README "Where the stores live"):

- **Optuna storage**: ``--storage``, else ``$TUNER_STORAGE``, else ``storage`` in the study file,
  else ``<study file stem>.db`` next to the study file.
- **MLflow store**: ``--tracking-uri``, else ``tracking_uri`` in the study file, else
  ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project root>/mlflow.db``. The project root is the
  nearest folder at or above the study file that holds ``pyproject.toml`` or ``.git``; without
  one, the study file's folder or its parent when that holds an ``mlflow.db`` already; else the
  study file's folder.
- A relative ``sqlite:///`` path written in the study file is relative to the study file.
- Commands without a study file (``tuner predict MODEL``, ``tuner ui``): ``--tracking-uri``, else
  ``$MLFLOW_TRACKING_URI``, else the first ``mlflow.db`` in the current folder or above it.

Read-only commands (best, predict, report, dashboard, ui, trials, studies, replay) never create
a store: a SQLite file that is not there is one line naming the file and ``tuner launch``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuner.errors import StorageError, TrackingError, first_line, missing_database, redact_url

__all__ = [
    "MLFLOW_DB",
    "PROJECT_MARKERS",
    "project_root",
    "default_storage_url",
    "default_tracking_uri",
    "resolve_sqlite_url",
    "sqlite_path",
    "find_tracking_uri",
    "require_storage",
    "require_tracking_store",
    "tracking_store_error",
    "check_tracking_database",
]

MLFLOW_DB = "mlflow.db"
PROJECT_MARKERS = ("pyproject.toml", ".git")


def project_root(study_file: str | Path) -> Path:
    """The folder whose ``mlflow.db`` a study's runs go to by default (see the module's rule)."""
    folder = Path(study_file).resolve().parent
    for d in (folder, *folder.parents):
        if any((d / m).exists() for m in PROJECT_MARKERS):
            return d
    # No project around it: keep a store that an earlier version put in the folder the user
    # ran from, which was usually the study file's folder or the one above it.
    for d in (folder, folder.parent):
        if (d / MLFLOW_DB).is_file():
            return d
    return folder


def default_storage_url(study_file: str | Path) -> str:
    """``sqlite:///<folder>/<stem>.db`` beside the study file."""
    path = Path(study_file).resolve()
    return f"sqlite:///{path.with_suffix('.db')}"


def default_tracking_uri(study_file: str | Path) -> str:
    """``sqlite:///<project root>/mlflow.db``."""
    return f"sqlite:///{project_root(study_file) / MLFLOW_DB}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (query string dropped), else None."""
    if not url.startswith("sqlite:///"):
        return None
    raw = url.removeprefix("sqlite:///").split("?")[0]
    return Path(raw) if raw and raw != ":memory:" else None


def resolve_sqlite_url(url: str, base: Path) -> str:
    """A relative ``sqlite:///`` path made absolute against ``base``; other URLs unchanged."""
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    _, sep, query = url.partition("?")
    return f"sqlite:///{(base / path).resolve()}{sep}{query}"


def find_tracking_uri(explicit: str | None = None, start: str | Path | None = None) -> str:
    """The MLflow store of a command without a study file.

    Raises:
        TrackingError: no ``mlflow.db`` in ``start`` (default: the current folder) or above it.
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / MLFLOW_DB).is_file():
            return f"sqlite:///{d / MLFLOW_DB}"
    # A project without pyproject.toml or .git keeps its store beside the study files
    # (studies/mlflow.db): name one just below, the usual case of running from the project's top.
    below = sorted(p for p in here.glob(f"*/{MLFLOW_DB}") if p.is_file())
    if below:
        raise TrackingError(
            f"no MLflow store found in {here} or any folder above it, but {below[0]} is one; run this in "
            f"{below[0].parent}, or pass --tracking-uri sqlite:///{below[0]}"
        )
    raise TrackingError(
        f"no MLflow store found: no {MLFLOW_DB} in {here} or any folder above it; run this in the project "
        "where `tuner launch` wrote it, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)"
    )


def require_storage(url: str, study: str | Path | None = None) -> None:
    """Refuse a SQLite Optuna storage that does not exist (opening it would create it).

    Raises:
        StorageError: names the file and ``tuner launch`` as the fix.
    """
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        launch = f"`tuner launch {_shown(study)}`" if study else "`tuner launch STUDY`"
        raise StorageError(f"study storage {path} does not exist; run {launch} first, or pass --storage")


def _shown(path: str | Path) -> str:
    """A path as the user would type it here: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def require_tracking_store(uri: str) -> None:
    """Refuse a SQLite MLflow store that does not exist (opening it would create it).

    Raises:
        TrackingError: names the file and ``tuner launch`` as the fix.
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(
            f"MLflow store {path} does not exist; run `tuner launch STUDY` first (it creates it), "
            "or pass --tracking-uri"
        )


def tracking_store_error(e: BaseException, uri: str) -> TrackingError:
    """The one message for an MLflow tracking store that cannot be opened, with the fix."""
    text = first_line(e, hide=uri)
    if "filesystem tracking backend" in text:  # MLflow 3 refuses ./mlruns and file: stores
        why = "MLflow 3 keeps no new runs in a file store; pass a database (sqlite:///PATH/mlflow.db) or a server URI"
    else:
        why = (missing_database(text, uri) or text) + "; check the URI (--tracking-uri) and that the server is running"
    return TrackingError(f"cannot open MLflow tracking store {redact_url(uri)}: {why}")


def check_tracking_database(uri: str) -> None:
    """Connect once to a database server's tracking URI (PostgreSQL, MySQL) before MLflow does.

    MLflow retries a failed connection 10 times over ~100 s (a fixed count, no setting): for it a
    server still starting, for a user a missing database or a dead server answered in minutes.

    Raises:
        TrackingError: the database cannot be reached (the message names it and the fix).
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("postgresql", "mysql"):
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
        raise tracking_store_error(e, uri) from None
    finally:
        engine.dispose()
