"""The Optuna side of a study: storage, sampler, pruner, the study itself and the study-wide lock.

Every other module reaches the storage through the functions here (``fail_stale_trials``,
``record_heartbeat``, ``StudyLock``); nothing else opens an ``RDBStorage`` or reads a study's
``_storage``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import sqlite3
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tuner.config import StudySpec, check_options
from tuner.errors import StorageError, TunerError, first_line, missing_database, redact_url

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DATA_SHA256_ATTR",
    "open_storage",
    "open_study",
    "make_sampler",
    "make_pruner",
    "reseed_sampler",
    "check_storage_url",
    "finished_count",
    "StaleTrials",
    "fail_stale_trials",
    "on_stale_trial",
    "fail_waiting_trials",
    "stored_trial",
    "tell_trial",
    "storage_alive",
    "heartbeat_storage",
    "storage_errors",
    "storage_problem",
    "cannot_open",
    "caused_by_storage",
]

DATA_SHA256_ATTR = "data_sha256"  # the study's user attribute: the data file its trials were scored on


# -- storage ---------------------------------------------------------------------------------


class StaleTrials:
    """The storage's one callback for a trial found stale (its heartbeat stopped): Optuna's retry
    (a WAITING copy with the same params), then every listener, e.g. the launch's tracker ending
    the trial's MLflow run. Whoever fails a stale trial (this process's gate, another worker,
    ``tuner reconcile``) goes through it."""

    def __init__(self, max_retry: int) -> None:
        import optuna

        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if max_retry else None
        self.listeners: list[Callable[[optuna.trial.FrozenTrial], None]] = []

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.retry is not None:
            self.retry(study, trial)
        for listener in self.listeners:
            listener(trial)


def open_storage(url: str, spec: StudySpec | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with a busy timeout and WAL (SQLite) or pre-ping (server databases), and
    Optuna's heartbeat so a killed worker leaves no trial RUNNING forever.

    Raises:
        StorageError: the database cannot be opened; the URL is shown with its password hidden.
    """
    import optuna
    import sqlalchemy

    engine_kwargs: dict[str, Any] = {}
    check_storage_url(url)
    if url.startswith("sqlite:///"):
        # A busy timeout lets a second worker or the dashboard wait for the lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 30, "factory": _SynchronousNormal}
    elif url.startswith(("postgresql", "mysql")):
        # Pre-ping: a pooled connection to a restarted server is replaced, not used and failed.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    hb = spec.heartbeat if spec is not None else None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=hb.interval if hb else None,
            grace_period=hb.grace_period if hb else None,
            heartbeat_stale_trial_callback=StaleTrials(hb.max_retry) if hb else None,
        )
        if url.startswith("sqlite"):
            with storage.engine.connect() as conn:  # WAL persists in the file: readers never block the writer
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise cannot_open(e, url) from None
    return storage


def cannot_open(e: BaseException, url: str) -> StorageError:
    """The one message for a study storage that cannot be opened (the launch's lock or Optuna's)."""
    return StorageError(
        f"cannot open study storage {redact_url(url)}: {storage_problem(e, url)}; check the URL and that the database "
        "server is running"
    )


def storage_problem(e: BaseException, url: str) -> str:
    """An SQLite or server error in words a user can act on (the first line otherwise)."""
    text = first_line(e, hide=url)
    lowered = text.lower()
    path = url.removeprefix("sqlite:///").split("?")[0] if url.startswith("sqlite:///") else None
    if path is not None:
        if "disk is full" in lowered or "no space left" in lowered:
            return f"the disk of {path!r} is full (free space, then relaunch: finished trials are kept)"
        if "readonly" in lowered or "read-only" in lowered:
            return f"{path!r} is read-only (make it writable or pass another --storage)"
        if "locked" in lowered:
            return f"{path!r} stayed locked by another process for the 30 s busy timeout (wait for it, or stop it, then relaunch)"
        if "not a database" in lowered or "malformed" in lowered:
            return f"{path!r} is not a valid SQLite database (truncated or overwritten? restore it or pass another --storage)"
    return missing_database(text, url) or text


