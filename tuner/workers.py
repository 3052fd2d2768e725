"""Many workers on one study: a study-wide lock, an exact trial budget, worker processes, promotion.

Optuna's RDB storage is the distributed engine: every worker (a process here, a container or a
remote host) opens the same study and asks it for trials. What tuner adds:

- ``StudyLock``: one lock per study shared by every process (a PostgreSQL advisory lock, or an
  ``flock`` beside a SQLite file), taken to create the study/schema/parent run once and to check
  the budget and create a trial as one step.
- ``BudgetedStudy``: ``ask()`` hands out a trial only while finished + running trials are below
  ``n_trials``, so the study ends with exactly ``n_trials`` finished trials across any number of
  workers (Optuna's ``MaxTrialsCallback`` is checked after a trial and overshoots by up to one
  trial per concurrent worker).
- ``run_worker`` (``tuner worker``), ``launch_workers`` (``tuner launch --workers N``) and
  ``promote_study`` (``tuner promote``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

# Only loaded by the commands that run workers (not by `tuner --help`): the study class needs it.
import optuna

from tuner.config import StudySpec, redact_url
from tuner.errors import StorageError, TunerError

if TYPE_CHECKING:
    import pandas as pd

    from tuner.data import Prepared
    from tuner.study import LaunchSummary
    from tuner.tracking import Promotion, Tracker
    from tuner.validation import CVData

__all__ = [
    "StudyLock",
    "BudgetedStudy",
    "BudgetSpent",
    "WorkerSummary",
    "run_worker",
    "launch_workers",
    "promote_study",
    "parse_gpus",
    "PARENT_RUN_ENV",
    "WORKER_INDEX_ENV",
    "STORAGE_ENV",
]

# Environment a launch passes to its workers (and what a container may set by hand).
PARENT_RUN_ENV = "TUNER_PARENT_RUN_ID"  # MLflow parent run the worker's trial runs nest under
WORKER_INDEX_ENV = "TUNER_WORKER_INDEX"  # 0..N-1: the worker's sampler seed offset
STORAGE_ENV = "TUNER_STORAGE"  # Optuna storage URL (keeps a password off the command line)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the parent run workers join
PROMOTED_ATTR = "promoted_trial"  # study user attr: the trial last promoted by a worker
# Seconds a worker keeps retrying a storage that went away (a PostgreSQL restart) before it gives up.
STORAGE_RETRY_SECONDS = 60.0


# -- the study-wide lock ---------------------------------------------------------------------


class StudyLock:
    """A lock held by one process at a time among all processes working on a study.

    PostgreSQL: a transaction-scoped advisory lock (released on commit, or by the server when the
    connection dies). SQLite: ``flock`` on ``<file>.lock`` beside the database (one host, as SQLite
    itself). Other databases: no lock (budget exactness then holds only for one worker).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url, self.shown = url, redact_url(url)
        # Stable across processes and hosts (unlike hash()); PostgreSQL takes a bigint key.
        self.key = zlib.crc32(f"tuner-study:{study_name}".encode())
        self._engine: Any = None
        self._conn: Any = None
        self._file: Any = None
        self.path: Path | None = None
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///").split("?")[0])
            self.path = db.with_name(db.name + ".lock")

    def __enter__(self) -> StudyLock:
        if self.path is not None:
            self._lock_file()
        elif self.url.startswith("postgresql"):
            self._lock_postgres()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.commit()  # ends the transaction: the advisory lock goes with it
                conn.close()
            except Exception:  # the server went away: so did the lock
                with contextlib.suppress(Exception):
                    conn.invalidate()
                    conn.close()

    def _lock_file(self) -> None:
        import fcntl

        assert self.path is not None
        if not self.path.parent.is_dir():
            raise StorageError(
                f"storage folder {str(self.path.parent)!r} does not exist (from {self.shown}); "
                "create it or pass --storage"
            )
        try:
            self._file = open(self.path, "a")
        except OSError as e:
            raise StorageError(
                f"cannot create the study lock {str(self.path)!r}: {e.strerror}; pass a writable --storage"
            ) from None
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def _lock_postgres(self) -> None:
        import sqlalchemy

        from tuner.study import _first_line

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url, pool_pre_ping=True, pool_size=1, connect_args={"connect_timeout": 10}
            )
        try:
            conn = self._engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.key})
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
            raise StorageError(
                f"cannot open study storage {self.shown}: {_first_line(e, hide=self.url)}; "
                "check the URL and that the database server is running"
            ) from None
        self._conn = conn

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# -- the exact budget ------------------------------------------------------------------------


