"""Cross-validation: seeded (stratified) k-fold splits and a trial trained on every fold.

On small data one split is mostly noise (the cars data validates on 6 of 32 rows), so a study
file may ask for ``validation = { folds = k, repeats = r }``, and data under ``CV_BELOW_ROWS``
rows gets 5-fold by default. Every fold is trained by the one shared ``train()``, and so is the
champion: the best trial's params refit on every row the trials saw, whatever the scheme.

Folds run in lockstep, epoch by epoch: fold 0 trains epoch e, then fold 1 trains epoch e, ...,
then the mean of the folds' epoch-e metrics is reported. So the value a trial reports at step e
*is* the cross-validated estimate after e epochs: the pruner compares like with like across
trials, its options (``n_warmup_steps``...) keep meaning epochs as with one split, the dashboard
shows ordinary learning curves, and a pruned trial stops all k folds at once. (Running fold by
fold and reporting a running mean would report each step more than once, which Optuna ignores,
or report per fold, which leaves epoch-based pruner settings meaningless.)

Each fold's ``train()`` runs in its own thread, but a baton lets exactly one of them (or the
coordinating caller) run at a time, always in the same order, and each fold takes its own global
RNG state (dropout) with it across the hand-overs: every fold computes exactly what ``train()``
on that fold alone computes, bit for bit, and Optuna is only ever called from the caller's thread.
The threads are only a way to pause ``train()`` at its epoch hook: ``train()`` stays the one plain
function that every other path (one split, refit, replay) calls.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np

from tuner.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tuner.config import StudySpec, Validation
    from tuner.data import Prepared
    from tuner.fused import Job
    from tuner.train import EpochHook, TrainParams

__all__ = [
    "DEFAULT_FOLDS",
    "CV_BELOW_ROWS",
    "ValidationPlan",
    "CVData",
    "CVResult",
    "plan_validation",
    "kfold_indices",
    "load_folds",
    "fold_seeds",
    "cross_validate",
    "cross_validate_many",
    "refit",
    "assemble_oof",
]

DEFAULT_FOLDS = 5
# Data with fewer rows is cross-validated unless the study file says otherwise. Below it a 20%
# holdout validates on fewer than 1,000 rows: an accuracy there has a standard error of up to
# 1.6 points (sqrt(0.25 / 1000)), and the best of 50 trials is picked on that noise (seen: 0.993
# on the holdout, 0.965 on untouched rows). 5 folds validate on every row, at 5x the training,
# which small tables (where the noise is worst) pay easily.
CV_BELOW_ROWS = 5000


@dataclass(frozen=True)
class ValidationPlan:
    """How trials are validated: one seeded split, or k folds repeated r times."""

    kind: Literal["holdout", "cv"]
    folds: int  # 1 for holdout
    repeats: int
    fraction: float  # holdout share (unused for cv)
    seed: int
    stratified: bool
    reason: str  # why this scheme: "set in the study file" or the default rule
    refit: bool = True  # the champion is refit on every row the trials saw (False: holdout only)
    test_fraction: float | None = None  # the untouched test part split off first (tuner.inputs)

    @property
    def n_fits(self) -> int:
        return self.folds * self.repeats

    def describe(self) -> str:
        if self.kind == "holdout":
            text = f"one split, {self.fraction:.0%} of rows held out (seed {self.seed}; {self.reason})"
        else:
            rep = f" x {self.repeats} repeats" if self.repeats > 1 else ""
            strat = ", stratified" if self.stratified else ""
            text = f"{self.folds}-fold cross-validation{rep}{strat} (seed {self.seed}; {self.reason})"
        if not self.refit:
            text += "; the champion is the trial's own model (refit = false)"
        if self.test_fraction:
            text += f"; {self.test_fraction:.0%} of rows untouched as the test part"
        return text


def plan_validation(
    validation: Validation, n_rows: int, *, seed: int, task: Literal["regression", "classification"] = "regression"
) -> ValidationPlan:
    """The scheme a study uses: the study file's choice, else 5-fold under ``CV_BELOW_ROWS`` rows
    (``n_rows``: the rows trials see, the test part left out).

    Raises:
        ConfigError: ``refit = false`` with cross-validation (its trials have no single model).
    """
    stratified = task == "classification"
    extra = dict(refit=validation.refit, test_fraction=validation.test_fraction)
    if validation.folds is not None:
        plan = ValidationPlan("cv", validation.folds, validation.repeats, validation.fraction, seed, stratified,
                              "set in the study file", **extra)  # type: ignore[arg-type]
    elif "fraction" in validation.model_fields_set:
        plan = ValidationPlan("holdout", 1, 1, validation.fraction, seed, False, "set in the study file", **extra)  # type: ignore[arg-type]
    elif n_rows < CV_BELOW_ROWS:
        folds = max(2, min(DEFAULT_FOLDS, n_rows))
        plan = ValidationPlan("cv", folds, 1, validation.fraction, seed, stratified,
                              f"default for data under {CV_BELOW_ROWS} rows; this has {n_rows}", **extra)  # type: ignore[arg-type]
    else:
        plan = ValidationPlan("holdout", 1, 1, validation.fraction, seed, False,
                              f"default for data of {CV_BELOW_ROWS} rows or more", **extra)  # type: ignore[arg-type]
    if plan.kind == "cv" and not plan.refit:
        raise ConfigError(
            f"validation.refit = false keeps a holdout trial's own model, but this study is {plan.folds}-fold "
            f"cross-validated ({plan.reason}), whose trials have none; set validation.fraction = 0.2 for one split, "
            "or remove refit"
        )
    return plan


def kfold_indices(
    y: np.ndarray, folds: int, *, repeats: int = 1, seed: int = 0, stratify: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_index, val_index)`` for each fold of each repeat; every row is validated once per
    repeat. Stratified: each class is dealt round-robin over the folds, so every fold holds the
    classes in about their overall proportions.

    Raises:
        DataError: more folds than rows, or too few rows left to train on.
    """
    n = len(y)
    if folds > n or n - (n + folds - 1) // folds < 2:
        raise DataError(
            f"{folds}-fold cross-validation needs at least {max(folds, 3)} rows (2 to train per fold); "
            f"the data has {n}: lower validation.folds"
        )
    splits = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        assign = np.empty(n, dtype=np.int64)
        if stratify:
            _, codes = np.unique(y, return_inverse=True)
            dealt = 0
            for c in range(int(codes.max()) + 1):
                rows = rng.permutation(np.flatnonzero(codes == c))
                # Continue dealing where the previous class stopped: fold sizes differ by <= 1.
                assign[rows] = (np.arange(len(rows)) + dealt) % folds
                dealt += len(rows)
        else:
            assign[rng.permutation(n)] = np.arange(n) % folds
        for f in range(folds):
            splits.append((np.flatnonzero(assign != f), np.flatnonzero(assign == f)))
    return splits


