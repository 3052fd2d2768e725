"""A study in fused mode: ask K trials, train them together with ``train_many``, tell each.

Per trial everything is done as the sequential ``Objective`` does it (same params, seed, MLflow
run, checkpoint, user attrs, PRUNED/COMPLETE rules) through its ``begin``/``finish``; only the
training is shared. A slot that frees up asks the study for the next trial after the finished
one was told, so TPE (constant liar on by default) sees every result it would see in a
sequential worker that runs K trials at once.

``choose_execution`` decides ``auto`` by measuring, at launch, a few optimizer steps of the space's
middle model alone and fused ``width`` at a time, on the study's own data and device.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tuner.errors import ConfigError
from tuner.pruning import FinishedTrials, fast_pruning

if TYPE_CHECKING:
    import optuna
    import torch

    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.fused import Job
    from tuner.study import Objective
    from tuner.train import TrainResult
    from tuner.validation import CVResult

__all__ = ["run_fused", "choose_execution", "fused_width", "measure_speedup", "FUSED_WIDTH", "MIN_TRIALS_FOR_AUTO"]

FUSED_WIDTH = 64  # most trials in flight at once


def fused_width(n_trials: int) -> int:
    """Trials in flight for a launch of ``n_trials``: a quarter of them, 2 to FUSED_WIDTH.

    The sampler proposes each trial knowing the trials told so far (the ones in flight count as
    constant lies), so a width near the whole budget would make most trials blind draws: a
    quarter keeps at least four rounds of results for TPE to learn from.
    """
    return max(2, min(FUSED_WIDTH, n_trials // 4))
MIN_TRIALS_FOR_AUTO = 8  # fewer trials than this do not pay back auto's calibration (~0.2-0.5 s)
AUTO_MIN_SPEEDUP = 2.0  # fused must be this much cheaper per trial-step for auto to pick it


def unfusable_reason(spec: StudySpec) -> str | None:
    """Why this study's space cannot train fused (its trials would not match ``train()``)."""
    p = spec.space.get("dropout")
    if p is None:
        return None
    values = [getattr(p, "value", None), *(getattr(p, "choices", None) or []), getattr(p, "high", None)]
    if any(isinstance(v, (int, float)) and v > 0 for v in values):
        return "the space samples dropout > 0, which fused training cannot reproduce exactly"
    return None