class BudgetSpent(Exception):
    """Raised by ``BudgetedStudy.ask``: the study has its ``n_trials`` finished trials (or the
    launch's time is up); ends ``optimize`` before a trial is created."""


class BudgetedStudy(optuna.Study):
    """An ``optuna.Study`` whose ``ask`` keeps the study at exactly ``n_trials`` finished trials.

    Under the study lock, a trial is created only while COMPLETE + PRUNED + RUNNING trials number
    fewer than ``n_trials``. WAITING trials (heartbeat retries) are not counted: ``ask`` runs them
    first. When the free slots are all held by running trials, ``ask`` waits, since one of them
    may still fail and free its slot (a killed worker's trial is failed here through the heartbeat).
    """

    def __init__(
        self, study: optuna.Study, n_trials: int, lock: StudyLock, *, deadline: float | None = None, poll: float = 0.5
    ) -> None:
        super().__init__(study.study_name, study._storage, study.sampler, study.pruner)
        self.n_trials, self.lock, self.deadline, self.poll = n_trials, lock, deadline, poll
        self.current_trial_id: int | None = None  # the trial in flight (made FAIL if the storage drops)

    def ask(self, fixed_distributions: Any = None) -> optuna.Trial:
        from optuna.trial import TrialState

        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        while True:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise BudgetSpent("timeout")
            with self.lock:
                trials = self._storage.get_all_trials(self._study_id, deepcopy=False, states=counted)
                if sum(t.state != TrialState.RUNNING for t in trials) >= self.n_trials:
                    raise BudgetSpent("n_trials")
                if len(trials) < self.n_trials:
                    trial = super().ask(fixed_distributions)
                    self.current_trial_id = trial._trial_id
                    return trial
            time.sleep(self.poll)
            with warnings.catch_warnings():  # a no-op without a heartbeat
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self)


# -- one worker ------------------------------------------------------------------------------


@dataclass
class WorkerSummary:
    study_name: str
    storage: str
    n_run: int  # trials this worker ran (any end state)
    n_finished: int  # finished trials of the whole study
    n_trials: int
    parent_run_id: str | None
    promotion: Promotion | None
    wall_seconds: float


def _worker_seed(spec: StudySpec, index: int | None) -> int:
    # Distinct sampler seeds: workers with one seed would sample the same startup trials.
    if index is not None:
        return spec.seed + 7919 * (index + 1)
    return int.from_bytes(os.urandom(4), "little")


def _env_index() -> int | None:
    raw = os.environ.get(WORKER_INDEX_ENV)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise TunerError(f"{WORKER_INDEX_ENV}={raw!r} is not a whole number; set it to 0..N-1 or unset it") from None


def _storage_errors() -> tuple[type[BaseException], ...]:
    import sqlalchemy

    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError)


