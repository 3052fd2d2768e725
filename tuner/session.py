"""The one launch: prepare -> reconcile -> choose -> run -> promote -> finish.

``tuner launch``, ``tuner launch --workers N`` and ``tuner worker`` all run ``launch``; they differ
in one step only. A launch runs its trials in this process (sequential or fused, through the
``TrialGate``); ``--workers N`` hands the run step to a pool of ``tuner worker`` processes
(``tuner.workers``) and watches them; a worker (``role="worker"``) joins the study's launch run
and promotes only if it is the one that sees the study finished.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from tuner.config import StudySpec
from tuner.errors import StorageError, TrackingError, TunerError, redact_url
from tuner.lock import StudyLock
from tuner.selection import best_trial
from tuner.study import caused_by_storage, finished_count, reseed_sampler, storage_problem
from tuner.workers import LAUNCH_PID_ENV, N_WORKERS_ENV, PARENT_RUN_ENV, WORKER_INDEX_ENV

if TYPE_CHECKING:
    import optuna

    from tuner.inputs import Inputs
    from tuner.registry import Promotion
    from tuner.tracking import Tracker

__all__ = ["launch", "LaunchSummary", "PARENT_ATTR"]

PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the launch run that workers join


@dataclass
class LaunchSummary:
    study_name: str
    storage: str
    n_finished: int
    n_trials: int
    n_run: int  # trials this launch (or worker) ran, any end state
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
    execution: str = ""  # what ran, and why
    note: str | None = None  # e.g. why nothing ran
    # The honest estimate (validation.test_fraction): the champion's and the baselines' metrics on
    # the untouched test part (baselines fitted on every dev row); the verdict is then taken there.
    test_metrics: dict[str, float] | None = None
    test_rows: int = 0
    metric: str = ""
    test_baselines: dict[str, dict[str, float]] | None = None
    warm_start: list[str] | None = None  # what was enqueued, one line each


def launch(
    spec: StudySpec,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    allow_space_change: bool = False,
    allow_data_change: bool = False,
    device: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    promote: bool = True,
    report: bool = True,
    workers: int | None = None,
    gpus: Sequence[str] = (),
    role: Literal["launch", "worker"] = "launch",
    worker_index: int | None = None,
    warm_start: str | None = None,
) -> LaunchSummary:
    """Run the study until it holds ``n_trials`` finished (complete + pruned) trials, log every
    trial to MLflow, and register the best trial's model.

    Raises:
        TunerError: bad study file, data, storage or tracking store (before any trial runs), a
            store that fails during the launch, or too many failed trials in a row.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the trials in flight are FAIL, their runs KILLED.
    """
    import optuna

    from tuner.baselines import baselines, cv_baselines
    from tuner.inputs import load_inputs
    from tuner.reconcile import reconcile_study
    from tuner.replay import file_sha256, provenance
    from tuner.runners import choose_execution, fused_width
    from tuner.study import check_storage_url, make_pruner, make_sampler, open_study
    from tuner.tracking import Tracker, import_mlflow
    from tuner.warmstart import enqueue_known

    # -- prepare: everything that can be wrong is checked before the study or a run is written
    started = time.perf_counter()
    total = spec.n_trials if n_trials is None else n_trials  # --n-trials 0 is refused, not ignored
    if total <= 0:
        raise TunerError(f"n_trials must be > 0 (got {total})")
    pool = workers is not None or bool(gpus)
    n_workers = workers if workers is not None else (len(gpus) or 1)
    if pool and n_workers < 1:
        raise TunerError(f"--workers must be >= 1 (got {n_workers})")
    index = worker_index if worker_index is not None else _env_int(WORKER_INDEX_ENV, "0..N-1")
    # the processes sharing the trials: each fuses a share (a pool says how many it started)
    n_sharing = n_workers if pool else _env_int(N_WORKERS_ENV, "the number of workers")
    if n_sharing is None:
        n_sharing = 1
    elif n_sharing < 1:
        raise TunerError(f"{N_WORKERS_ENV}={n_sharing} must be >= 1: set it to the number of workers or unset it")
    if pool and spec.source is None:
        raise TunerError("launching workers needs a study file (the spec has no source path)")
    dev = _device(device or spec.device, gpus)
    # Trial results reach the user through the progress line and summary; Optuna's own failure
    # log would print a traceback for every Ctrl-C.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    inputs = load_inputs(spec)
    make_sampler(spec), make_pruner(spec)  # unknown options refused before anything is written
    url = storage or spec.storage_url
    tracking = tracking_uri or spec.tracking
    check_storage_url(url)  # a missing or read-only folder, before the MLflow store is made
    lock = StudyLock(url, spec.name)
    with lock:  # an unreachable database fails fast, before MLflow is touched
        pass
    import_mlflow()  # outside the lock: seconds of imports that other processes need not queue for
    with lock:  # processes started together: one creates the schemas and the study
        tracker = Tracker(tracking, spec.name)
        seed = _worker_seed(spec, index) if role == "worker" else None
        study = open_study(spec, url, allow_space_change=allow_space_change, data_sha256=file_sha256(spec.data),
                           allow_data_change=allow_data_change, sampler_seed=seed)
        warm = enqueue_known(study, spec, warm_start, url)  # [[enqueue]] and --warm-start-from, once
    for line in warm:
        print(line, file=sys.stderr, flush=True)
    reference = cv_baselines(inputs.cv.folds) if inputs.cv.folds else baselines(inputs.prepared)  # on the CPU
    test_reference = baselines(inputs.test.prepared) if inputs.test is not None else None
    if dev.type == "cpu":
        import torch

        torch.set_num_threads(1)  # tiny models: a second thread doubles CPU time for no speed-up
    inputs = inputs.to(dev)
    _record_study_attrs(study, spec, inputs, reference, test_reference)

    # -- reconcile: leftovers of a crashed launch (stale trials, their runs, dead launch runs)
    _end_runs_of_lost_trials(study, tracker)
    reconcile_study(study, tracker, spec)
    remaining = total - finished_count(study)

    # -- choose: sequential or fused, by rule (the same study always runs the same way)
    execution, why = choose_execution(spec, inputs.train_part, dev, max(remaining, 0), max(len(inputs.cv.folds), 1),
                                      n_sharing)
    if remaining > 0 and role == "launch":
        where = f" in each of {n_workers} workers" if pool else ""
        print(f"execution: {execution}{where} ({why})", file=sys.stderr, flush=True)

    # -- run: through the gate in this process, or by a pool of workers
    parent_run_id: str | None = None
    n_run = 0
    train_seconds = 0.0
    note = None
    if remaining <= 0:
        held = finished_count(study)
        note = (
            f"study {spec.name!r} already holds {held} finished trials (n_trials is {total}): nothing to run; "
            f"pass --n-trials {held + 5} (or more) to run more"
        )
    else:
        with lock:
            parent_run_id = _parent_run(study, tracker, spec, url, role, n_workers if pool else None)
        try:
            if pool:
                from tuner.workers import run_pool

                n_before = len(study.trials)
                run_pool(spec, study, n_workers=n_workers, gpus=gpus, total=total, url=url, tracking=tracking,
                         parent_run_id=parent_run_id, device=device or spec.device, progress=progress, verbose=verbose)
                n_run = len(study.get_trials(deepcopy=False)) - n_before
            else:
                n_run, train_seconds, execution = _run_here(
                    spec, study, tracker, inputs, lock, parent_run_id, dev, execution,
                    provenance={**provenance(spec, dev, inputs.cv.plan), "execution": execution},
                    total=total, url=url, progress=progress, verbose=verbose, role=role,
                    width=fused_width(remaining, n_sharing),
                )
        except BaseException as e:
            if role == "launch":  # a worker shares the launch run with others: the launch ends it
                _end_parent_quietly(tracker, parent_run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            if _is_store_failure(e):
                raise _as_tuner_error(e, url, tracking) from None
            raise

    # -- promote: once, under the lock, by whoever sees the study finished
    promotion = None
    finished = finished_count(study) >= total
    if promote and (role == "launch" or finished):
        from tuner.promotion import promote as promote_best

        try:
            promotion = promote_best(spec, study, tracker, inputs, lock, dev)
        except BaseException as e:
            if role == "launch":
                _end_parent_quietly(tracker, parent_run_id, "FAILED")
            if _is_store_failure(e):
                raise _as_tuner_error(e, url, tracking) from None
            raise

    # -- finish: notes, report and the end of the launch run (a worker leaves it to the launch)
    best = best_trial(study)
    if parent_run_id is not None and (role == "launch" or (promote and finished)):
        _finish_parent(study, spec, tracker, parent_run_id, promotion, inputs, reference, report, lock)
    lock.close()
    summary = LaunchSummary(
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
        train_seconds=train_seconds,
        task=spec.task,
        task_note=spec.task_note,
        validation=inputs.cv.plan.describe(),
        execution=f"{execution} ({why})",
        note=note,
        test_baselines=test_reference,
        metric=spec.metric,
        warm_start=warm or None,
    )
    if best is not None:
        from tuner.promotion import champion_verdict

        test, summary.beats_baselines, summary.verdict = champion_verdict(
            spec, study, best, summary.best_metrics, reference, test_reference
        )
        if test is not None and test_reference is not None:
            summary.test_metrics, summary.test_rows = test["metrics"], int(test.get("rows", 0))
    return summary


def _run_here(
    spec: StudySpec,
    study: optuna.Study,
    tracker: Tracker,
    inputs: Inputs,
    lock: StudyLock,
    parent_run_id: str | None,
    dev: Any,
    execution: str,
    *,
    provenance: dict[str, Any],
    total: int,
    url: str,
    progress: bool,
    verbose: bool,
    role: str,
    width: int,
) -> tuple[int, float, str]:
    """The trials of this process through the gate: ``(trials run, training seconds, execution)``."""
    from tuner.gate import TrialGate
    from tuner.progress import Progress
    from tuner.runners import run_trials
    from tuner.trial import Objective

    worker = f"{socket.gethostname()}:{os.getpid()}" if role == "worker" else None
    objective = Objective(spec, inputs.prepared, tracker, parent_run_id, dev, cv=inputs.cv, provenance=provenance, worker=worker)
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    gate = TrialGate(study, total, lock, deadline=deadline, poll=min(1.0, spec.heartbeat.interval),
                     on_lost=lambda t: _end_lost_run(tracker, t),
                     # workers have seeds of their own already (_worker_seed)
                     reseed=(lambda n: reseed_sampler(study, spec, n)) if role == "launch" else None)
    bar = Progress(total, n_done_before=finished_count(study), verbose=verbose) if progress else None
    _watch_launch_process()
    try:
        execution = run_trials(gate, objective, execution, url=url, callbacks=[bar] if bar else [], width=width)
    finally:
        gate.close()
        if bar:
            bar.close()
    return gate.n_asked, sum(objective.train_seconds), execution


# -- the launch (parent) run --------------------------------------------------------------


def _parent_run(
    study: optuna.Study, tracker: Tracker, spec: StudySpec, url: str, role: str, n_workers: int | None
) -> str:
    """The launch run trial runs nest under (call under the study lock): a launch starts its own;
    a worker joins ``$TUNER_PARENT_RUN_ID`` or the study's running launch run, else starts one."""
    if role == "worker":
        joined = os.environ.get(PARENT_RUN_ENV) or study.user_attrs.get(PARENT_ATTR)
        if joined and tracker.run_status(str(joined)) == "RUNNING":
            return str(joined)
    tags = {"tuner.storage": redact_url(url), "tuner.space_hash": spec.space_hash(), **_process_tags()}
    if n_workers is not None:
        tags["tuner.workers"] = str(n_workers)
    run_id = tracker.start_parent(spec.name, tags)
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _process_tags() -> dict[str, str]:
    """Who runs a launch: lets `tuner reconcile` tell a dead launch's run from a live one."""
    return {"tuner.host": socket.gethostname(), "tuner.pid": str(os.getpid())}