@dataclass(frozen=True)
class CVData:
    """The folds of a cross-validated study (none for a holdout) and all rows prepared once more
    for the champion's refit."""

    plan: ValidationPlan
    folds: list[Prepared]
    all_rows: Prepared | None  # None: refit = false, the champion is the holdout trial's own model


def load_folds(spec: StudySpec, frame: pd.DataFrame) -> CVData:
    """Plan the study's validation on its table, prepare every row for the champion's refit and,
    for cross-validation, every fold (encoder values and standardiser fitted on each fold's
    training rows only). ``frame``: the rows trials see (the test part left out).

    The folds share one input layout, the encoder of all rows (which the champion is refit on):
    fused training stacks the folds of a trial as one batch of equal-width models. A level or a
    missing indicator that a fold's training rows lack is inert in that fold (zero once
    standardised), so no fold learns from its validation rows.
    """
    from tuner.data import prepare_table, study_table
    from tuner.encoder import TableEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_data warned about these columns already
        table = study_table(spec, frame)
    y = table.y
    plan = plan_validation(spec.validation, len(y), seed=spec.validation_seed, task=spec.task)
    common = dict(fraction=spec.validation.fraction, seed=plan.seed, class_weight=spec.class_weight)
    everything = np.arange(len(y))
    all_rows = prepare_table(table, split=(everything, everything), **common) if plan.refit else None  # type: ignore[arg-type]
    if plan.kind == "holdout":
        return CVData(plan, [], all_rows)
    assert all_rows is not None  # plan_validation refuses refit = false with folds
    if plan.stratified:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() < plan.folds:
            warnings.warn(
                f"the smallest class of {spec.target!r} has {counts.min()} rows, fewer than the {plan.folds} folds: "
                "some folds validate without it",
                stacklevel=2,
            )
    layout = TableEncoder(all_rows.encoder) if all_rows.encoder else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant column warns once above, not once per fold
        folds = [
            prepare_table(table, split=s, layout=layout, **common)  # type: ignore[arg-type]
            for s in kfold_indices(y, plan.folds, repeats=plan.repeats, seed=plan.seed, stratify=plan.stratified)
        ]
    return CVData(plan, folds, all_rows)