def check_storage_url(url: str) -> None:
    """Refuse a SQLite path whose folder is missing or not writable, before anything is written.

    Raises:
        StorageError: the message names the folder (the URL's password hidden) and the fix.
    """
    if not url.startswith("sqlite:///"):
        return
    shown = redact_url(url)
    path = Path(url.removeprefix("sqlite:///").split("?")[0])
    if not path.parent.is_dir():
        raise StorageError(
            f"storage folder {str(path.parent)!r} does not exist (from {shown}); create it or pass --storage"
        )
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StorageError(f"storage {shown} is not writable; pass a writable --storage")


class _SynchronousNormal(sqlite3.Connection):
    """SQLite connections with ``synchronous=NORMAL``: in WAL mode a commit then appends to the
    log without an fsync (the log is synced at checkpoints). The file cannot be corrupted; a power
    cut may lose the last commits, i.e. a trial that is then re-run. A trial commits ~30 times
    (ask, params, reports, user attrs, tell): an fsync each cost 2-7 ms on a busy disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA synchronous=NORMAL")


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage that went away raises (a PostgreSQL restart, a full disk, a locked file)."""
    import optuna
    import sqlalchemy

    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError, sqlite3.Error)


def caused_by_storage(error: BaseException) -> bool:
    """Whether a storage error is in the chain: Optuna may raise another error while handling one
    (5.0's ``_run_trial`` ends in UnboundLocalError when the tell and its fallback read both fail)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, storage_errors()):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def make_sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    import optuna

    factories: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "qmc": optuna.samplers.QMCSampler,
    }
    factory = factories[spec.sampler.name]
    check_options("sampler", factory, spec.sampler.options)
    options = {"seed": spec.seed if seed is None else seed, **spec.sampler.options}
    try:
        return factory(**options)
    except (ImportError, ModuleNotFoundError) as e:
        raise TunerError(f"sampler {spec.sampler.name!r} needs a package that is missing: {e}; pip install it") from None


def reseed_sampler(study: optuna.Study, spec: StudySpec, n_existing: int, seed: int | None = None) -> None:
    """Give the study's sampler a stream of its own for a study that holds ``n_existing`` trials.

    A seeded sampler replays its random stream from the start: a resumed launch, or a second
    launch started with the first on one study, would draw the same startup params as the first.
    Called when a launch opens a study that has trials, and by the gate when another process's
    trial is running; deterministic (the same study state gives the same draws), and a launch that
    has the study to itself from the start is never reseeded. QMC keeps its place in the sequence
    in the study (keyed by its seed): it is left alone.
    """
    import numpy as np

    if spec.sampler.name != "qmc":  # numpy's SeedSequence: nearby inputs give unrelated streams
        mixed = np.random.SeedSequence([spec.seed if seed is None else seed, n_existing]).generate_state(1)[0]
        study.sampler = make_sampler(spec, int(mixed))


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    import optuna

    factories: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    factory = factories[spec.pruner.name]
    options = dict(spec.pruner.options)
    if spec.pruner.name == "none" and "options" not in spec.pruner.model_fields_set:
        options = {}  # the default options belong to the median pruner
    if spec.pruner.name != "median" and "options" not in spec.pruner.model_fields_set:
        options = {}
    check_options("pruner", factory, options)
    try:
        return factory(**options)
    except (TypeError, ValueError) as e:
        raise TunerError(f"pruner {spec.pruner.name!r}: {e}; fix pruner.options in the study file") from None


def open_study(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    allow_space_change: bool = False,
    data_sha256: str | None = None,
    allow_data_change: bool = False,
    create: bool = True,
    sampler_seed: int | None = None,
) -> optuna.Study:
    """Create or resume the study; refuse a changed search space unless allowed, and, given the
    data file's ``data_sha256``, a changed data file unless allowed.

    Raises:
        StorageError: storage unreachable, study missing (``create=False``), space or data changed.
    """
    import optuna

    from tuner.space import describe_change, incompatible_changes

    url = storage_url or spec.storage_url
    if not create:
        from tuner.stores import require_storage

        require_storage(url, spec.source)  # a read-only command never creates the SQLite file
    storage = open_storage(url, spec)
    sampler, pruner = make_sampler(spec, sampler_seed), make_pruner(spec)
    if create:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=spec.name,
                direction=spec.study_direction,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        except ValueError as e:  # e.g. direction differs from the stored study
            raise StorageError(f"study {spec.name!r} in {redact_url(url)} cannot be resumed: {e}") from None
        if study.metric_names != [spec.metric]:
            study.set_metric_names([spec.metric])  # optuna-dashboard and plots say "rmse", not "Objective 0"
        n_existing = len(study.get_trials(deepcopy=False))
        if n_existing:  # a resumed launch would draw the first launch's startup params again
            reseed_sampler(study, spec, n_existing, sampler_seed)
    else:
        try:
            study = optuna.load_study(storage=storage, study_name=spec.name, sampler=sampler, pruner=pruner)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            raise StorageError(
                f"study {spec.name!r} does not exist in {redact_url(url)} (studies there: {names}); "
                "run `tuner launch` first or pass --storage"
            ) from None
    current = spec.space_dict()
    stored = study.user_attrs.get("space")
    if stored is None:
            for key, value in {
                "space": current,
                "space_hash": spec.space_hash(),
                "target": spec.target,
                "metric": spec.metric,
                "registered_model": spec.model_name,
                "data": str(spec.data),
            }.items():
                study.set_user_attr(key, value)
    elif stored != current:
        if not allow_space_change:
            raise StorageError(
                f"study {spec.name!r} was run with another search space ({describe_change(stored, current)}); "
                "its trials are untouched: use a new study name, or relaunch with --allow-space-change"
            )
        incompatible = incompatible_changes(stored, current)
        if incompatible:
            raise StorageError(
                f"study {spec.name!r}: --allow-space-change cannot apply {'; '.join(incompatible)} (Optuna keeps "
                "one distribution per parameter name in a study; ranges may change); use a new study name"
            )
        study.set_user_attr("space", current)
        study.set_user_attr("space_hash", spec.space_hash())
    if create and data_sha256 is not None:
        _check_data(study, spec, data_sha256, allow_data_change)
    return study


def _check_data(study: optuna.Study, spec: StudySpec, current: str, allow_change: bool) -> None:
    """A study's trials were scored on one data file: resuming on other bytes would rank trials
    (and pick the champion) across two data sets, so it is refused unless allowed."""
    recorded = study.user_attrs.get(DATA_SHA256_ATTR)
    # a study from before the attribute: the data its last trial recorded in its provenance
    stored = recorded or next((h for t in reversed(study.get_trials(deepcopy=False))
                               if (h := (t.user_attrs.get("provenance") or {}).get("data_sha256"))), None)
    if stored is not None and stored != current and not allow_change:
        raise StorageError(
            f"study {spec.name!r} was run on other data: {spec.data} changed since (SHA-256 {stored[:12]} then, "
            f"{current[:12]} now), and its trials were scored on the old rows; its trials are untouched: use a new "
            "study name, or relaunch with --allow-data-change"
        )
    if recorded != current:
        study.set_user_attr(DATA_SHA256_ATTR, current)


def finished_count(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# -- liveness: heartbeats and stale trials --------------------------------------------------


def heartbeat_storage(study: optuna.Study) -> Any | None:
    """The study's storage where it keeps heartbeats (``record_heartbeat``), else None."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    return storage if is_heartbeat_enabled(storage) else None


