"""One trial, whatever loop runs it: params and seed in, the epoch reporter, its MLflow run, out.

``Objective.begin`` samples the params, fixes the seed, records the provenance and opens the
MLflow run; ``EpochReporter`` is the one epoch hook (the report grid and the pruning decision);
``Objective.finish`` logs the result and returns the value (or raises ``TrialPruned``);
``Objective.abort`` closes the run of a trial that raised. The sequential loop calls all of them
through ``Objective.__call__``; the fused loop calls them one by one around ``train_many``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner import interrupts

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.pruning import FinishedTrials
    from tuner.tracking import RunStatus, Tracker
    from tuner.train import TrainResult
    from tuner.validation import CVData, CVResult

__all__ = ["Objective", "EpochReporter", "fail_reason", "is_out_of_memory"]


class EpochReporter:
    """The epoch hook of one trial: epochs 0, k, 2k, ... (``report_every``) and the last one go to
    Optuna (and become the MLflow metric rows); pruning is judged on the grid only (the last epoch
    is reported for the curve: training is over anyway). Returns True when the trial should stop.

    Pruners that judge against finished trials only (median, percentile, threshold, none) read
    the gate's view of them; the others (hyperband, successive halving) ``trial.should_prune()``.
    """

    def __init__(self, trial: optuna.Trial, spec: StudySpec, epochs: int, finished: FinishedTrials | None) -> None:
        from tuner.pruning import fast_pruning

        self.trial, self.metric, self.every = trial, spec.metric, spec.report_every
        self.final_epoch = int(epochs) - 1
        self.prunes = spec.pruner.name != "none"
        self.finished = finished if finished is not None and fast_pruning(trial.study) else None
        self.reported: list[int] = []

    def __call__(self, epoch: int, metrics: dict[str, float]) -> bool:
        interrupts.check()  # a Ctrl-C that landed in a callback and was swallowed ends here
        on_grid = epoch % self.every == 0
        if not on_grid and epoch != self.final_epoch:  # off the shared grid: no storage round trip
            return False
        self.trial.report(metrics[self.metric], epoch)
        self.reported.append(epoch)
        if not (on_grid and self.prunes):
            return False
        if self.finished is not None:
            return self.finished.prune(self.trial)
        return self.trial.should_prune()


@dataclass
class Objective:
    """trial -> params -> ``train()`` (or every fold) -> value; each epoch through the reporter."""

    spec: StudySpec
    data: Prepared
    tracker: Tracker | None
    parent_run_id: str | None
    device: Any
    train_seconds: list[float] = field(default_factory=list)
    cv: CVData | None = None  # cross-validation folds; None: train on ``data``'s one split
    provenance: dict[str, Any] = field(default_factory=dict)  # versions, device, data hash, execution
    worker: str | None = None  # host:pid of a worker process, recorded on each trial it runs

    def __call__(self, trial: optuna.Trial, finished: FinishedTrials | None = None) -> float:
        from tuner.train import train
        from tuner.validation import cross_validate

        begun: tuple[dict[str, Any], int, str | None] | None = None
        result: TrainResult | CVResult
        try:
            # Begun with a Ctrl-C or SIGTERM held, as the fused loop begins its trials: it is
            # raised once the trial has its run and its reporter, here, where abort() KILLs the run.
            with interrupts.deferred():
                begun = self.begin(trial)
                report = EpochReporter(trial, self.spec, int(begun[0]["epochs"]), finished)
            params, seed, run_id = begun
            if self.cv is not None and self.cv.folds:
                result = cross_validate(params, self.cv.folds, device=self.device, seed=seed, on_epoch_end=report,
                                        keep_predictions=self.keeps_predictions)
            else:
                result = train(params, self.data, device=self.device, seed=seed, on_epoch_end=report)
        except BaseException as e:
            if begun is not None:
                self.abort(trial, begun[0], begun[2], e)
            raise
        self.train_seconds.append(result.seconds)
        return self.finish(trial, params, seed, run_id, result, report.reported)

    @property
    def keeps_predictions(self) -> bool:
        """Whether trials store their out-of-fold predictions (only for an ensemble champion)."""
        return self.spec.ensemble is not None and self.tracker is not None

    def begin(self, trial: optuna.Trial) -> tuple[dict[str, Any], int, str | None]:
        """Sample the trial's params, fix its seed, open its MLflow run: ``(params, seed, run_id)``."""
        from tuner.space import sample

        params = sample(trial, self.spec.space)
        seed = self.spec.seed + trial.number
        # What reproduces the trial, in one attribute (each one is a storage write): the launch's
        # record, the seed and the folds' seeds (older studies: separate seed/fold_seeds attributes).
        record: dict[str, Any] = {**self.provenance, "seed": seed}
        if self.worker:
            record["worker"] = self.worker
        if self.cv is not None and self.cv.folds:
            from tuner.validation import fold_seeds

            record["fold_seeds"] = fold_seeds(seed, len(self.cv.folds))
        trial.set_user_attr("provenance", record)
        run_id = None
        if self.tracker is not None:
            run_id = self.tracker.start_trial(self.parent_run_id, self.spec.name, trial.number)
            trial.set_user_attr("mlflow_run_id", run_id)
        return params, seed, run_id

    def abort(self, trial: optuna.Trial | None, params: dict[str, Any], run_id: str | None, e: BaseException) -> None:
        """Record why a trial raised and close its run: Ctrl-C / SIGTERM KILLED, anything else
        FAILED. The caller tells the trial FAIL. Best effort: the storage may be what failed."""
        reason = fail_reason(e)
        if trial is not None:
            try:
                trial.set_user_attr("fail_reason", reason)
            except Exception:
                pass
        # A Ctrl-C may surface as another error (e.g. a database driver's, raised while SQLAlchemy
        # cleans up after the interrupt): the run was still stopped by the user.
        status: RunStatus = "KILLED" if isinstance(e, KeyboardInterrupt) or interrupts.requested() else "FAILED"
        if self.tracker is not None and run_id is not None:
            tags = {"tuner.error": repr(e)[:500], "tuner.fail_reason": reason}
            try:
                self.tracker.end_trial(run_id, status=status, params=params, tags=tags)
            except Exception:
                pass  # the MLflow store is what failed: `tuner reconcile` ends the run later

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
        pruned = bool(result.diverged or result.stop_reason)
        if pruned:
            reason = result.stop_reason or "pruned"
            trial.set_user_attr("stop_reason", reason)
            tags = {**tags, "tuner.state": "PRUNED", "tuner.stop_reason": reason}
        if self.tracker is not None and run_id is not None:
            checkpoint = None
            if not pruned and result.model is not None:  # cross-validated: the champion is refit later
                checkpoint = Checkpoint(result.model.config, {k: v.cpu() for k, v in result.model.state_dict().items()})
            if not pruned and self.keeps_predictions:
                self.tracker.save_predictions(run_id, self._predictions(result))
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

    def _predictions(self, result: TrainResult | CVResult) -> Any:
        """The trial's final-epoch out-of-fold predictions (``tuner.validation.assemble_oof``'s
        shape; one split: its validation rows as one repeat)."""
        if "oof" in result.extra:
            return result.extra["oof"]
        from tuner.train import val_predictions

        assert result.model is not None
        return val_predictions(result.model, self.data)[None]


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host allocation failure: the trial fails, the next (smaller) one may fit."""
    import torch

    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def fail_reason(e: BaseException) -> str:
    """One line on why a trial failed, with the fix where there is one."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if is_out_of_memory(e):
        where = "the device" if "cuda" in type(e).__name__.lower() or "cuda" in first.lower() else "this machine"
        return f"out of memory on {where} ({first or type(e).__name__}); lower the batch_size or hidden_size range"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM); relaunch to continue the study"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