def fold_seeds(seed: int, n: int) -> list[int]:
    """Independent training seeds for the folds of a trial whose seed is ``seed``."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n)]


@dataclass
class CVResult:
    """A trial over all folds; quacks like ``TrainResult`` (without a model)."""

    history: list[dict[str, float]]  # per epoch: the mean over folds of each metric
    metrics: dict[str, float]  # the last epoch's mean over folds
    fold_metrics: list[dict[str, float]]  # each fold's last-epoch metrics
    seeds: list[int]
    stop_reason: str | None = None
    diverged: bool = False
    n_steps: int = 0
    seconds: float = 0.0
    model: None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def spread(self, metric: str) -> float:
        """Standard deviation of ``metric`` over the folds (ddof=1)."""
        values = [m[metric] for m in self.fold_metrics if metric in m]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def cross_validate(
    params: TrainParams | Mapping[str, Any],
    folds: list[Prepared],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch_end: EpochHook | None = None,
    keep_predictions: bool = False,
) -> CVResult:
    """Train ``params`` on every fold through ``train()``, in lockstep (see the module doc).

    ``on_epoch_end(epoch, mean_metrics)`` sees the mean over folds; returning True stops every
    fold. A fold whose loss diverges stops them all (``diverged=True``). ``keep_predictions``:
    the folds' final-epoch validation predictions go to ``extra["oof"]`` (``assemble_oof``).
    """
    import torch

    from tuner.lockstep import Fold, lockstep
    from tuner.train import resolve_device, train, val_predictions

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    seeds = fold_seeds(seed, len(folds))
    back = threading.Semaphore(0)
    workers: list[Fold] = []
    for i, data in enumerate(folds):
        def run_fold(hook: EpochHook, data: Prepared = data, s: int = seeds[i]) -> Any:
            return train(params, data, device=dev, seed=s, on_epoch_end=hook)

        workers.append(Fold(i, run_fold, back, dev))
    start = time.perf_counter()
    for w in workers:
        w.start()
    # The folds' hand-overs set the global RNG state: leave the caller's as it was.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        history, stop_reason = lockstep(workers, back, on_epoch_end)
    for w in workers:
        if w.error is not None:
            raise w.error
    results = [w.result for w in workers]
    diverged = next((r for r in results if r.diverged), None)
    if diverged is not None:
        stop_reason = diverged.stop_reason
    return CVResult(
        history=history,
        metrics=dict(history[-1]) if history else {},
        fold_metrics=[dict(r.metrics) for r in results],
        seeds=seeds,
        stop_reason=stop_reason,
        diverged=diverged is not None,
        n_steps=sum(r.n_steps for r in results),
        seconds=time.perf_counter() - start,
        extra={"oof": assemble_oof([val_predictions(r.model, d) for r, d in zip(results, folds)], folds)}
        if keep_predictions and diverged is None and stop_reason is None else {},
    )


def cross_validate_many(
    jobs: Iterable[Job],
    folds: list[Prepared],
    *,
    device: torch.device | str = "cpu",
    on_epoch_end: Callable[[int, int, dict[str, float]], bool] | None = None,
    on_trial_end: Callable[[int, CVResult], None] | None = None,
    width: int = 32,
    keep_predictions: bool = False,
) -> list[CVResult]:
    """``cross_validate`` for many trials at once: every fold of every trial is one slot of
    ``train_many`` (fused training), with the same lockstep rules.

    Each trial's job becomes one job per fold (seeded by ``fold_seeds``, as ``cross_validate``
    seeds its ``train()`` calls). When all of a trial's folds have reached epoch e, the mean of
    their metrics goes to ``on_epoch_end(trial index, e, mean)``; True (or a fold that diverged)
    stops all of the trial's folds, at that epoch where their epochs end at the same optimizer step
    (folds of equal size: always, on the cars data), else at their next epoch end, whose extra
    rows are dropped. ``width`` counts slots (folds), not trials. ``keep_predictions``: as in
    ``cross_validate`` (each fold's model is kept just long enough to predict its validation rows).
    """
    from tuner.fused import Job, train_many
    from tuner.train import val_predictions

    n_folds = len(folds)
    trials: list[dict[str, Any]] = []  # per trial: seeds, fold results, rounds, stop state

    def expanded() -> Iterator[Job]:
        for job in jobs:
            seeds = fold_seeds(job.seed, n_folds)
            trials.append({"seeds": seeds, "rounds": {}, "history": [], "results": {}, "stop": None,
                           "diverged": False, "start": time.perf_counter()})
            for f in range(n_folds):
                yield Job(job.params, seeds[f], data=f, keep_model=keep_predictions)

    def fold_epoch_end(index: int, epoch: int, metrics: dict[str, float]) -> bool:
        t = trials[index // n_folds]
        if t["stop"] is not None:
            return True
        rows = t["rounds"].setdefault(epoch, {})
        rows[index % n_folds] = metrics
        if len(rows) < n_folds:
            return False
        del t["rounds"][epoch]
        mean = {k: float(np.mean([rows[f][k] for f in range(n_folds)])) for k in rows[0]}
        t["history"].append(mean)
        if on_epoch_end is not None and on_epoch_end(index // n_folds, epoch, mean):
            t["stop"] = f"stopped by the epoch hook after epoch {epoch}"
            return True
        return False

    def fold_should_stop(index: int) -> bool:
        return trials[index // n_folds]["stop"] is not None

    def fold_end(index: int, result: Any) -> None:
        i = index // n_folds
        t = trials[i]
        if result.model is not None:  # keep_predictions: the fold's final-epoch predictions, not its model
            result.extra["pred"] = val_predictions(result.model, folds[index % n_folds])
            result.model = None
        t["results"][index % n_folds] = result
        if result.diverged and t["stop"] is None:
            t["stop"], t["diverged"] = result.stop_reason, True
        if len(t["results"]) < n_folds:
            return
        done = _cv_result(t, n_folds, folds)
        trials[i] = {"result": done}  # free the fold results
        if on_trial_end is not None:
            on_trial_end(i, done)

    train_many(expanded(), folds, device=device, on_epoch_end=fold_epoch_end, on_trial_end=fold_end,
               should_stop=fold_should_stop, width=width)
    return [t["result"] for t in trials]


def assemble_oof(preds: list[np.ndarray], folds: list[Prepared]) -> np.ndarray:
    """Out-of-fold predictions in row order: ``(repeats, rows[, classes])`` float32, row i of
    repeat r predicted by the fold of repeat r that validated it (``folds`` in ``kfold_indices``
    order: each repeat's folds validate every row once; ``preds[f]`` is over ``folds[f].val_index``)."""
    n_rows = len(folds[0].train_index) + len(folds[0].val_index)
    repeats: list[np.ndarray] = []
    filled = n_rows
    for pred, fold in zip(preds, folds):
        if filled == n_rows:  # the previous repeat is complete: the next fold starts a new one
            repeats.append(np.empty((n_rows, *pred.shape[1:]), dtype=np.float32))
            filled = 0
        repeats[-1][fold.val_index] = pred
        filled += len(fold.val_index)
    return np.stack(repeats)


def _cv_result(t: dict[str, Any], n_folds: int, folds: list[Prepared]) -> CVResult:
    history = t["history"]
    results = [t["results"][f] for f in range(n_folds)]
    rounds = len(history)
    # A fold that ran past the epoch its trial stopped at (its epochs end at other optimizer
    # steps than its siblings'): its extra epochs are not the trial's. Steps per epoch are fixed.
    fold_metrics = [dict(r.history[rounds - 1]) if rounds and len(r.history) >= rounds else dict(r.metrics)
                    for r in results]
    n_steps = sum(r.n_steps * rounds // len(r.history) if len(r.history) > rounds else r.n_steps for r in results)
    preds = [r.extra.get("pred") for r in results]
    return CVResult(
        history=history,
        metrics=dict(history[-1]) if history else {},
        fold_metrics=fold_metrics,
        seeds=t["seeds"],
        stop_reason=t["stop"],
        diverged=t["diverged"],
        n_steps=n_steps,
        seconds=time.perf_counter() - t["start"],
        extra={"oof": assemble_oof(preds, folds)} if t["stop"] is None and all(p is not None for p in preds) else {},
    )


def refit(params: Mapping[str, Any], data: CVData, *, device: torch.device | str = "cpu", seed: int = 0) -> Any:
    """The champion: the best trial's params (its epochs included) trained on every row the
    trials saw through ``train()``, seeded from the trial's seed, whatever the validation scheme.
    Returns the ``TrainResult``; its metrics are in-sample, so the validated value stays the one
    promotion compares (and the test part, if any, gives the honest estimate)."""
    from tuner.train import train

    if data.all_rows is None:
        raise ValueError("refit needs all_rows (the study sets refit = false)")
    return train(params, data.all_rows, device=device, seed=seed)
