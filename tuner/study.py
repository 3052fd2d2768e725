"""Storage, sampler, pruner, objective and the launch loop of a study.

The objective adapts Optuna to ``train()`` through the epoch hook; MLflow is reached only through
``tuner.tracking.Tracker``.
"""

from __future__ import annotations

import copy
import math
import os
import sqlite3
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence, TextIO

from tuner import interrupts
from tuner.config import StudySpec, check_options, redact_url
from tuner.errors import StorageError, TunerError
from tuner.pruning import FinishedTrials, fast_pruning

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from tuner.data import Prepared
    from tuner.tracking import Promotion, RunStatus, Tracker
    from tuner.train import TrainResult
    from tuner.validation import CVData, CVResult

__all__ = [
    "open_storage",
    "open_study",
    "load_data",
    "make_sampler",
    "make_pruner",
    "Objective",
    "launch",
    "LaunchSummary",
    "finished_count",
    "best_info",
    "promote_best",
    "check_storage_url",
    "study_lock",
    "TrialBudget",
    "run_trials",
]

FINISHED_STATES_NAMES = ("COMPLETE", "PRUNED")


# -- storage ---------------------------------------------------------------------------------


def open_storage(url: str, spec: StudySpec | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with a busy timeout and WAL (SQLite) or pre-ping (server databases), and
    Optuna's heartbeat so a killed worker leaves no trial RUNNING forever.

    Raises:
        StorageError: the database cannot be opened; the URL is shown with its password hidden.
    """
    import optuna
    import sqlalchemy

    shown = redact_url(url)
    engine_kwargs: dict[str, Any] = {}
    check_storage_url(url)
    if url.startswith("sqlite:///"):
        # A busy timeout lets a second worker or the dashboard wait for the lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 30, "factory": _SynchronousNormal}
    elif url.startswith("postgresql"):
        # Pre-ping: a pooled connection to a restarted server is replaced, not used and failed.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    elif url.startswith("mysql"):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    hb = spec.heartbeat if spec is not None else None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=hb.interval if hb else None,
            grace_period=hb.grace_period if hb else None,
            heartbeat_stale_trial_callback=(
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=hb.max_retry) if hb and hb.max_retry else None
            ),
        )
        if url.startswith("sqlite"):
            with storage.engine.connect() as conn:  # WAL persists in the file: readers never block the writer
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise StorageError(
            f"cannot open study storage {shown}: {_first_line(e, hide=url)}; check the URL and that the database server is running"
        ) from None
    return storage


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


def _first_line(e: BaseException, hide: str = "") -> str:
    from urllib.parse import urlsplit

    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    try:
        password = urlsplit(hide).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


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
    create: bool = True,
    sampler_seed: int | None = None,
) -> optuna.Study:
    """Create or resume the study; refuse a changed search space unless allowed.

    Raises:
        StorageError: storage unreachable, study missing (``create=False``) or space changed.
    """
    import optuna

    from tuner.space import describe_change, incompatible_changes

    url = storage_url or spec.storage_url
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
        if create:
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
    return study


def finished_count(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# -- trial budget: exactly n_trials finished trials, however many workers ------------------

# A launch stops after this many failed trials in a row (e.g. out of memory on every trial)
# instead of failing forever; failed trials never count towards n_trials.
MAX_FAILED_IN_A_ROW = 5


@contextmanager
def study_lock(url: str) -> Iterator[None]:
    """Serialise the workers of one SQLite study on this host (a lock file beside the database).

    Used to create the schema and study once, to claim trial slots and to promote. Other storages
    get no lock here: PostgreSQL workers rely on the budget's count alone (see TrialBudget).
    """
    path = _lock_path(url)
    if path is None:
        yield
        return
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?")[0] + ".lock")


class TrialBudget:
    """Claims one trial slot at a time so that every worker together stops at exactly
    ``n_trials`` finished (COMPLETE + PRUNED) trials.

    ``claim()`` takes the study lock and counts finished and RUNNING trials (failing stale ones,
    whose heartbeat stopped, where they would fill the budget: before a ``"run"``, the caller's
    ``study.optimize`` fails them itself); it returns ``"run"`` with the lock still held, and the caller
    releases it (``release()``) once the new trial exists in the storage, so two workers can never
    both take the last slot. FAIL trials free their slot; a WAITING retry of a stale trial is what
    the next ``study.ask()`` runs. ``"wait"``: other workers' running trials may still fill the
    budget; ``"done"``: it is full.
    """

    def __init__(self, study: optuna.Study, n_trials: int, url: str) -> None:
        self.study, self.n_trials = study, n_trials
        self._path = _lock_path(url)
        self._file: TextIO | None = None

    def claim(self) -> Literal["run", "wait", "done"]:
        from optuna.trial import TrialState

        def count() -> tuple[int, int]:
            trials = self.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            )
            n_running = sum(t.state == TrialState.RUNNING for t in trials)
            return len(trials) - n_running, n_running

        self._acquire()
        try:
            n_finished, n_running = count()
            if n_finished < self.n_trials <= n_finished + n_running:
                # Only here can a dead worker's RUNNING trial change the answer.
                _fail_stale_trials(self.study)
                n_finished, n_running = count()
        except BaseException:
            self.release()
            raise
        if n_finished >= self.n_trials or n_finished + n_running >= self.n_trials:
            self.release()
            return "done" if n_finished >= self.n_trials else "wait"
        return "run"

    def _acquire(self) -> None:
        if self._path is None or self._file is not None:
            return
        import fcntl

        self._file = self._path.open("a")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        """Let other workers claim; safe to call when nothing is held."""
        if self._file is None:
            return
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _fail_stale_trials(study: optuna.Study) -> None:
    """FAIL the RUNNING trials whose heartbeat stopped (a no-op without heartbeat)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental API
        optuna.storages.fail_stale_trials(study)


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    budget: TrialBudget,
    *,
    timeout: float | None = None,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    catch: tuple[type[Exception], ...] = (),
    poll_seconds: float = 1.0,
    on_trial_end: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> int:
    """Run trials until the budget is full (or ``timeout`` seconds pass); return how many ran.

    Trials that fail with an exception in ``catch`` (e.g. out of memory) free their slot and the
    loop goes on; after ``MAX_FAILED_IN_A_ROW`` such failures in a row it stops.

    Raises:
        TunerError: too many failed trials in a row; the message has the last reason.
    """
    from optuna.trial import TrialState

    deadline = None if timeout is None else time.monotonic() + timeout
    n_run = failed_in_a_row = 0
    waited = False
    started: list[optuna.Trial] = []

    def claimed(trial: optuna.Trial) -> float:
        budget.release()  # the trial exists now: other workers count it as RUNNING
        started.append(trial)
        return objective(trial)

    while deadline is None or time.monotonic() < deadline:
        interrupts.check()
        state = budget.claim()
        if state == "done":
            break
        if state == "wait":
            if not waited:
                warnings.warn(
                    "the last trial slots are held by running trials of other workers; waiting for them "
                    "(a dead worker's trial is failed once its heartbeat is older than the grace period)",
                    stacklevel=2,
                )
                waited = True
            time.sleep(poll_seconds)
            continue
        started.clear()
        trial: optuna.trial.FrozenTrial | None = None
        try:
            # The callbacks are called below, not by optimize: it would read the told trial back
            # from the storage for them, and the study's trial list reads it anyway.
            study.optimize(claimed, n_trials=1, catch=catch, gc_after_trial=False)
        except ValueError:
            # "Cannot tell a FAIL trial": another worker judged this live trial stale (its heartbeat
            # was late, e.g. on an overloaded machine) and failed it; Optuna queued a retry. The
            # trial stays FAIL and the launch goes on; on_trial_end realigns its MLflow run.
            stolen = study._storage.get_trial(started[-1]._trial_id) if started else None
            if stolen is None or stolen.state != TrialState.FAIL:
                raise
            trial = stolen
        else:
            trial = _told_trial(study, started[-1]) if started else None
            for callback in callbacks:
                callback(study, copy.deepcopy(trial))  # type: ignore[arg-type]
        finally:
            budget.release()
        n_run += 1
        interrupts.check()
        if on_trial_end is not None and trial is not None:
            on_trial_end(trial)
        if trial is not None and trial.state == TrialState.FAIL:
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                reason = trial.user_attrs.get("fail_reason") or trial.system_attrs.get("fail_reason", "unknown")
                raise TunerError(
                    f"{failed_in_a_row} trials in a row failed (last, trial {trial.number}: {reason}); "
                    "fix the cause (e.g. a smaller batch_size/hidden_size range) and relaunch"
                )
        else:
            failed_in_a_row = 0
    return n_run


def _told_trial(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as told, from the study's trial list: the storage cache re-reads only unfinished
    and new trials, so the next budget claim finds it there instead of reading it again."""
    return next(t for t in reversed(study.get_trials(deepcopy=False)) if t.number == trial.number)


# -- data ------------------------------------------------------------------------------------


def load_data(spec: StudySpec) -> tuple[Prepared, pd.DataFrame]:
    """The study's table, validated, split and encoded; also its rows with a target (for input examples)."""
    from tuner.data import load_study_data

    return load_study_data(spec)


def load_inputs(spec: StudySpec) -> tuple[Prepared, pd.DataFrame, CVData]:
    """Everything a launch or a worker trains on: the split, the raw frame and the CV folds,
    with the batch sizes checked against the training rows."""
    from tuner.validation import load_folds

    prepared, frame = load_data(spec)
    cv = load_folds(spec, frame)
    _check_batch_sizes(spec, len(cv.folds[0].x_train) if cv.folds else len(prepared.x_train))
    return prepared, frame, cv


def _check_batch_sizes(spec: StudySpec, n_train: int) -> None:
    p = spec.space["batch_size"]
    largest = getattr(p, "high", None) or max(getattr(p, "choices", None) or [getattr(p, "value", 0)])
    if largest > n_train:
        warnings.warn(
            f"batch sizes up to {largest} exceed the {n_train} training rows; those trials use "
            f"full batches of {n_train}",
            stacklevel=2,
        )


# -- objective -------------------------------------------------------------------------------


@dataclass
class Objective:
    """trial -> params -> ``train()`` -> value; each epoch reported, pruning through the hook."""

    spec: StudySpec
    data: Prepared
    tracker: Tracker | None
    parent_run_id: str | None
    device: Any
    train_seconds: list[float] = field(default_factory=list)
    cv: CVData | None = None  # cross-validation folds; None: train on ``data``'s one split
    provenance: dict[str, Any] = field(default_factory=dict)  # versions, device, data hash

    def __call__(self, trial: optuna.Trial) -> float:
        from tuner import interrupts
        from tuner.train import train
        from tuner.validation import cross_validate

        params, seed, run_id = self.begin(trial)
        metric = self.spec.metric
        every = self.spec.report_every
        prunes = self.spec.pruner.name != "none"
        final_epoch = int(params["epochs"]) - 1
        reported: list[int] = []  # the epochs in Optuna, and the metric rows MLflow gets
        judge = _Pruning(trial)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> bool:
            interrupts.check()  # a Ctrl-C that landed in a callback and was swallowed ends here
            on_grid = epoch % every == 0
            if not on_grid and epoch != final_epoch:  # off the shared grid: no storage round trip
                return False
            trial.report(metrics[metric], epoch)
            reported.append(epoch)
            # The last epoch is reported for the curve, not judged: training is over anyway.
            return on_grid and prunes and judge.should_prune()

        result: TrainResult | CVResult
        try:
            if self.cv is not None and self.cv.folds:
                result = cross_validate(params, self.cv.folds, device=self.device, seed=seed, on_epoch_end=on_epoch_end)
            else:
                result = train(params, self.data, device=self.device, seed=seed, on_epoch_end=on_epoch_end)
        except BaseException as e:
            trial.set_user_attr("fail_reason", fail_reason(e))
            self.abort(params, run_id, e)
            raise
        self.train_seconds.append(result.seconds)
        return self.finish(trial, params, seed, run_id, result, reported)

    def begin(self, trial: optuna.Trial) -> tuple[dict[str, Any], int, str | None]:
        """Sample the trial's params, fix its seed, open its MLflow run: ``(params, seed, run_id)``."""
        from tuner.space import sample

        params = sample(trial, self.spec.space)
        seed = self.spec.seed + trial.number
        # What reproduces the trial, in one attribute (each one is a storage write): the launch's
        # record, the seed and the folds' seeds (older studies: separate seed/fold_seeds attributes).
        record: dict[str, Any] = {**self.provenance, "seed": seed}
        if self.cv is not None and self.cv.folds:
            from tuner.validation import fold_seeds

            record["fold_seeds"] = fold_seeds(seed, len(self.cv.folds))
        trial.set_user_attr("provenance", record)
        run_id = None
        if self.tracker is not None:
            run_id = self.tracker.start_trial(self.parent_run_id, self.spec.name, trial.number)
            trial.set_user_attr("mlflow_run_id", run_id)
        return params, seed, run_id

    def abort(self, params: dict[str, Any], run_id: str | None, e: BaseException) -> None:
        """Close the run of a trial that raised: Ctrl-C / SIGTERM KILLED, anything else FAILED.
        Optuna marks the trial FAIL."""
        status: RunStatus = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        if self.tracker is not None and run_id is not None:
            tags = {"tuner.error": repr(e)[:500], "tuner.fail_reason": fail_reason(e)}
            self.tracker.end_trial(run_id, status=status, params=params, tags=tags)

    def finish(
        self,
        trial: optuna.Trial,
        params: dict[str, Any],
        seed: int,
        run_id: str | None,
        result: TrainResult | CVResult,
        reported: list[int] | None = None,
    ) -> float:
        """Log the trained trial and return its value; raise TrialPruned if it stopped early.

        ``reported``: the epochs that went to Optuna (MLflow gets the same rows); None: all.
        """
        import optuna

        from tuner.model import Checkpoint
        from tuner.validation import CVResult

        metric = self.spec.metric
        tags = {"tuner.state": "COMPLETE", "tuner.seed": str(seed), **{f"tuner.{k}": str(v) for k, v in self.provenance.items()}}
        fold_metrics: dict[str, float] = {}
        if isinstance(result, CVResult):  # cross-validated: every fold's metric, for the spread
            tags["tuner.fold_seeds"] = ",".join(map(str, result.seeds))
            trial.set_user_attr(f"fold_{metric}", [m.get(metric) for m in result.fold_metrics])
            fold_metrics = {f"fold{i}_{k}": v for i, m in enumerate(result.fold_metrics) for k, v in m.items()}
        if reported is None:
            reported = list(range(len(result.history)))
        if result.diverged or result.stop_reason:
            pruned = True
            reason = result.stop_reason or "pruned"
            trial.set_user_attr("stop_reason", reason)
            tags = {**tags, "tuner.state": "PRUNED", "tuner.stop_reason": reason}
        else:
            pruned = False
        if self.tracker is not None and run_id is not None:
            checkpoint = None
            if not pruned and result.model is not None:  # cross-validated: the champion is refit later
                checkpoint = Checkpoint(result.model.config, {k: v.cpu() for k, v in result.model.state_dict().items()})
            self.tracker.end_trial(
                run_id,
                status="KILLED" if pruned else "FINISHED",
                params=params,
                history={e: result.history[e] for e in reported if e < len(result.history)},
                metrics={**result.metrics, **fold_metrics},
                tags=tags,
                checkpoint=checkpoint,
            )
        if pruned:
            # Diverged trials are PRUNED after their last finite report: the sampler learns
            # from them, and they can never become COMPLETE with an infinite value.
            raise optuna.TrialPruned(result.stop_reason)
        for k, v in result.metrics.items():
            trial.set_user_attr(k, v)
        value = result.metrics[metric]
        if not math.isfinite(value):  # pragma: no cover - train() stops before this
            raise optuna.TrialPruned(f"non-finite {metric}")
        return value


class _Pruning:
    """``trial.should_prune()`` against the finished trials the sampler read for this trial
    (the study's per-trial cache, filled once after ``ask``): see ``tuner.pruning``."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self._view: FinishedTrials | None = None

    def should_prune(self) -> bool:
        study = self.trial.study
        if not fast_pruning(study):
            return self.trial.should_prune()
        if self._view is None:
            self._view = FinishedTrials(study, study._get_trials(deepcopy=False, use_cache=True))
        return self._view.prune(self.trial)


def fail_reason(e: BaseException) -> str:
    """One line on why a trial failed, with the fix where there is one."""
    import torch

    first = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"out of memory on the device ({first}); lower the batch_size or hidden_size range"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM); relaunch to continue the study"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# -- launch ----------------------------------------------------------------------------------


@dataclass
class LaunchSummary:
    study_name: str
    storage: str
    n_finished: int
    n_trials: int
    n_run: int
    best_number: int | None
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    promotion: Promotion | None
    parent_run_id: str | None
    wall_seconds: float
    train_seconds: float
    task: str = "regression"
    task_note: str | None = None  # why the task was inferred; None: set in the study file
    validation: str = ""  # the validation scheme in words
    verdict: str = ""  # tuned model vs the best baseline, in words
    beats_baselines: bool = True


def launch(
    spec: StudySpec,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    allow_space_change: bool = False,
    device: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    promote: bool = True,
    report: bool = True,
) -> LaunchSummary:
    """Run the study until it holds ``n_trials`` finished (complete + pruned) trials, log every
    trial to MLflow, and register the best trial's model.

    Raises:
        TunerError: bad study file, data, storage or tracking store (before any trial runs).
        KeyboardInterrupt: Ctrl-C or SIGTERM; the running trial is FAIL, its run KILLED.
    """
    import optuna
    import torch

    from tuner.baselines import baselines, cv_baselines, verdict
    from tuner.progress import Progress
    from tuner.replay import provenance
    from tuner.tracking import Tracker
    from tuner.train import resolve_device

    started = time.perf_counter()
    total = spec.n_trials if n_trials is None else n_trials  # --n-trials 0 is refused, not ignored
    if total <= 0:
        raise TunerError(f"n_trials must be > 0 (got {total})")
    try:
        dev = resolve_device(device or spec.device)
    except ValueError as e:
        raise TunerError(str(e)) from None
    # Everything that can be wrong is checked before the study or a run is written.
    # Trial results reach the user through the progress line and summary; Optuna's own failure
    # log would print a traceback for every Ctrl-C. Per-trial lines (-v) come from tuner.progress.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prepared, frame, cv = load_inputs(spec)
    make_sampler(spec), make_pruner(spec)  # unknown options refused before anything is written
    url = storage or spec.storage_url
    check_storage_url(url)
    with study_lock(url):  # workers started together: one creates the schemas and the study
        tracker = Tracker(tracking_uri or spec.tracking, spec.name)
        study = open_study(spec, storage, allow_space_change=allow_space_change)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny models: a second thread doubles CPU time for no speed-up
    reference = cv_baselines(cv.folds) if cv.folds else baselines(prepared)  # still on the CPU here
    prepared = prepared.to(dev)  # once per launch, not per trial
    if cv.folds:
        cv = replace(cv, folds=[f.to(dev) for f in cv.folds])
    before = study.user_attrs.get("validation")
    if before is not None and before != cv.plan.describe() and study.trials:
        warnings.warn(
            f"study {spec.name!r} was validated with {before}; its earlier trials do not compare with "
            f"{cv.plan.describe()}: use a new study name for a fair comparison",
            stacklevel=2,
        )
    print(prepared.columns, file=sys.stderr, flush=True)  # the column roles, decided once
    for key, value in {"baselines": reference, "validation": cv.plan.describe(), "task": spec.task,
                       "columns": prepared.columns}.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)

    from tuner.reconcile import reconcile_study

    reconcile_study(study, tracker, spec)  # leftovers of a crashed launch: stale trials, orphaned runs
    remaining = total - finished_count(study)
    if remaining > 0:
        from tuner.fused_runner import choose_execution, run_fused

        # Cross-validated trials fuse too: each fold of each trial in flight is one slot.
        execution, why = choose_execution(spec, cv.folds[0] if cv.folds else prepared, dev, remaining)
        print(f"execution: {execution} ({why})", file=sys.stderr, flush=True)
    parent_run_id = None
    objective = Objective(spec, prepared, tracker, None, dev, cv=cv, provenance=provenance(spec, dev, cv.plan))
    n_run = 0
    if remaining > 0:
        parent_run_id = tracker.start_parent(
            spec.name,
            {"tuner.storage": redact_url(url), "tuner.space_hash": spec.space_hash(), **_process_tags()},
        )
        objective.parent_run_id = parent_run_id
        bar = Progress(total, n_done_before=total - remaining, verbose=verbose) if progress else None
        try:
            if execution == "fused":  # run_fused keeps its own trial budget
                n_before = len(study.trials)
                fused_callbacks: list[Any] = [bar] if bar else []
                try:
                    run_fused(
                        study, objective, n_trials=remaining, total=total, timeout=spec.timeout, callbacks=fused_callbacks
                    )
                except torch.cuda.OutOfMemoryError as e:
                    # K trials at once did not fit: the ones in flight were told FAIL (runs closed);
                    # the rest of the budget runs one trial at a time, as sequential mode would.
                    print(
                        f"execution: fused ran out of device memory ({fail_reason(e).split(';')[0]}); "
                        "the trials in flight failed, the rest run sequentially",
                        file=sys.stderr,
                        flush=True,
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    execution = "sequential"
                n_run = len(study.trials) - n_before
            if execution != "fused":
                n_run += run_trials(
                    study,
                    objective,
                    TrialBudget(study, total, url),
                    timeout=spec.timeout,
                    callbacks=[bar] if bar else [],
                    # Out of memory fails the trial, not the launch: the next trial may fit.
                    catch=(torch.cuda.OutOfMemoryError,),
                    poll_seconds=min(1.0, spec.heartbeat.interval),
                    on_trial_end=lambda t: (
                        _after_failed_trial(dev, study, tracker, spec) if t.state.name == "FAIL" else None
                    ),
                )
        except KeyboardInterrupt:
            tracker.end_run(parent_run_id, "KILLED")
            raise
        except Exception:
            tracker.end_run(parent_run_id, "FAILED")
            raise
        finally:
            if bar:
                bar.close()
    promotion = None
    best = _best_trial(study)
    if promote and best is not None:
        try:
            with study_lock(url):  # two workers finishing together register the best trial once
                promotion = promote_best(spec, study, tracker, frame, prepared.feature_names, cv, dev)
        except BaseException:
            if parent_run_id is not None:
                tracker.end_run(parent_run_id, "FAILED")
            raise
    if parent_run_id is not None:
        from tuner.lineage import study_url, write_launch_notes
        from tuner.report import log_launch_report

        # Lineage and report in one pass after the trials: no per-trial cost.
        write_launch_notes(study, parent_run_id, spec=spec, tracker=tracker, promotion=promotion)
        if report:
            log_launch_report(study, spec, tracker, parent_run_id, prepared=prepared, frame=frame, baselines=reference)
        tags = {"tuner.best_trial": str(best.number)} if best is not None else {}
        tags["tuner.dashboard_url"] = study_url(study)
        tracker.end_run(parent_run_id, "FINISHED", tags)
    return LaunchSummary(
        study_name=spec.name,
        storage=redact_url(url),
        n_finished=finished_count(study),
        n_trials=total,
        n_run=n_run,
        best_number=best.number if best else None,
        best_params=dict(best.params) if best else {},
        best_metrics={k: v for k, v in best.user_attrs.items() if isinstance(v, float)} if best else {},
        baselines=reference,
        promotion=promotion,
        parent_run_id=parent_run_id,
        wall_seconds=time.perf_counter() - started,
        train_seconds=sum(objective.train_seconds),
        task=spec.task,
        task_note=spec.task_note,
        validation=cv.plan.describe(),
        **_verdict(spec, best, reference, verdict),
    )


def _process_tags() -> dict[str, str]:
    """Who runs a launch: lets `tuner reconcile` tell a dead launch's run from a live one."""
    import socket

    return {"tuner.host": socket.gethostname(), "tuner.pid": str(os.getpid())}


def _after_failed_trial(device: Any, study: optuna.Study, tracker: Tracker, spec: StudySpec) -> None:
    from tuner.reconcile import reconcile_study

    _free_device_memory(device)
    reconcile_study(study, tracker, spec)  # e.g. a run FINISHED for a trial another worker failed


def _free_device_memory(device: Any) -> None:
    """After a failed trial (e.g. out of memory): drop its tensors and return cached blocks."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def _verdict(spec: StudySpec, best: Any, reference: dict[str, Any], verdict: Callable[..., Any]) -> dict[str, Any]:
    if best is None:
        return {}
    beats, text = verdict(spec.metric, spec.study_direction, float(best.value), reference)
    return {"verdict": text, "beats_baselines": beats}


def promote_best(
    spec: StudySpec,
    study: optuna.Study,
    tracker: Tracker,
    frame: pd.DataFrame,
    feature_names: list[str],
    cv: CVData,
    device: Any,
) -> Promotion | None:
    """Register the best trial's model (refit on all rows first if it was cross-validated) and
    move ``champion`` if it beats the current one. The one promotion path of launches and workers."""
    best = _best_trial(study)
    if best is None:
        return None
    if cv.all_rows is not None and not tracker.has_checkpoint(best.user_attrs["mlflow_run_id"]):
        _refit_champion(best, cv, tracker, device)
    return tracker.promote(
        model_name=spec.model_name,
        run_id=best.user_attrs["mlflow_run_id"],
        study_name=spec.name,
        trial_number=best.number,
        metric=spec.metric,
        value=float(best.value),  # type: ignore[arg-type]
        direction=spec.study_direction,
        space_hash=spec.space_hash(),
        # Raw rows: promote takes the model's input columns, typed for its signature.
        input_example=frame.head(5),
    )


def _refit_champion(best: optuna.trial.FrozenTrial, cv: CVData, tracker: Tracker, device: Any) -> None:
    """A cross-validated trial has no single model: train its params on all rows through
    ``train()`` and store the weights in the trial's run, where promotion looks for them."""
    from tuner.model import Checkpoint
    from tuner.replay import trial_seed
    from tuner.validation import refit

    result = refit(best.params, cv, device=device, seed=trial_seed(best, 0))
    state = {k: v.cpu() for k, v in result.model.state_dict().items()}
    run_id = best.user_attrs["mlflow_run_id"]
    tracker.save_checkpoint(run_id, Checkpoint(result.model.config, state))
    tracker.end_run(run_id, "FINISHED", {"tuner.refit": f"all {len(cv.all_rows.x_train) if cv.all_rows else 0} rows"})


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def best_info(spec: StudySpec, *, storage: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """The best trial of a stored study with its MLflow run and the registered champion."""
    from tuner.tracking import Tracker

    study = open_study(spec, storage, create=False)
    best = _best_trial(study)
    if best is None:
        raise TunerError(f"study {spec.name!r} has no complete trial yet; run `tuner launch` first")
    tracker = Tracker(tracking_uri or spec.tracking, spec.name)
    champion = tracker.champion(spec.model_name)
    info: dict[str, Any] = {
        "study": spec.name,
        "storage": redact_url(storage or spec.storage_url),
        "n_finished": finished_count(study),
        "best_trial": best.number,
        "value": best.value,
        "metric": spec.metric,
        "params": dict(best.params),
        "metrics": {k: v for k, v in best.user_attrs.items() if isinstance(v, float)},
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "validation": study.user_attrs.get("validation"),
        "columns": study.user_attrs.get("columns"),
        "baselines": study.user_attrs.get("baselines", {}),
    }
    if info["baselines"]:
        from tuner.baselines import verdict

        info["beats_baselines"], info["verdict"] = verdict(
            spec.metric, spec.study_direction, float(best.value), info["baselines"]  # type: ignore[arg-type]
        )
    if champion is not None:
        info["champion"] = {
            "model_uri": f"models:/{spec.model_name}@champion",
            "version": champion.version,
            "trial": champion.tags.get("tuner.trial"),
            "value": champion.tags.get("tuner.value"),
        }
    from tuner.lineage import best_links

    info.update(best_links(study, best, spec=spec, tracker=tracker))
    return info