def _caused_by_storage(error: BaseException) -> bool:
    """Whether a storage error is in the chain: Optuna may raise another error while handling one
    (5.0's ``_run_trial`` ends in UnboundLocalError when the tell and its fallback read both fail)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, _storage_errors()):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _join_parent(study: optuna.Study, tracker: Tracker, spec: StudySpec, url: str, total: int) -> str | None:
    """The launch's parent run if it is still running, else a new one (call under the study lock)."""
    from tuner.study import finished_count

    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id and tracker.run_status(run_id) == "RUNNING":
        return str(run_id)
    if finished_count(study) >= total:
        return None
    run_id = tracker.start_parent(spec.name, {"tuner.storage": redact_url(url), "tuner.space_hash": spec.space_hash()})
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def run_worker(
    spec: StudySpec,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    worker_index: int | None = None,
    parent_run_id: str | None = None,
    allow_space_change: bool = False,
    promote: bool = True,
    report: bool = True,
    progress: bool = False,
    verbose: bool = False,
) -> WorkerSummary:
    """Run trials of a shared study until it holds exactly ``n_trials`` finished trials.

    Any number of workers (processes, containers, hosts) may run this on one study at once. The
    study, its schema and the MLflow parent run are created by whichever worker comes first; trial
    runs nest under ``parent_run_id`` (default: ``$TUNER_PARENT_RUN_ID``, else the study's current
    parent run). With ``promote``, the worker that sees the study finished registers the best
    trial's model and ends the parent run (once across workers).

    Raises:
        TunerError: bad study file, data, storage or tracking store (before any trial runs), or a
            storage that stays unreachable for ``STORAGE_RETRY_SECONDS``.
    """
    import torch

    from tuner.progress import Progress
    from tuner.replay import provenance
    from tuner.study import Objective, finished_count, load_inputs, open_study
    from tuner.tracking import Tracker, import_mlflow
    from tuner.train import resolve_device

    started = time.perf_counter()
    total = n_trials or spec.n_trials
    if total <= 0:
        raise TunerError(f"n_trials must be > 0 (got {total})")
    url = storage or spec.storage_url
    try:
        dev = resolve_device(device or spec.device)
    except ValueError as e:
        raise TunerError(str(e)) from None
    index = worker_index if worker_index is not None else _env_index()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    prepared, frame, cv = load_inputs(spec)
    lock = StudyLock(url, spec.name)
    with lock:  # an unreachable database fails fast, before MLflow is touched
        pass
    import_mlflow()  # outside the lock: seconds of imports that workers need not queue for
    with lock:  # one process creates the schemas (Optuna's, a SQLite MLflow store's), study and parent run
        tracker = Tracker(tracking_uri or spec.tracking, spec.name)
        study = open_study(spec, url, allow_space_change=allow_space_change, sampler_seed=_worker_seed(spec, index))
        parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or _join_parent(study, tracker, spec, url, total)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny models: a second thread doubles CPU time for no speed-up
    prepared = prepared.to(dev)
    if cv.folds:
        cv = replace(cv, folds=[f.to(dev) for f in cv.folds])
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    worker_study = BudgetedStudy(study, total, lock, deadline=deadline)
    # The same objective as a one-process launch: cross-validated where the study is.
    objective = Objective(spec, prepared, tracker, parent, dev, cv=cv, provenance=provenance(spec, dev, cv.plan))
    name = f"{socket.gethostname()}:{os.getpid()}"

    ran: list[int] = []

    def tagged(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        trial.set_user_attr("worker", name)
        return objective(trial)

    bar = Progress(total, n_done_before=finished_count(study), verbose=verbose) if progress else None
    try:
        while True:
            try:
                worker_study.optimize(tagged, callbacks=[bar] if bar else None, gc_after_trial=False)
            except BudgetSpent:
                break
            except Exception as e:
                if not _caused_by_storage(e):
                    raise
                _recover(worker_study, url, e)  # e.g. a PostgreSQL restart: reconnect and go on
    finally:
        if bar:
            bar.close()
    promotion = None
    if promote:
        promotion = _finish_if_done(spec, worker_study, tracker, lock, prepared, frame, total, report, cv, dev)
    lock.close()
    return WorkerSummary(
        study_name=spec.name,
        storage=redact_url(url),
        n_run=len(ran),
        n_finished=finished_count(worker_study),
        n_trials=total,
        parent_run_id=parent,
        promotion=promotion,
        wall_seconds=time.perf_counter() - started,
    )


def _recover(study: Any, url: str, error: BaseException) -> None:
    """Wait for the storage to come back, then make sure the trial in flight is not left RUNNING."""
    from optuna.trial import TrialState

    from tuner.study import _first_line

    print(
        f"warning: study storage {redact_url(url)} failed ({_first_line(error, hide=url)}); reconnecting",
        file=sys.stderr,
    )
    give_up = time.monotonic() + STORAGE_RETRY_SECONDS
    while True:
        try:
            trial_id = study.current_trial_id
            if trial_id is not None and study._storage.get_trial(trial_id).state == TrialState.RUNNING:
                study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
            study._storage.get_study_id_from_name(study.study_name)
            return
        except _storage_errors() as e:
            if time.monotonic() > give_up:
                raise StorageError(
                    f"study storage {redact_url(url)} unreachable for {STORAGE_RETRY_SECONDS:.0f}s: "
                    f"{_first_line(e, hide=url)}; check that the database server is running"
                ) from None
            time.sleep(1.0)


def _finish_if_done(
    spec: StudySpec,
    study: optuna.Study,
    tracker: Tracker,
    lock: StudyLock,
    prepared: Prepared,
    frame: pd.DataFrame,
    total: int,
    report: bool,
    cv: CVData,
    device: Any,
) -> Promotion | None:
    """Promote the best trial and end the parent run, once, when the study is finished."""
    from tuner.study import _best_trial, finished_count

    with lock:
        best = _best_trial(study)
        if finished_count(study) < total or best is None:
            return None
        attrs = study.user_attrs
        if attrs.get(PROMOTED_ATTR) == best.number:
            return None  # another worker did it
        promotion = _promote(spec, study, tracker, frame, prepared, cv, device)
        parent = attrs.get(PARENT_ATTR)
        if parent and tracker.run_status(parent) == "RUNNING":
            _end_parent(spec, study, tracker, parent, promotion, prepared=prepared, frame=frame, report=report)
        return promotion


def _end_parent(
    spec: StudySpec,
    study: optuna.Study,
    tracker: Tracker,
    parent: str,
    promotion: Promotion | None,
    *,
    prepared: Prepared,
    frame: pd.DataFrame,
    report: bool,
) -> None:
    """Lineage notes, the study report and the end of the parent run, as a one-process launch does."""
    from tuner.baselines import baselines
    from tuner.lineage import study_url, write_launch_notes
    from tuner.report import log_launch_report
    from tuner.study import _best_trial

    write_launch_notes(study, parent, spec=spec, tracker=tracker, promotion=promotion)
    if report:
        log_launch_report(
            study, spec, tracker, parent, prepared=prepared, frame=frame, baselines=baselines(prepared.to("cpu"))
        )
    best = _best_trial(study)
    tags = {"tuner.best_trial": str(best.number)} if best is not None else {}
    tags["tuner.dashboard_url"] = study_url(study)
    tracker.end_run(parent, "FINISHED", tags)


def _promote(
    spec: StudySpec, study: optuna.Study, tracker: Tracker, frame: pd.DataFrame, prepared: Prepared, cv: CVData, device: Any
) -> Promotion | None:
    from tuner.study import _best_trial, promote_best

    promotion = promote_best(spec, study, tracker, frame, prepared.feature_names, cv, device)
    if promotion is not None:
        study.set_user_attr(PROMOTED_ATTR, _best_trial(study).number)  # type: ignore[union-attr]
    return promotion


def promote_study(spec: StudySpec, *, storage: str | None = None, tracking_uri: str | None = None) -> Promotion:
    """Register the best trial of a stored study and give it ``champion`` if it beats the current one.

    Raises:
        TunerError: no such study, or no complete trial yet.
    """
    from tuner.study import _best_trial, load_data, open_study
    from tuner.tracking import Tracker
    from tuner.train import resolve_device
    from tuner.validation import load_folds

    url = storage or spec.storage_url
    study = open_study(spec, url, create=False)
    if _best_trial(study) is None:
        raise TunerError(f"study {spec.name!r} has no complete trial yet; run `tuner launch` or `tuner worker` first")
    prepared, frame = load_data(spec)
    cv = load_folds(spec, frame)
    tracker = Tracker(tracking_uri or spec.tracking, spec.name)
    lock = StudyLock(url, spec.name)
    try:
        with lock:
            promotion = _promote(spec, study, tracker, frame, prepared, cv, resolve_device("cpu"))
    finally:
        lock.close()
    assert promotion is not None
    return promotion


# -- many workers from one launch ------------------------------------------------------------


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; each is a CUDA device index or UUID for CUDA_VISIBLE_DEVICES."""
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",")]
    if not gpus or any(not g for g in gpus):
        raise TunerError(f"--gpus {text!r}: give comma-separated GPU indices, e.g. --gpus 0,1")
    return gpus


def _counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {s.name: sum(t.state == s for t in trials) for s in TrialState}


class _CombinedProgress:
    """One line for all workers: finished/total, best value, states, workers alive."""

    def __init__(self, total: int, n_workers: int, stream: TextIO, verbose: bool) -> None:
        self.total, self.n_workers, self.stream, self.verbose = total, n_workers, stream, verbose
        self.tty = stream.isatty() and not verbose
        self.start = time.perf_counter()
        self.last = ""

    def update(self, study: optuna.Study, alive: int) -> None:
        c = _counts(study)
        try:
            best = f"best {study.best_value:.4g} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        line = (
            f"[{c['COMPLETE'] + c['PRUNED']}/{self.total}] {best} | pruned {c['PRUNED']} failed {c['FAIL']} "
            f"running {c['RUNNING']} | workers {alive}/{self.n_workers}"
        )
        if line == self.last:
            return
        self.last = line
        elapsed = f" | {time.perf_counter() - self.start:.1f}s"
        self.stream.write("\r" + (line + elapsed).ljust(110) if self.tty else line + elapsed + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _worker_env(index: int, parent: str | None, url: str, tracking: str, gpu: str | None) -> dict[str, str]:
    import tuner

    env = dict(os.environ)
    # Workers import the same tuner as this process, wherever it comes from.
    env["PYTHONPATH"] = str(Path(tuner.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env[STORAGE_ENV] = url  # in the environment, not argv: argv is visible to every user in `ps`
    env["MLFLOW_TRACKING_URI"] = tracking
    env[WORKER_INDEX_ENV] = str(index)
    env.setdefault("OMP_NUM_THREADS", "1")
    if parent:
        env[PARENT_RUN_ENV] = parent
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def launch_workers(
    spec: StudySpec,
    *,
    n_workers: int | None = None,
    gpus: Sequence[str] = (),
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    allow_space_change: bool = False,
    device: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    report: bool = True,
    stream: TextIO = sys.stderr,
) -> LaunchSummary:
    """``tuner launch --workers N``: create the study and parent run once, run N ``tuner worker``
    processes on it (one per GPU with ``gpus``), show one progress line, then promote once.

    Raises:
        TunerError: bad input (before any worker starts), or workers that failed before the study
            reached ``n_trials``; their log lines are in the message.
        KeyboardInterrupt: Ctrl-C or SIGTERM; workers are stopped, the parent run is KILLED.
    """
    from tuner.baselines import baselines
    from tuner.study import LaunchSummary, _best_trial, finished_count, load_inputs, open_study
    from tuner.tracking import Tracker
    from tuner.train import resolve_device

    started = time.perf_counter()
    n = n_workers if n_workers is not None else (len(gpus) or 1)
    if n < 1:
        raise TunerError(f"--workers must be >= 1 (got {n})")
    total = n_trials or spec.n_trials
    if total <= 0:
        raise TunerError(f"n_trials must be > 0 (got {total})")
    if spec.source is None:
        raise TunerError("launching workers needs a study file (the spec has no source path)")
    worker_device = device or spec.device
    if gpus:
        worker_device = "cuda" if worker_device in ("auto", "cuda") else worker_device
    else:
        try:
            resolve_device(worker_device)
        except ValueError as e:
            raise TunerError(str(e)) from None
    url = storage or spec.storage_url
    tracking = tracking_uri or spec.tracking
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    prepared, frame, cv = load_inputs(spec)
    lock = StudyLock(url, spec.name)
    with lock:  # an unreachable database fails fast, before MLflow is touched
        pass
    tracker = Tracker(tracking, spec.name)
    with lock:  # before any worker starts: no race to create the schema, study or parent run
        study = open_study(spec, url, allow_space_change=allow_space_change)
        n_before = len(study.trials)
        parent = None
        if finished_count(study) < total:
            parent = tracker.start_parent(
                spec.name,
                {"tuner.storage": redact_url(url), "tuner.space_hash": spec.space_hash(), "tuner.workers": str(n)},
            )
            study.set_user_attr(PARENT_ATTR, parent)
    lock.close()

    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    log_dir = Path(tempfile.mkdtemp(prefix=f"tuner-{spec.name}-workers-"))
    if parent is not None:
        for i in range(n):
            cmd = [
                sys.executable,
                "-m",
                "tuner",
                "worker",
                str(spec.source),
                "--n-trials",
                str(total),
                "--no-promote",
                "--no-progress",
            ]
            cmd += ["--device", worker_device, "--seed", str(spec.seed)]  # launch --seed/--timeout reach the workers
            if spec.timeout is not None:
                cmd += ["--timeout", str(spec.timeout)]
            log = log_dir / f"worker-{i}.log"
            logs.append(log)
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=_worker_env(i, parent, url, tracking, gpus[i % len(gpus)] if gpus else None),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        bar = _CombinedProgress(total, n, stream, verbose) if progress else None
        try:
            while any(p.poll() is None for p in procs):
                if bar:
                    with contextlib.suppress(*_storage_errors()):  # a database restart: workers reconnect
                        bar.update(study, sum(p.poll() is None for p in procs))
                time.sleep(0.5)
            if bar:
                bar.update(study, 0)
        except BaseException:
            _stop(procs)
            tracker.end_run(parent, "KILLED")
            raise
        finally:
            if bar:
                bar.close()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    n_finished = finished_count(study)
    if failed:
        detail = "; ".join(f"worker {i} exit {rc}: {_tail(logs[i])}" for i, rc in failed)
        if n_finished < total:
            if parent is not None:
                tracker.end_run(parent, "FAILED")
            raise TunerError(
                f"{len(failed)} of {n} workers failed and the study has {n_finished}/{total} finished trials: "
                f"{detail} (logs in {log_dir})"
            )
        print(f"warning: {len(failed)} of {n} workers failed: {detail} (logs in {log_dir})", file=sys.stderr)
    else:
        for log in logs:
            log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            log_dir.rmdir()
    best = _best_trial(study)
    promotion = None
    if best is not None:
        lock = StudyLock(url, spec.name)
        try:
            with lock:
                promotion = _promote(spec, study, tracker, frame, prepared, cv, resolve_device("cpu"))
        finally:
            lock.close()
    if parent is not None:
        _end_parent(spec, study, tracker, parent, promotion, prepared=prepared, frame=frame, report=report)
    trials = study.get_trials(deepcopy=False)
    return LaunchSummary(
        study_name=spec.name,
        storage=redact_url(url),
        n_finished=n_finished,
        n_trials=total,
        n_run=len(trials) - n_before,
        best_number=best.number if best else None,
        best_params=dict(best.params) if best else {},
        best_metrics={k: v for k, v in best.user_attrs.items() if isinstance(v, float)} if best else {},
        baselines=baselines(prepared),
        promotion=promotion,
        parent_run_id=parent,
        wall_seconds=time.perf_counter() - started,
        train_seconds=sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials[n_before:]
            if t.datetime_complete and t.datetime_start
        ),
    )


def _stop(procs: Sequence[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM every worker (their running trial ends FAIL), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, end - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


def _tail(log: Path, n: int = 2) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(lines[-n:])[-400:] or "(no output)"
