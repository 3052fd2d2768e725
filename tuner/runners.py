"""How the trials a gate hands out are trained: one at a time, or K at once as one batched model.

``run_trials`` is the one loop of a launch (or a worker): it asks the gate, trains sequentially
(``Objective``, one ``train()`` or one cross-validation per trial) or fused (``train_many``:
every trial in flight, every fold of each, is a slot), tells the gate, and keeps the rules that
hold whatever the mode: a trial that runs out of memory fails and the launch goes on (fused:
the trials in flight fail and the rest of the budget runs sequentially), ``MAX_FAILED_IN_A_ROW``
failures in a row end the launch, and a server storage that goes away is waited for.

``choose_execution`` decides ``auto`` by a rule over the device and the space's middle model, not
by timing: the same study on the same machine always runs the same way (and so gives the same
trials for the same seed).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from tuner import interrupts
from tuner.errors import ConfigError, TunerError
from tuner.study import caused_by_storage
from tuner.trial import EpochReporter, fail_reason, is_out_of_memory

if TYPE_CHECKING:
    import optuna
    import torch

    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.fused import Job
    from tuner.gate import TrialGate
    from tuner.train import TrainResult
    from tuner.trial import Objective
    from tuner.validation import CVResult

__all__ = [
    "run_trials",
    "choose_execution",
    "fused_width",
    "step_work",
    "FUSED_WIDTH",
    "MIN_MODELS_FOR_AUTO",
    "MAX_FAILED_IN_A_ROW",
    "FUSE_BELOW_WORK",
]

Callback = Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]

FUSED_WIDTH = 64  # most trials in flight at once
# auto runs sequentially where fewer models than this train at once (trials to run x the models
# of each: its folds). Measured (1-trial and 3-trial launches of the cars study, 2 CPU cores): one
# 5-fold trial trains 2.6x faster fused, 3 of them 4x; one holdout trial takes the same time
# either way, 3 of them 1.3x less fused.
MIN_MODELS_FOR_AUTO = 3
# A launch stops after this many failed trials in a row (e.g. out of memory on every trial)
# instead of failing forever; failed trials never count towards n_trials.
MAX_FAILED_IN_A_ROW = 5
# auto fuses where one optimizer step of the space's middle model is at most this many
# multiply-adds: there a step is bound by per-call overhead (~0.3 ms of Python, dispatch and Adam
# on a CPU core, more kernel launches on a GPU), which a batched model pays once for K trials.
# Measured (benchmarks/fused.py, 2 CPU cores): the cars space's middle model (~2k multiply-adds
# per step) ran 3.7-5.2x cheaper per trial-step fused; compute-bound models gain nothing on a CPU.
FUSE_BELOW_WORK = {"cpu": 2e5, "cuda": 5e7}


def fused_width(n_trials: int, n_workers: int = 1) -> int:
    """Trials in flight in one process of ``n_workers`` sharing ``n_trials``: a quarter of its
    share, 2 to FUSED_WIDTH.

    The sampler proposes each trial knowing the trials told so far (the ones in flight count as
    constant lies), so a width near the whole budget would make most trials blind draws: a
    quarter keeps at least four rounds of results for TPE to learn from. Workers on one study
    each take a quarter of their share, so N fused workers keep about as many trials in flight
    as one fused launch (not N times as many).
    """
    return max(2, min(FUSED_WIDTH, n_trials // (4 * max(n_workers, 1))))


def unfusable_reason(spec: StudySpec) -> str | None:
    """Why this study's space cannot train fused (its trials would not match ``train()``)."""
    p = spec.space.get("dropout")
    if p is None:
        return None
    values = [getattr(p, "value", None), *(getattr(p, "choices", None) or []), getattr(p, "high", None)]
    if any(isinstance(v, (int, float)) and v > 0 for v in values):
        return "the space samples dropout > 0, which fused training cannot reproduce exactly"
    return None


def typical_params(spec: StudySpec) -> dict[str, Any]:
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


def step_work(params: dict[str, Any], data: Prepared) -> float:
    """Multiply-adds of one forward pass of a batch (the shape of an optimizer step's work)."""
    batch = min(int(params["batch_size"]), len(data.x_train))
    n_in, n_out, hidden = data.n_features, data.n_outputs, int(params["hidden_size"])
    if hidden == 0:
        return float(batch * n_in * n_out)
    layers = int(params.get("n_layers", 1))
    return float(batch * (n_in * hidden + (layers - 1) * hidden * hidden + hidden * n_out))