def _finish_parent(
    study: optuna.Study,
    spec: StudySpec,
    tracker: Tracker,
    parent_run_id: str,
    promotion: Promotion | None,
    inputs: Inputs,
    reference: dict[str, Any],
    report: bool,
    lock: StudyLock,
) -> None:
    """Lineage notes and the report in one pass after the trials (no per-trial cost), then the
    launch run ends. Under the lock: the last two workers of a study end it once."""
    from tuner.lineage import study_url, write_launch_notes
    from tuner.report import log_launch_report

    with lock:
        if tracker.run_status(parent_run_id) != "RUNNING":
            return  # another worker finished it
        write_launch_notes(study, parent_run_id, spec=spec, tracker=tracker, promotion=promotion)
        if report:
            log_launch_report(study, spec, tracker, parent_run_id, prepared=inputs.prepared, frame=inputs.frame,
                              baselines=reference)
        best = best_trial(study)
        tags = {"tuner.best_trial": str(best.number)} if best is not None else {}
        tags["tuner.dashboard_url"] = study_url(study)
        tracker.end_run(parent_run_id, "FINISHED", tags)


def _end_parent_quietly(tracker: Tracker, run_id: str | None, status: Any) -> None:
    if run_id is None:
        return
    try:
        tracker.end_run(run_id, status)
    except Exception:
        pass  # the MLflow store is what failed: `tuner reconcile` ends the run later


