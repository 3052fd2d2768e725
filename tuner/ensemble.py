"""A top-k ensemble champion: greedy ensemble selection over the trials' out-of-fold predictions.

Caruana et al. (2004), "Ensemble selection from libraries of models", as AutoGluon's
WeightedEnsemble does it: start from nothing, and ``size`` times add (with replacement) the trial
whose predictions, averaged with those already picked, give the best out-of-fold value; the
pick counts are the members' integer weights, and the best prefix of the picks is kept. Regression
averages predictions in the target's units, classification averages class probabilities.

With ``ensemble = { size = 5 }`` in the study file, every COMPLETE trial stores its final-epoch
out-of-fold predictions (``tuner.validation.assemble_oof``: cross-validated, each fold's
validation rows in row order; one split, its validation rows) as ``oof.npy`` in its MLflow run.
At promotion the best ``candidates`` trials that have them are selected from; the ensemble's
value is measured exactly as a trial's (the metric on each fold's validation rows, averaged over
the folds), so it compares with the single best trial's value, which the same code recomputes
from that trial's stored predictions.

Honesty: the picks are fit on the very rows that then score them, so the ensemble's value is
optimistic (a little: it chooses among ~``candidates`` fixed predictions, with ``size`` integer
weights). So it is adopted only if it has at least two distinct members, beats the single best by
more than ``tolerance`` (relative), and also wins cross-fitted: for each fold (one split: each
fifth of its validation rows), the picks and the single best are chosen on the other folds and
scored on this one (the candidates are still the study's best trials on every fold). Else the single best trial is the champion, as without
an ensemble. The adopted members are refit on all rows through ``train()`` (as a cross-validated
champion is), and stored as ONE pickle-free checkpoint (``model.Checkpoint.ensemble``) that
``tuner predict`` and ``mlflow.pyfunc.load_model`` read like any other champion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.inputs import Inputs
    from tuner.tracking import Tracker

__all__ = ["Selection", "OofScorer", "greedy_select", "cross_fitted", "select", "ensemble_run", "ENSEMBLE_ATTR"]

ENSEMBLE_ATTR = "ensemble"  # study user attr: the last selection (members, values, adopted or why not)


class OofScorer:
    """A study's out-of-fold metrics of predictions shaped as ``assemble_oof`` returns them:
    each fit's (fold's) validation rows scored as its trial was, then averaged over the fits."""

    def __init__(self, fits: Sequence[tuple[int, Any, Any]], task: Literal["regression", "classification"]) -> None:
        import torch

        self.task = task
        # (repeat, row indices, target of those rows as the fold validated them)
        self.fits = [(r, torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(y).cpu()) for r, idx, y in fits]

    @classmethod
    def of(cls, inputs: Inputs) -> OofScorer:
        """The folds of a cross-validated study, or the validation rows of its one split."""
        cv = inputs.cv
        if not cv.folds:
            p = inputs.prepared
            return cls([(0, np.arange(len(p.val_index)), p.y_val_raw)], p.task)
        n_rows = len(cv.folds[0].train_index) + len(cv.folds[0].val_index)
        fits, repeat, filled = [], -1, n_rows
        for fold in cv.folds:  # the repeats of assemble_oof
            if filled == n_rows:
                repeat, filled = repeat + 1, 0
            fits.append((repeat, fold.val_index, fold.y_val_raw))
            filled += len(fold.val_index)
        return cls(fits, cv.folds[0].task)

    def cross_fit(self, parts: int = 5) -> list[tuple[OofScorer, OofScorer]]:
        """``(the other parts, this part)`` for each part of the rows: the first repeat's folds,
        or a one-split study's validation rows dealt into ``parts`` (a row is never in both)."""
        units: list[tuple[int, Any, Any]]
        units = [f for f in self.fits if f[0] == 0]
        if len(units) == 1:
            r, idx, y = units[0]
            k = min(parts, len(idx))
            units = [(r, idx[j::k], y[j::k]) for j in range(k)] if k > 1 else units
        return [(OofScorer([u for j, u in enumerate(units) if j != i], self.task), OofScorer([units[i]], self.task))
                for i in range(len(units))] if len(units) > 1 else []

    def __call__(self, pred: np.ndarray) -> dict[str, float]:
        import torch

        from tuner.train import output_metrics

        p = torch.as_tensor(pred, dtype=torch.float32)
        zero, one = torch.zeros(()), torch.ones(())
        rows = []
        for r, idx, y in self.fits:
            out = p[r].index_select(0, idx)
            if self.task == "classification":
                out = out.clamp_min(1e-30).log()  # log-probabilities as logits: softmax gives them back
            names, values = output_metrics(out, y, self.task, zero, one)
            rows.append(values.double().numpy())
        return dict(zip(names, np.mean(rows, axis=0).tolist()))