def choose_execution(
    spec: StudySpec, data: Prepared, device: torch.device, n_remaining: int, models_per_trial: int = 1,
    n_workers: int = 1,
) -> tuple[str, str]:
    """``(execution, why)``: ``sequential`` or ``fused``, from the study file or by rule for ``auto``.
    ``models_per_trial``: the models one trial trains (its folds; 1 for a holdout), each a slot;
    ``n_workers``: the processes sharing the trials (the width named is each one's).

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
    if n_remaining * models_per_trial < MIN_MODELS_FOR_AUTO:
        models = f" x {models_per_trial} folds" if models_per_trial > 1 else ""
        return "sequential", (
            f"auto: {n_remaining} trial(s){models} to run; under {MIN_MODELS_FOR_AUTO} models do not pay to fuse"
        )
    limit = FUSE_BELOW_WORK.get(device.type)
    if limit is None:
        return "sequential", f"auto: fused execution is not measured on {device.type}"
    work = step_work(typical_params(spec), data)
    size = f"the middle model's step is {work:.3g} multiply-adds"
    if work <= limit:
        return "fused", f"auto: {size} (<= {limit:.0e} on {device.type}), width {fused_width(n_remaining, n_workers)}"
    return "sequential", f"auto: {size} (> {limit:.0e} on {device.type})"


# -- the loop --------------------------------------------------------------------------------


def run_trials(
    gate: TrialGate,
    objective: Objective,
    execution: str,
    *,
    url: str,
    callbacks: Sequence[Callback] = (),
    width: int | None = None,
) -> str:
    """Run trials from the gate until it hands out no more; return the execution that ran last
    (fused falls back to sequential after running out of memory).

    Raises:
        TunerError: ``MAX_FAILED_IN_A_ROW`` failed trials in a row, or a storage that failed for good.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the trials in flight are FAIL, their runs KILLED.
    """
    from optuna.trial import TrialState

    failed_in_a_row = 0
    while True:
        try:
            if execution == "fused":
                told = _run_fused(gate, objective, callbacks, width or fused_width(gate.n_trials - gate.n_finished))
            else:
                told = _run_one(gate, objective, callbacks)
        except Exception as e:  # the trials in flight are told FAIL already (but on a storage error)
            if is_out_of_memory(e):
                _free_device_memory(objective.device)
                if execution == "fused":
                    print(
                        f"execution: fused ran out of memory ({fail_reason(e).split(';')[0]}); "
                        "the trials in flight failed, the rest run sequentially",
                        file=sys.stderr,
                        flush=True,
                    )
                    execution = "sequential"
                    continue
                raise
            if caused_by_storage(e):
                gate.recover(e, url)  # a restarted server: wait for it, fail the trials in flight
                continue
            raise
        if not told:
            return execution
        for trial in told:
            if trial.state == TrialState.FAIL:
                failed_in_a_row += 1
                if trial.user_attrs.get("fail_reason", "").startswith("out of memory"):
                    _free_device_memory(objective.device)
                if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                    reason = trial.user_attrs.get("fail_reason") or "unknown"
                    raise TunerError(
                        f"{failed_in_a_row} trials in a row failed (last, trial {trial.number}: {reason}); "
                        "fix the cause (e.g. a smaller batch_size/hidden_size range) and relaunch"
                    )
            else:
                failed_in_a_row = 0


def _run_one(gate: TrialGate, objective: Objective, callbacks: Sequence[Callback]) -> list[optuna.trial.FrozenTrial]:
    """One trial, as ``study.optimize`` runs one: PRUNED on ``TrialPruned``; FAIL on an error (an
    out-of-memory error fails the trial, not the launch; anything else is raised after the tell)."""
    import optuna
    from optuna.trial import TrialState

    trial = gate.ask()
    if trial is None:
        return []
    try:
        value = objective(trial, gate.finished)
    except optuna.TrialPruned:
        frozen = gate.tell(trial, state=TrialState.PRUNED)
    except BaseException as e:
        if caused_by_storage(e):
            raise  # the gate recovers: the trial fails once the storage is back
        frozen = gate.tell(trial, state=TrialState.FAIL)
        # Another process judged this live trial stale (its heartbeat was late, e.g. on an
        # overloaded machine) and failed it: it stays FAIL (its run too) and the launch goes on.
        if not (is_out_of_memory(e) or isinstance(e, optuna.exceptions.UpdateFinishedTrialError)):
            raise
    else:
        frozen = gate.tell(trial, value)
    for callback in callbacks:
        callback(gate.study, frozen)
    return [frozen]


def _run_fused(
    gate: TrialGate, objective: Objective, callbacks: Sequence[Callback], width: int
) -> list[optuna.trial.FrozenTrial]:
    """Trials from the gate, ``width`` at a time as one batched model, until it hands out no more.

    Every trial is begun, reported and finished as the sequential ``Objective`` does it (same
    params, seed, MLflow run, checkpoint, user attrs, PRUNED/COMPLETE rules); only the training is
    shared. A slot that frees up asks for the next trial after the finished one was told, so TPE
    (constant liar) sees every result a sequential loop with K trials in flight would see. If
    training raises, the caller fails the trials in flight (``gate.fail_in_flight``).
    """
    import optuna
    from optuna.trial import TrialState

    from tuner.fused import Job, train_many
    from tuner.train import TrainParams

    trials: list[optuna.Trial] = []
    opened: list[tuple[dict[str, Any], int, str | None]] = []
    reporters: list[EpochReporter] = []
    told: list[optuna.trial.FrozenTrial] = []

    def jobs() -> Iterator[Job]:
        # Lazily, when a slot frees up: the finished trials are told before the next ask. The
        # trials in flight are len(trials) - len(told); the rest of the width is asked for at once
        # (one hold of the lock, one read of the study): train_many pulls at least that many jobs
        # before it trains again (a trial takes one slot, or one per fold, and a trial in flight
        # never holds more), so every trial asked here starts in this same refill, as if asked
        # one by one; each is begun (params, seed, run) right after the ask. Only the first ask
        # waits for other processes' trials; later ones never wait on our own.
        pending: list[Job] = []
        while True:
            if not pending:
                # Asked and begun at once, a Ctrl-C held until all are begun: no trial in flight
                # is without its MLflow run (a wait for other processes' slots stays interruptible).
                with interrupts.deferred():
                    asked = gate.ask_many(max(1, width - (len(trials) - len(told))), wait=not trials)
                    for trial in asked:
                        params, seed, run_id = objective.begin(trial)
                        trials.append(trial)
                        opened.append((params, seed, run_id))
                        reporters.append(EpochReporter(trial, objective.spec, int(params["epochs"]), gate.finished))
                        pending.append(Job(TrainParams.from_mapping(params), seed))
                if not asked:
                    return
            yield pending.pop(0)

    lost: dict[int, BaseException] = {}  # trials another process failed (stale) while they trained

    def on_epoch_end(index: int, epoch: int, metrics: dict[str, float]) -> bool:
        try:
            return reporters[index](epoch, metrics)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            lost[index] = e
            return True  # stop this trial only; it stays FAIL

    def on_trial_end(index: int, result: TrainResult | CVResult) -> None:
        trial = trials[index]
        params, seed, run_id = opened[index]
        if index in lost:
            objective.abort(trial, params, run_id, lost[index])
            frozen = gate.tell(trial, state=TrialState.FAIL)
        else:
            try:
                value = objective.finish(trial, params, seed, run_id, result, reporters[index].reported)
            except optuna.TrialPruned:
                frozen = gate.tell(trial, state=TrialState.PRUNED)
            else:
                frozen = gate.tell(trial, value)
        told.append(frozen)
        for callback in callbacks:
            callback(gate.study, frozen)

    start = time.perf_counter()
    folds = objective.cv.folds if objective.cv is not None else []
    try:
        if folds:  # every fold of every trial in flight is one slot
            from tuner.validation import cross_validate_many

            cross_validate_many(
                jobs(), folds, device=objective.device, on_epoch_end=on_epoch_end, on_trial_end=on_trial_end,
                width=width * len(folds), keep_predictions=objective.keeps_predictions,
            )
        else:
            train_many(
                jobs(), objective.data, device=objective.device, on_epoch_end=on_epoch_end, on_trial_end=on_trial_end,
                width=width,
            )
    except BaseException as e:
        begun = {trial._trial_id: opened[index] for index, trial in enumerate(trials)}
        for trial_id, trial in list(gate.in_flight.items()):
            # A trial whose begin was cut short (Ctrl-C in it) has what it had recorded so far.
            params, _, run_id = begun.get(trial_id, ({}, 0, trial.user_attrs.get("mlflow_run_id")))
            objective.abort(trial, params, run_id, e)
        if not isinstance(e, Exception) or not caused_by_storage(e):
            gate.fail_in_flight()
        raise
    finally:
        objective.train_seconds.append(time.perf_counter() - start)
    return told


def _free_device_memory(device: Any) -> None:
    """After a failed trial (e.g. out of memory): drop its tensors and return cached blocks."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()