def fail_stale_trials(study: optuna.Study, running: list[optuna.trial.FrozenTrial] | None = None) -> list[int]:
    """FAIL the RUNNING trials of a dead process and return their numbers.

    ``running``: the RUNNING trials of a read the caller just made (the gate's), so that the check
    for trials without a heartbeat row does not read the study again; None: read them.

    Optuna's rule (a heartbeat older than the grace period) plus one it lacks: a RUNNING trial
    with no heartbeat row at all, started longer than the grace period ago (a process killed
    between ``ask`` and its first beat, or a study written by an older tuner), which Optuna's
    check skips for ever. Each failed trial goes through the storage's ``StaleTrials`` callback.
    """
    import optuna
    from optuna.trial import TrialState

    storage = heartbeat_storage(study)
    if storage is None:
        return []
    ids = set(storage._get_stale_trial_ids(study._study_id)) | set(_trials_without_heartbeat(study, running))
    failed = []
    for trial_id in sorted(ids):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(copy.deepcopy(storage.get_trial(trial_id)))
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial in failed:
        if callback is not None:
            callback(study, trial)
    return [t.number for t in failed]


def on_stale_trial(study: optuna.Study, listener: Callable[[optuna.trial.FrozenTrial], None]) -> None:
    """Call ``listener`` with every stale trial this process fails (the storage's one callback)."""
    storage = heartbeat_storage(study)
    callback = storage.get_heartbeat_stale_trial_callback() if storage is not None else None
    if isinstance(callback, StaleTrials):
        callback.listeners.append(listener)


