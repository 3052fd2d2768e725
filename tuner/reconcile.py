"""Reconcile a study's Optuna trials with their MLflow runs and the registry after a crash.

Optuna's trial state is the truth; MLflow follows it. A trial's run is finished *before* the
trial is told (so a COMPLETE trial always has its weights), which leaves these crash leftovers:

- a trial whose worker died stays RUNNING until its heartbeat is stale: it becomes FAIL (and a
  retry with the same params is queued) -- Optuna's own ``fail_stale_trials``;
- its run is RUNNING (died mid-trial) or FINISHED (died between the run's end and the tell):
  it becomes FAILED, so no FINISHED run points at a trial that is not COMPLETE;
- a COMPLETE trial's run left RUNNING (died while the model was logged at promotion): FINISHED
  when its weights are there;
- the launch (parent) run of a dead process on this host: FAILED;
- a ``champion`` alias on a version whose trial is not COMPLETE: moved to the best version whose
  trial is, or removed.

``tuner launch`` runs this before its first trial; ``tuner reconcile STUDY`` runs it alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.tracking import Tracker

__all__ = ["ReconcileReport", "reconcile_study", "reconcile", "expected_run_status"]

_RECONCILED = "tuner.reconciled"


@dataclass
class ReconcileReport:
    """What one reconciliation changed (empty lists: everything was consistent)."""

    study_name: str
    stale_trials: list[int] = field(default_factory=list)  # RUNNING -> FAIL (heartbeat stopped)
    runs: list[tuple[int, str, str, str]] = field(default_factory=list)  # (trial, run_id, old, new)
    launch_runs: list[str] = field(default_factory=list)  # parent runs of dead processes -> FAILED
    champion: str | None = None  # what happened to the champion alias, if anything
    problems: list[str] = field(default_factory=list)  # inconsistencies it could not repair

    @property
    def changed(self) -> bool:
        return bool(self.stale_trials or self.runs or self.launch_runs or self.champion)


def expected_run_status(trial_state: str, run_status: str) -> str:
    """The MLflow run status that matches an Optuna trial state (``run_status`` if it already does).

    COMPLETE -> FINISHED; PRUNED -> KILLED (stopped early); FAIL -> FAILED, or KILLED when the
    trial was interrupted (Ctrl-C/SIGTERM); RUNNING/WAITING -> unchanged.
    """
    if trial_state == "COMPLETE":
        return "FINISHED"
    if trial_state == "PRUNED":
        return "KILLED"
    if trial_state == "FAIL":
        return run_status if run_status in ("FAILED", "KILLED") else "FAILED"
    return run_status


def reconcile_study(study: optuna.Study, tracker: Tracker, spec: StudySpec) -> ReconcileReport:
    """Bring the MLflow runs and the champion alias of one study in line with its trials."""
    from optuna.trial import TrialState

    from tuner.study import fail_stale_trials

    report = ReconcileReport(spec.name)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if running:
        report.stale_trials = sorted(fail_stale_trials(study))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}

    for run in tracker.trial_runs(spec.name):
        try:
            trial = trials[int(run.data.tags.get("tuner.trial", ""))]
        except (KeyError, ValueError):
            continue  # a run of another storage that holds a study of the same name
        if trial.user_attrs.get("mlflow_run_id", run.info.run_id) != run.info.run_id:
            continue
        old = run.info.status
        new = expected_run_status(trial.state.name, old)
        if new == old:
            continue
        if new == "FINISHED" and not tracker.has_checkpoint(run.info.run_id):
            report.problems.append(f"trial {trial.number} is COMPLETE but its run {run.info.run_id} has no weights")
            continue
        reason = f"trial {trial.number} is {trial.state.name} in Optuna; run was {old}"
        tracker.end_run(run.info.run_id, new, {_RECONCILED: reason})  # type: ignore[arg-type]
        report.runs.append((trial.number, run.info.run_id, old, new))

    for run in tracker.running_launch_runs(spec.name):
        tags = run.data.tags
        if tags.get("tuner.host") == socket.gethostname() and not _alive(tags.get("tuner.pid")):
            tracker.end_run(run.info.run_id, "FAILED", {_RECONCILED: f"launch process {tags.get('tuner.pid')} is gone"})
            report.launch_runs.append(run.info.run_id)

    report.champion = _check_champion(tracker, spec, trials)
    return report


def _alive(pid: str | None) -> bool:
    """Whether a process of this host is running (a zombie, killed but not yet reaped, is not)."""
    try:
        n = int(pid or "")
    except ValueError:
        return True  # unknown: leave the run alone
    if n == os.getpid():
        return True
    try:
        os.kill(n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{n}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _check_champion(tracker: Tracker, spec: StudySpec, trials: dict[int, Any]) -> str | None:
    from optuna.trial import TrialState

    def complete(version: Any) -> bool:
        if version.tags.get("tuner.study") != spec.name:
            return True  # registered from another study: not ours to judge
        trial = trials.get(int(version.tags.get("tuner.trial", "-1")))
        return trial is not None and trial.state == TrialState.COMPLETE

    champion = tracker.champion(spec.model_name)
    if champion is None or complete(champion):
        return None
    candidates = [v for v in tracker.model_versions(spec.model_name) if v.tags.get("tuner.value") and complete(v)]
    sign = 1.0 if spec.study_direction == "minimize" else -1.0
    best = min(candidates, key=lambda v: sign * float(v.tags["tuner.value"]), default=None)
    tracker.set_alias(spec.model_name, "champion", best.version if best is not None else None)
    if best is None:
        return f"champion alias removed from version {champion.version} (its trial is not COMPLETE)"
    return f"champion moved from version {champion.version} to {best.version} (trial not COMPLETE)"


def reconcile(spec: StudySpec, *, storage: str | None = None, tracking_uri: str | None = None) -> ReconcileReport:
    """Open a stored study and its MLflow experiment and reconcile them (``tuner reconcile``).

    Raises:
        StorageError: the study does not exist in the storage.
        TrackingError: the MLflow store cannot be opened.
    """
    from tuner.study import open_study
    from tuner.tracking import Tracker

    study = open_study(spec, storage, create=False)
    tracker = Tracker(tracking_uri or spec.tracking, spec.name)
    return reconcile_study(study, tracker, spec)