def _typical_params(spec: StudySpec) -> dict[str, Any]:
    """The middle trial of the space (geometric middle of log ranges, middle choice); one epoch."""

    def middle(name: str, default: Any) -> Any:
        p = spec.space.get(name)
        if p is None:
            return default
        if hasattr(p, "value"):
            return p.value
        if hasattr(p, "choices"):
            try:
                return sorted(p.choices)[len(p.choices) // 2]
            except TypeError:  # mixed types
                return p.choices[0]
        mid = math.sqrt(p.low * p.high) if p.log and p.low > 0 else (p.low + p.high) / 2
        return round(mid) if isinstance(p.low, int) and isinstance(p.high, int) else mid

    return {
        "lr": 1e-3,
        "epochs": 1,
        "batch_size": int(middle("batch_size", 32)),
        "hidden_size": int(middle("hidden_size", 16)),
        "activation": middle("activation", "relu"),
        "n_layers": int(middle("n_layers", 1)),
        "optimizer": middle("optimizer", "adam"),
        "weight_decay": float(middle("weight_decay", 0.0)),
    }


def measure_speedup(
    spec: StudySpec, prepared: Prepared, device: torch.device, width: int = 16, min_steps: int = 16
) -> float:
    """Cost per trial of the space's middle model trained alone / fused ``width`` at a time.

    Each trial runs at least ``min_steps`` optimizer steps (with its per-epoch validation) on the
    study's own data and device. CPU time of this process on a CPU (other processes on a shared
    machine do not count), wall time with the device synchronised on a GPU; best of three.
    """
    import torch

    from tuner.fused import Job, train_many
    from tuner.train import train

    params = _typical_params(spec)
    batch = min(params["batch_size"], len(prepared.x_train))
    rows = min(len(prepared.x_train), batch * min_steps)  # a few steps' worth of rows is enough
    data = replace(prepared, x_train=prepared.x_train[:rows], y_train=prepared.y_train[:rows])
    params["epochs"] = math.ceil(min_steps / math.ceil(rows / batch))

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up: first-call kernel and allocator costs are not per trial
        best = math.inf
        for _ in range(3):
            start = clock()
            fn()
            best = min(best, clock() - start)
        return best

    one = timed(lambda: train(params, data, device=device))
    jobs = [Job(replace_params(params), seed) for seed in range(width)]
    many = timed(lambda: train_many(jobs, data, device=device))
    return (one * width) / max(many, 1e-9)


def replace_params(params: dict[str, Any]) -> Any:
    from tuner.train import TrainParams

    return TrainParams.from_mapping(params)


def choose_execution(
    spec: StudySpec, prepared: Prepared, device: torch.device, n_remaining: int
) -> tuple[str, str]:
    """``(execution, why)``: ``sequential`` or ``fused``, from the study file or measured for ``auto``.

    Raises:
        ConfigError: ``execution = "fused"`` for a space that cannot train fused.
    """
    reason = unfusable_reason(spec)
    if spec.execution == "sequential":
        return "sequential", "execution = 'sequential' in the study file"
    if spec.execution == "fused":
        if reason:
            raise ConfigError(f"execution = 'fused' but {reason}; use execution = 'sequential' or fix dropout to 0")
        return "fused", "execution = 'fused' in the study file"
    if reason:
        return "sequential", f"auto: {reason}"
    if n_remaining < MIN_TRIALS_FOR_AUTO:
        return "sequential", f"auto: {n_remaining} trial(s) to run; under {MIN_TRIALS_FOR_AUTO} do not pay to fuse"
    width = fused_width(n_remaining)
    speedup = measure_speedup(spec, prepared, device, width)
    if speedup >= AUTO_MIN_SPEEDUP:
        return "fused", f"auto: measured {speedup:.1f}x cheaper per trial-step at width {width} on {device}"
    return "sequential", f"auto: fused measured {speedup:.1f}x per trial-step on {device}, below {AUTO_MIN_SPEEDUP}x"


class _FinishedTrials(FinishedTrials):
    """The finished trials for the pruner (see ``tuner.pruning``) and for the trial budget's
    count: the trials this worker tells are added as it tells them, and the storage is re-read at
    most once per ``max_age`` seconds for the trials other workers finish (each read also re-reads
    every trial in flight, with its intermediate values: ~15 ms at width 12 on SQLite)."""

    def __init__(self, study: optuna.Study, max_age: float = 1.0) -> None:
        super().__init__(study)
        self._max_age = max_age
        self.refresh()

    def refresh(self) -> None:
        self._finished = [t for t in self._study.get_trials(deepcopy=False) if t.state.is_finished()]
        self._ids = {t._trial_id for t in self._finished}
        self._read_at = time.monotonic()

    def add(self, trial: optuna.trial.FrozenTrial) -> None:
        """A trial this worker just told."""
        if trial.state.is_finished() and trial._trial_id not in self._ids:
            self._finished.append(trial)
            self._ids.add(trial._trial_id)

    def maybe_refresh(self) -> None:
        if time.monotonic() - self._read_at >= self._max_age:
            self.refresh()

    def count(self) -> int:
        """Finished trials that count towards the budget (COMPLETE and PRUNED)."""
        from optuna.trial import TrialState

        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self._finished)