def fail_waiting_trials(study: optuna.Study, trial_ids: list[int], reason: str) -> None:
    """FAIL WAITING trials that will never run (e.g. retries once the study is full)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for trial_id in trial_ids:
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass  # another process took it or dropped it


def tell_trial(study: optuna.Study, trial: optuna.Trial, value: float | None = None, state: Any = None) -> optuna.trial.FrozenTrial:
    """``study.tell(trial, value, state=state, skip_if_finished=True)``, returning the trial as told.

    ``study.tell`` reads the trial twice (its state before, the stored trial after: ~12 SQL
    statements per trial); a COMPLETE (finite or infinite value) or PRUNED trial of this process
    is told here with what Optuna does in between (the sampler's ``after_trial``, a PRUNED trial's
    last intermediate value as its value, one state write), and the trial comes back from the
    ``Trial``'s own view of itself. This reaches Optuna's internals (the storage, and
    ``Trial._get_latest_trial``, which ``tuner.pruning`` already uses) because Optuna has no
    public tell without the read-back. A trial another process finished meanwhile (failed as
    stale) comes back as stored. FAIL, NaN and Hyperband (whose sampler call takes its bracket's
    study) go through ``study.tell``.
    """
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    completes = state is None and value is not None and not math.isnan(float(value))
    if not (completes or state == TrialState.PRUNED) or isinstance(study.pruner, optuna.pruners.HyperbandPruner):
        return study.tell(trial, value, state=state, skip_if_finished=True)
    latest = trial._get_latest_trial()
    state = TrialState.COMPLETE if completes else TrialState.PRUNED
    values: list[float] | None = [float(value)] if completes else None  # type: ignore[arg-type]
    if not completes and latest.last_step is not None:
        last = latest.intermediate_values[latest.last_step]
        values = None if math.isnan(last) else [float(last)]
    finished_elsewhere = False
    try:
        study.sampler.after_trial(study, latest, state, values)
    finally:  # as Optuna: the state is written even if the sampler's hook raised
        try:
            study._storage.set_trial_state_values(trial._trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            finished_elsewhere = True  # another process failed it meanwhile (stale)
    if finished_elsewhere:
        return stored_trial(study, trial._trial_id)
    # The system attrs (the sampler's notes) are not read back: nothing downstream reads them.
    return FrozenTrial(
        number=latest.number, state=state, value=None, values=values, datetime_start=latest.datetime_start,
        datetime_complete=datetime.datetime.now(), params=latest.params, distributions=latest.distributions,
        user_attrs=latest.user_attrs, system_attrs={}, intermediate_values=latest.intermediate_values,
        trial_id=trial._trial_id,
    )


def stored_trial(study: optuna.Study, trial_id: int) -> optuna.trial.FrozenTrial:
    """A trial as the storage holds it now."""
    return study._storage.get_trial(trial_id)


def storage_alive(study: optuna.Study) -> None:
    """Raise the storage's error if it cannot answer now."""
    study._storage.get_study_id_from_name(study.study_name)


def _trials_without_heartbeat(study: optuna.Study, running: list[optuna.trial.FrozenTrial] | None = None) -> list[int]:
    import sqlalchemy
    from optuna.trial import TrialState

    storage = heartbeat_storage(study)
    grace = getattr(_rdb(storage), "grace_period", None) if storage is not None else None
    if storage is None or not grace:
        return []
    # Optuna stamps datetime_start with the local clock (datetime.now()).
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=float(grace))
    if running is None:
        running = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    old = {
        t._trial_id
        for t in running
        if t.state == TrialState.RUNNING and t.datetime_start is not None and t.datetime_start < cutoff
    }
    if not old:
        return []
    with _rdb(storage).engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
                sqlalchemy.bindparam("ids", expanding=True)
            ),
            {"ids": sorted(old)},
        )
        beating = {int(r[0]) for r in rows}
    return sorted(old - beating)


def _rdb(storage: Any) -> Any:
    """The RDBStorage under Optuna's cache wrapper."""
    return getattr(storage, "_backend", storage)