# -- lost trials and their runs -----------------------------------------------------------


def _end_lost_run(tracker: Tracker, trial: optuna.trial.FrozenTrial) -> None:
    """A trial failed by a stale check (or lost with the storage) ends its MLflow run FAILED."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        old = tracker.run_status(run_id)
        if old not in (None, "FAILED"):
            reason = f"trial {trial.number} is {trial.state.name} in Optuna; run was {old}"
            tracker.end_run(run_id, "FAILED", {"tuner.reconciled": reason})
    except Exception:
        pass  # `tuner reconcile` realigns it


def _end_runs_of_lost_trials(study: optuna.Study, tracker: Tracker) -> None:
    """A stale trial this process fails from now on (in the gate, in reconcile) ends its run."""
    from tuner.study import on_stale_trial

    on_stale_trial(study, lambda t: _end_lost_run(tracker, t))


# -- helpers ------------------------------------------------------------------------------


def _record_study_attrs(
    study: optuna.Study, spec: StudySpec, inputs: Inputs, reference: dict[str, Any], test_reference: dict[str, Any] | None
) -> None:
    before = study.user_attrs.get("validation")
    plan = inputs.cv.plan.describe()
    if before is not None and before != plan and study.trials:
        warnings.warn(
            f"study {spec.name!r} was validated with {before}; its earlier trials do not compare with "
            f"{plan}: use a new study name for a fair comparison",
            stacklevel=3,
        )
    # The column roles, decided once (tuner.columns), printed and kept for `tuner best`.
    print(inputs.prepared.columns, file=sys.stderr, flush=True)
    attrs = {"baselines": reference, "validation": plan, "task": spec.task, "columns": inputs.prepared.columns,
             "test_baselines": test_reference}
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def _device(name: str, gpus: Sequence[str]) -> Any:
    import torch

    from tuner.train import resolve_device

    if gpus:  # the workers see their own GPU; this process prepares on the CPU
        return torch.device("cpu")
    try:
        return resolve_device(name)
    except ValueError as e:
        raise TunerError(str(e)) from None


def _worker_seed(spec: StudySpec, index: int | None) -> int:
    # Distinct sampler seeds: workers with one seed would sample the same startup trials.
    if index is not None:
        return (spec.seed + 7919 * (index + 1)) % 2**32  # the samplers take 0 .. 2**32 - 1
    return int.from_bytes(os.urandom(4), "little")


def _env_int(name: str, hint: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise TunerError(f"{name}={raw!r} is not a whole number; set it to {hint} or unset it") from None


def _watch_launch_process() -> None:
    """A pool worker ends (as on SIGTERM: its trials FAIL, their runs KILLED) once the launch that
    started it is gone, even if that launch was killed with -9."""
    raw = os.environ.get(LAUNCH_PID_ENV)
    if not raw or not raw.isdigit():
        return
    import signal
    import threading

    launcher = int(raw)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=watch, name="tuner-launch-watch", daemon=True).start()


def _is_store_failure(e: BaseException) -> bool:
    if not isinstance(e, Exception) or isinstance(e, TunerError):
        return False
    return caused_by_storage(e) or type(e).__name__ == "MlflowException"


def _as_tuner_error(e: BaseException, url: str, tracking: str) -> BaseException:
    """A store that failed during the launch, in one line: the study storage or the MLflow store,
    what went wrong and the fix. Finished trials stay stored either way."""
    if type(e).__name__ == "MlflowException" or "mlflow" in type(e).__module__:
        return TrackingError(
            f"MLflow store {redact_url(tracking)} failed: {storage_problem(e, tracking)}; fix it and relaunch "
            "(finished trials are kept; `tuner reconcile` realigns their runs)"
        )
    return StorageError(
        f"study storage {redact_url(url)} failed: {storage_problem(e, url)}; fix it and relaunch (finished trials are kept)"
    )