def greedy_select(
    preds: Sequence[np.ndarray],
    score: Any,
    size: int,
    *,
    metric: str,
    direction: Literal["minimize", "maximize"],
) -> tuple[list[int], dict[str, float]]:
    """Caruana's greedy selection with replacement: ``size`` picks, each the candidate that makes
    the running average best; ties go to the earlier candidate (pass them best first), and for
    classification first to the lower log loss. Returns the integer weight of each candidate at
    the best prefix of the picks, and that average's metrics."""
    sign = 1.0 if direction == "minimize" else -1.0

    def key(m: dict[str, float]) -> tuple[float, float]:
        return sign * m[metric], m.get("log_loss", 0.0) if metric != "log_loss" else 0.0

    counts = [0] * len(preds)
    total = np.zeros_like(preds[0], dtype=np.float64)
    best: tuple[tuple[float, float], list[int], dict[str, float]] | None = None
    for step in range(1, size + 1):
        trials = [(key(m := score((total + p) / step)), i, m) for i, p in enumerate(preds)]
        k, i, m = min(trials, key=lambda t: (t[0], t[1]))
        counts[i] += 1
        total += preds[i]
        if best is None or k < best[0]:
            best = (k, list(counts), m)
    assert best is not None
    return best[1], best[2]


def cross_fitted(
    preds: Sequence[np.ndarray], score: OofScorer, size: int, *, metric: str, direction: Literal["minimize", "maximize"]
) -> tuple[float, float] | None:
    """An honest check of the selection: for each part of the rows, the ensemble picked (and the
    single best trial chosen) on the other parts only, scored on this part; the means over the
    parts, ``(ensemble, single best)``. None: the rows cannot be parted."""
    sign = 1.0 if direction == "minimize" else -1.0
    ensemble, single = [], []
    for inner, outer in score.cross_fit():
        counts, _ = greedy_select(preds, inner, size, metric=metric, direction=direction)
        average = np.sum([c * p for c, p in zip(counts, preds)], axis=0) / sum(counts)
        ensemble.append(outer(average)[metric])
        best = min(range(len(preds)), key=lambda i: (sign * inner(preds[i])[metric], i))
        single.append(outer(preds[best])[metric])
    return (float(np.mean(ensemble)), float(np.mean(single))) if ensemble else None


@dataclass(frozen=True)
class Selection:
    """An ensemble selected from a study's trials, and whether it beats the single best."""

    members: list[tuple[int, int]]  # (trial number, weight), heaviest first
    metric: str
    value: float  # the ensemble's out-of-fold value (mean over folds, as a trial's)
    best_trial: int
    best_value: float  # the single best trial's, recomputed from its stored predictions
    adopted: bool
    reason: str
    # ``cross_fitted``: ensemble and single best each chosen without the rows that score them
    cross_value: float | None = None
    cross_best_value: float | None = None

    @property
    def tag(self) -> str:
        """``12x3,4x1,7x1``: trial x weight, what the registered version records."""
        return ",".join(f"{n}x{w}" for n, w in self.members)

    def describe(self) -> str:
        what = f"ensemble of trials {', '.join(f'{n} (weight {w})' for n, w in self.members)}"
        values = (f"out-of-fold {self.metric} {self.value:.6g} vs {self.best_value:.6g} for trial {self.best_trial} "
                  "alone (the weights were chosen on the same rows, so this is optimistic)")
        if self.cross_value is not None:
            values += (f", cross-fitted (chosen without the rows scored) {self.cross_value:.6g} vs "
                       f"{self.cross_best_value:.6g} for the single best")
        verdict = "champion" if self.adopted else f"not adopted: {self.reason}"
        return f"{what}: {values}; {verdict}"

    def to_attr(self) -> dict[str, Any]:
        return {"members": [list(m) for m in self.members], "metric": self.metric, "value": self.value,
                "best_trial": self.best_trial, "best_value": self.best_value, "adopted": self.adopted,
                "reason": self.reason, "cross_value": self.cross_value, "cross_best_value": self.cross_best_value,
                "summary": self.describe()}