def run_fused(
    study: optuna.Study,
    objective: Objective,
    *,
    n_trials: int,
    total: int,
    timeout: float | None = None,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    width: int | None = None,
) -> None:
    """Run up to ``n_trials`` trials (stopping once the study holds ``total`` finished ones, or
    after ``timeout`` seconds), ``width`` at a time as one batched model.

    A trial that raised nothing is told COMPLETE or PRUNED exactly as ``study.optimize`` would
    tell it; if training raises, every trial in flight is told FAIL and its run closed.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
    from optuna.trial import TrialState

    from tuner.fused import Job, train_many
    from tuner.train import TrainParams

    started = time.perf_counter()
    width = width or fused_width(n_trials)
    storage = study._storage
    beat = storage if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage) else None
    heartbeat = beat is not None
    interval = beat.get_heartbeat_interval() if beat is not None else None
    trials: list[optuna.Trial] = []
    opened: list[tuple[dict[str, Any], int, str | None]] = []
    told: set[int] = set()
    metric = objective.spec.metric
    last_beat = time.monotonic()
    finished = _FinishedTrials(study)
    fast = fast_pruning(study)

    def jobs() -> Iterator[Job]:
        # Lazily, one ask per free slot: the previous results are told before the next ask.
        while len(trials) < n_trials:
            if timeout is not None and time.perf_counter() - started > timeout:
                return
            in_flight = len(trials) - len(told)
            finished.maybe_refresh()
            if finished.count() + in_flight >= total:  # other workers count too (seen within a second)
                return
            with warnings.catch_warnings():
                # This runner does what study.optimize does for a heartbeat: fail stale trials
                # before each ask, and record the heartbeat of every trial in flight.
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat:
                    optuna.storages.fail_stale_trials(study)
                trial = study.ask()
            trials.append(trial)
            params, seed, run_id = objective.begin(trial)
            opened.append((params, seed, run_id))
            reported.append([])
            yield Job(TrainParams.from_mapping(params), seed)

    every = objective.spec.report_every
    prunes = objective.spec.pruner.name != "none"
    reported: list[list[int]] = []  # per trial: the epochs that went to Optuna (and MLflow)

    def on_epoch_end(index: int, epoch: int, metrics: dict[str, float]) -> bool:
        # The sequential Objective's grid: report epochs 0, every, 2*every, ... and the last one;
        # judge only on the grid (the last epoch is reported for the curve, training is over).
        nonlocal last_beat
        if beat is not None and interval and time.monotonic() - last_beat >= interval:
            for i, t in enumerate(trials):
                if i not in told:
                    beat.record_heartbeat(t._trial_id)
            last_beat = time.monotonic()
        trial = trials[index]
        on_grid = epoch % every == 0
        if not on_grid and epoch != int(opened[index][0]["epochs"]) - 1:
            return False
        trial.report(metrics[metric], epoch)
        reported[index].append(epoch)
        if not (on_grid and prunes):
            return False
        if not fast:
            return trial.should_prune()  # pruners that read running trials (hyperband, ...): the exact path
        return finished.prune(trial)  # what should_prune decides, against the finished trials held

    def on_trial_end(index: int, result: TrainResult | CVResult) -> None:
        trial = trials[index]
        params, seed, run_id = opened[index]
        try:
            value = objective.finish(trial, params, seed, run_id, result, reported[index])
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = study.tell(trial, value)
        told.add(index)
        finished.add(frozen)
        finished.maybe_refresh()
        for callback in callbacks or []:
            callback(study, frozen)

    start = time.perf_counter()
    folds = objective.cv.folds if objective.cv is not None else []
    try:
        if folds:  # every fold of every trial in flight is one slot
            from tuner.validation import cross_validate_many

            cross_validate_many(
                jobs(),
                folds,
                device=objective.device,
                on_epoch_end=on_epoch_end,
                on_trial_end=on_trial_end,
                width=width * len(folds),
            )
        else:
            train_many(
                jobs(),
                objective.data,
                device=objective.device,
                on_epoch_end=on_epoch_end,
                on_trial_end=on_trial_end,
                width=width,
            )
    except BaseException as e:
        for index, trial in enumerate(trials):
            if index in told:
                continue
            params, _, run_id = opened[index] if index < len(opened) else ({}, 0, None)
            objective.abort(params, run_id, e)
            study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        objective.train_seconds.append(time.perf_counter() - start)
