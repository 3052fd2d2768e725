"""MLflow's tracking side, behind a Tracker that can be given its client: experiments, runs,
weights, the registry's queries, and SQLite stores created whole.

Per trial: one nested run, one batched write of params/metrics/tags, a small weights artifact
(no ``log_model`` per trial: that costs seconds). Logging, registering and loading the champion's
model is ``tuner.registry``; the two modules are the only ones that import mlflow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping

from tuner.errors import TrackingError, redact_url
from tuner.links import experiment_link, run_link, ui_base
from tuner.replay import file_sha256

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from tuner.model import Checkpoint

__all__ = [
    "Tracker",
    "import_mlflow",
    "quiet_mlflow",
    "quote",
    "tag",
    "ensure_sqlite_store",
    "ui_base",
    "WEIGHTS_FILE",
    "PREDICTIONS_FILE",
    "REPORT_DIR",
]

WEIGHTS_FILE = "weights.pt"
PREDICTIONS_FILE = "oof.npy"  # a trial's out-of-fold predictions (float32, no pickle), for tuner.ensemble
REPORT_DIR = "report"  # artifact folder of the launch (parent) run that holds the study report
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# Quiet, bounded MLflow defaults; a user's own settings win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_mlflow() -> None:
    """MLflow configures its loggers on import: lower them afterwards (store creation chatter)."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs every SQLAlchemy error with its traceback before raising it as an MlflowException,
    # which tuner reports in one line (a read-only or full store): the raise is enough.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def import_mlflow() -> None:
    """Import mlflow now (1-2 s), e.g. before taking a lock that ``Tracker()`` is then created under."""
    import mlflow  # noqa: F401