def select(spec: StudySpec, study: optuna.Study, tracker: Tracker, inputs: Inputs) -> Selection | None:
    """Greedy selection over the best ``spec.ensemble.candidates`` COMPLETE trials that stored
    out-of-fold predictions; None where the single best trial has none (e.g. it ran before
    ``ensemble`` was set)."""
    from tuner.selection import ranked_trials

    assert spec.ensemble is not None
    # The candidates in the one selection order (the best trial first, as promotion picks it).
    ranked = [t for t in ranked_trials(study.get_trials(deepcopy=False), spec.study_direction, spec.metric)
              if math.isfinite(float(t.value))]  # type: ignore[arg-type]
    if not ranked:
        return None
    best = ranked[0]
    sign = 1.0 if spec.study_direction == "minimize" else -1.0
    numbers: list[int] = []
    preds: list[np.ndarray] = []
    for t in ranked:
        if len(preds) == spec.ensemble.candidates:
            break
        run_id = t.user_attrs.get("mlflow_run_id")
        pred = tracker.load_predictions(run_id) if run_id else None
        if pred is None or (preds and pred.shape != preds[0].shape):
            if t is best:
                return None
            continue
        numbers.append(t.number)
        preds.append(pred.astype(np.float64))
    score = OofScorer.of(inputs)
    single = score(preds[0])[spec.metric]
    counts, metrics = greedy_select(preds, score, spec.ensemble.size, metric=spec.metric, direction=spec.study_direction)
    members = sorted(((numbers[i], c) for i, c in enumerate(counts) if c), key=lambda m: (-m[1], m[0]))
    value = float(metrics[spec.metric])
    margin = spec.ensemble.tolerance * abs(single)
    cross = cross_fitted(preds, score, spec.ensemble.size, metric=spec.metric,
                         direction=spec.study_direction) if spec.ensemble.cross_check else None
    if len(members) < 2:
        adopted, reason = False, f"the selection kept trial {members[0][0]} alone"
    elif not sign * value < sign * single - margin:
        adopted, reason = False, f"it does not beat the single best by more than {spec.ensemble.tolerance:.2%}"
    elif cross is not None and not sign * cross[0] < sign * cross[1]:
        adopted, reason = False, "cross-fitted (chosen without the rows scored), it does not beat the single best"
    elif inputs.cv.all_rows is None:
        adopted, reason = False, "its members cannot be refit on all rows (no all-rows data for this validation scheme)"
    else:
        adopted, reason = True, ""
    return Selection(members, spec.metric, value, best.number, float(single), adopted, reason,
                     *(cross if cross is not None else (None, None)))


def ensemble_run(
    spec: StudySpec, study: optuna.Study, tracker: Tracker, inputs: Inputs, device: Any = "cpu", *, held: str = ""
) -> tuple[str | None, Selection | None]:
    """Select, and where the ensemble is adopted return the run holding its checkpoint (its
    members refit on all rows, made once: a run of the same members is reused); promotion
    registers it. ``(None, selection)``: promotion registers the single best. ``held``: what the
    refit tag adds about rows left out (the test part)."""
    from tuner.model import Checkpoint
    from tuner.registry import registered_version
    from tuner.replay import trial_seed
    from tuner.tracking import tag
    from tuner.validation import refit

    selection = select(spec, study, tracker, inputs)
    if selection is None:
        return None, None
    if study.user_attrs.get(ENSEMBLE_ATTR) != selection.to_attr():
        study.set_user_attr(ENSEMBLE_ATTR, selection.to_attr())
    if not selection.adopted:
        return None, selection
    existing = registered_version(tracker, spec.model_name, spec.name, selection.best_trial, ensemble=selection.tag)
    if existing is not None:
        return existing.run_id, selection  # registered before: promotion reuses the version
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    nets = []
    for number, _ in selection.members:
        t = trials[number]
        nets.append(refit(t.params, inputs.cv, device=device, seed=trial_seed(t, 0)).model.cpu())
    checkpoint = Checkpoint.ensemble(nets, [w for _, w in selection.members])
    run_id = tracker.start_ensemble(spec.name, selection.tag)
    tracker.save_checkpoint(run_id, checkpoint)
    rows = len(inputs.cv.all_rows.x_train) if inputs.cv.all_rows is not None else 0
    tracker.end_run(run_id, "FINISHED", {tag("refit"): f"all {rows} rows{held}",
                                         tag("ensemble_summary"): selection.describe()[:5000]})
    return run_id, selection