def quote(value: str) -> str:
    """A string literal for an MLflow search filter (``o'brien`` included): MLflow's filter
    grammar takes single- or double-quoted strings and has no escape inside them."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} holds both quote characters, which MLflow's search filters cannot express; rename it")


def tag(name: str) -> str:
    return f"tuner.{name}"


class Tracker:
    """One MLflow experiment per study; runs for launches (parents) and trials (children)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        client: MlflowClient | None = None,
        artifact_location: str | None = None,
        create: bool = True,
    ) -> None:
        """Open (``create=True``: create if missing) the store and the study's experiment.

        ``create=False`` is for read-only commands: a SQLite store that does not exist, or a store
        without the experiment, is a TrackingError naming it, and nothing is written.
        """
        import mlflow
        from mlflow import MlflowClient

        from tuner.stores import check_tracking_database, require_tracking_store, tracking_store_error

        self.tracking_uri = tracking_uri
        if not create:
            require_tracking_store(tracking_uri)
        check_tracking_database(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
            if not db.parent.is_dir():
                raise TrackingError(
                    f"MLflow store folder {str(db.parent)!r} does not exist; create it or pass another --tracking-uri"
                )
            if create and not os.access(db.parent, os.W_OK):
                raise TrackingError(f"MLflow store folder {str(db.parent)!r} is not writable; pass another --tracking-uri")
            # Artifacts beside the store, not in ./mlruns of wherever the command runs.
            artifact_location = artifact_location or (db.parent / "mlartifacts" / experiment_name).as_uri()
            ensure_sqlite_store(db)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        quiet_mlflow()
        # Artifact URIs of the trial runs this tracker opened and has not closed yet: a trial's
        # weights go straight to its artifact store, without the run read (~10 SQL statements)
        # that ``client.log_artifact`` makes to look the URI up.
        self._artifact_uris: dict[str, str] = {}
        try:
            # (a database store is opened, and migrated, as the client is made)
            self.client = client or MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.experiment_id = self._experiment(experiment_name, artifact_location, create=create)
        except TrackingError:
            raise
        except Exception as e:  # mlflow raises many types for an unreachable or broken store
            raise tracking_store_error(e, tracking_uri) from None
        if create and tracking_uri.startswith("sqlite:///"):
            _sqlite_wal(Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]))
            _sqlite_synchronous_normal(self.client)

    def _experiment(self, name: str, artifact_location: str | None, *, create: bool = True) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if not create:
            raise TrackingError(
                f"MLflow store {redact_url(self.tracking_uri)} has no experiment {name!r}: the study was not "
                "launched with this store; pass the --tracking-uri its launch used"
            )
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another worker created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # -- runs -----------------------------------------------------------------------------

    def start_parent(self, study_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={tag("study"): study_name, tag("role"): "launch", **tags},
        )
        return run.info.run_id

    def start_trial(self, parent_run_id: str | None, study_name: str, trial_number: int) -> str:
        tags = {tag("study"): study_name, tag("trial"): str(trial_number), tag("role"): "trial"}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_number}", tags=tags)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        return run.info.run_id

    def end_trial(
        self,
        run_id: str,
        *,
        status: RunStatus,
        params: Mapping[str, Any] | None = None,
        history: Iterable[Mapping[str, float]] | Mapping[int, Mapping[str, float]] = (),
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        """Write everything of one trial in one batch, store its weights, close the run.

        ``history``: one metrics row per epoch, or ``{epoch: row}`` for a subset of the epochs.
        """
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        rows = history.items() if isinstance(history, Mapping) else enumerate(history)
        metric_rows = [Metric(key, float(value), now, epoch) for epoch, row in rows for key, value in row.items()]
        metric_rows += [Metric(f"final_{k}", float(v), now, 0) for k, v in (metrics or {}).items()]
        param_rows = [Param(k, str(v)) for k, v in (params or {}).items()]
        tag_rows = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # MLflow takes at most 1000 metrics (and 100 params/tags) per batch request.
        for i in range(0, max(len(metric_rows), 1), 1000):
            self.client.log_batch(
                run_id,
                metrics=metric_rows[i : i + 1000],
                params=param_rows if i == 0 else [],
                tags=tag_rows if i == 0 else [],
            )
        if checkpoint is not None:
            self.save_checkpoint(run_id, checkpoint)
        self.client.set_terminated(run_id, status)
        self._artifact_uris.pop(run_id, None)

    def end_run(self, run_id: str, status: RunStatus, tags: Mapping[str, str] | None = None) -> None:
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        self.client.set_terminated(run_id, status)

    def save_checkpoint(self, run_id: str, checkpoint: Checkpoint) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / WEIGHTS_FILE
            torch.save(checkpoint.to_payload(), path)
            uri = self._artifact_uris.get(run_id)
            if uri is None:
                self.client.log_artifact(run_id, str(path))
            else:
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                get_artifact_repository(uri, tracking_uri=self.tracking_uri).log_artifact(str(path))

    def save_predictions(self, run_id: str, predictions: Any) -> None:
        """A trial's out-of-fold predictions as a plain ``.npy`` (float32, read back without pickle)."""
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PREDICTIONS_FILE
            np.save(path, np.asarray(predictions, dtype=np.float32), allow_pickle=False)
            self.client.log_artifact(run_id, str(path))  # only with an ensemble: no fast path needed

    def load_predictions(self, run_id: str) -> Any | None:
        """The predictions ``save_predictions`` stored, or None where the run has none."""
        import numpy as np
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = Path(self.client.download_artifacts(run_id, PREDICTIONS_FILE, tmp))
            except (MlflowException, OSError):
                return None
            return np.load(path, allow_pickle=False)

    def start_ensemble(self, study_name: str, members: str) -> str:
        """The run that owns an ensemble champion's weights (not a trial: reconcile skips it)."""
        tags = {tag("study"): study_name, tag("role"): "ensemble", tag("ensemble"): members}
        return self.client.create_run(self.experiment_id, run_name="ensemble", tags=tags).info.run_id

    def has_checkpoint(self, run_id: str) -> bool:
        """Whether the run holds a weights file (a cross-validated trial has none until refit)."""
        return any(f.path == WEIGHTS_FILE for f in self.client.list_artifacts(run_id))

    def load_checkpoint(self, run_id: str) -> tuple[Checkpoint, str]:
        """A trial's weights (read with ``weights_only=True``) and the file's SHA-256."""
        import torch

        from tuner.model import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(self.client.download_artifacts(run_id, WEIGHTS_FILE, tmp))
            digest = file_sha256(path)
            payload = torch.load(path, weights_only=True, map_location="cpu")
        return Checkpoint.from_payload(payload), digest

    def trial_runs(self, study_name: str) -> list[Any]:
        """Every trial run of a study (any status), for reconciliation with its Optuna trials."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tag('role')}` = 'trial' and tags.`{tag('study')}` = {quote(study_name)}",
            max_results=50000,
        )

    def running_launch_runs(self, study_name: str) -> list[Any]:
        """Launch (parent) runs of a study that are still RUNNING."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{tag('role')}` = 'launch' and tags.`{tag('study')}` = {quote(study_name)} "
                "and attributes.status = 'RUNNING'"
            ),
            max_results=10000,
        )

    def model_versions(self, model_name: str) -> list[Any]:
        if not self.registered(model_name):
            return []
        return self.client.search_model_versions(f"name = {quote(model_name)}")

    def set_alias(self, model_name: str, alias: str, version: str | None) -> None:
        """Point ``alias`` at ``version``; None removes the alias."""
        if version is None:
            self.client.delete_registered_model_alias(model_name, alias)
        else:
            self.client.set_registered_model_alias(model_name, alias, version)

    def run_status(self, run_id: str) -> str | None:
        """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``; None if there is no such run."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_run(run_id).info.status)
        except MlflowException:
            return None

    # -- links and reports ----------------------------------------------------------------

    def experiment_url(self) -> str:
        return experiment_link(ui_base(self.tracking_uri), self.experiment_id)

    def run_url(self, run_id: str) -> str:
        return run_link(ui_base(self.tracking_uri), self.experiment_id, run_id)

    def model_version_url(self, model_name: str, version: str | int) -> str:
        return f"{ui_base(self.tracking_uri)}/#/models/{model_name}/versions/{version}"

    def parent_of(self, run_id: str) -> str | None:
        """The launch (parent) run of a trial run, or None."""
        return self.client.get_run(run_id).data.tags.get("mlflow.parentRunId")

    def log_report(self, run_id: str, folder: Path) -> None:
        """Log a report folder (HTML + PNGs) under ``report/`` of a run (the launch's parent run)."""
        self.client.log_artifacts(run_id, str(folder), artifact_path=REPORT_DIR)

    def runs_of(self, parent_run_id: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = {quote(parent_run_id)}", max_results=10000
        )

    # -- registry -------------------------------------------------------------------------

    def registered(self, model_name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            return False
        return True

    def alias_version(self, model_name: str, alias: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            return None

    def champion(self, model_name: str) -> Any | None:
        """The model version that holds the ``champion`` alias, or None."""
        return self.alias_version(model_name, "champion")


# -- SQLite stores: created whole or not at all ---------------------------------------------


def ensure_sqlite_store(db: Path) -> None:
    """Create an MLflow SQLite store atomically, or check that an existing one is whole.

    MLflow migrates a new SQLite file in place (~40 Alembic steps, 1.5-7 s): a process killed
    meanwhile left a half-made file that every later launch failed on. Here a migrated empty
    store of this MLflow version is made once per machine (``$XDG_CACHE_HOME/tuner``), copied
    beside the target and linked into place, so ``db`` appears complete or not at all; it also
    takes the migrations off every new store's start-up.

    Raises:
        TrackingError: the existing file is not a SQLite database or its schema is half-made.
    """
    import sqlite3

    if db.exists() and db.stat().st_size > 0 and _check_store(db):
        return
    template = _empty_store_template()
    tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
    try:
        with closing(sqlite3.connect(template)) as src, closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)
            with dst:  # one transaction
                # The Default experiment's artifact folder is beside this store, not the template's.
                dst.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    ((db.parent / "mlartifacts" / "0").as_uri(),),
                )
        if db.exists():  # a file without tables (e.g. a store creation killed before its first write)
            os.replace(tmp, db)
        else:
            try:
                os.link(tmp, db)  # atomic, and never over a store another process just made
            except FileExistsError:
                pass
    except sqlite3.Error as e:
        raise TrackingError(f"cannot create MLflow store {str(db)!r}: {e}; check the folder's free space and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    """A migrated, empty MLflow SQLite store of the installed MLflow version (made once)."""
    from importlib.metadata import version

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuner"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir()) / f"tuner-cache-{os.getuid()}"
        base.mkdir(exist_ok=True)
    template = base / f"mlflow-{version('mlflow')}-empty.db"
    if template.exists():
        return template
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    building = base / f".{template.name}.{os.getpid()}.building"
    building.unlink(missing_ok=True)
    quiet_mlflow()
    store = SqlAlchemyStore(f"sqlite:///{building}", (base / "mlruns").as_uri())
    store.engine.dispose()
    os.replace(building, template)  # whole or not at all, as the stores made from it
    return template


def _check_store(db: Path) -> bool:
    """True for a whole store, False for a SQLite file without tables (made anew); refuse, in
    one line, a file that is not SQLite or a schema that is half-made."""
    import sqlite3

    shown = str(db)
    try:
        # closed here, not when a collection finds it: an open reader keeps the store's -wal file
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            found = conn.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
    except sqlite3.DatabaseError as e:
        if "locked" in str(e):
            return True  # busy, not broken: MLflow waits for it
        raise TrackingError(
            f"MLflow store {shown!r} is not a readable SQLite database ({e}): truncated or overwritten? "
            "restore it from a backup, or move it away and relaunch for a new, empty store"
        ) from None
    if not tables:
        return False
    # MLflow's own head revision (what its schema check compares): reading it from the template
    # would build one, a migration, just to check a store that exists.
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    if found is not None and found[0] == head:
        return True
    raise TrackingError(
        f"MLflow store {shown!r} has schema version {found[0] if found else 'none'}, this MLflow expects {head}: "
        "if a launch was killed while creating it, move it away and relaunch; if an older MLflow made it, "
        f"run `mlflow db upgrade sqlite:///{db}`"
    )


def _sqlite_wal(db: Path) -> None:
    """Switch MLflow's SQLite file to WAL (it persists in the file): a commit then syncs one log
    instead of a rollback journal plus the database, and readers (``tuner ui``) do not block the
    writer. Best effort: a store that is busy right now keeps its mode."""
    import sqlite3

    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:
        pass


def _sqlite_synchronous_normal(client: Any) -> None:
    """``synchronous=NORMAL`` on the connections of MLflow's SQLite engine, as on the Optuna
    storage's: in WAL mode a commit then appends to the log without an fsync (a trial's run makes
    5-7 commits). A killed process loses nothing; a power cut may lose the last commits, which
    ``tuner reconcile`` realigns with the study. Rollback-journal stores keep MLflow's default.
    Best effort: a client without a SQLAlchemy engine (e.g. one given to the Tracker) is left alone."""
    import sqlalchemy

    engine = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
    if not isinstance(engine, sqlalchemy.engine.Engine) or sqlalchemy.event.contains(engine, "connect", _normal_if_wal):
        return
    sqlalchemy.event.listen(engine, "connect", _normal_if_wal)
    engine.dispose()  # connections opened before (store creation) are reopened with the setting


def _normal_if_wal(dbapi_connection: Any, connection_record: Any) -> None:
    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


