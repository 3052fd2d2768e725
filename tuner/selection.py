"""Which trial is best: the one selection rule every path uses (promotion, ``tuner best``,
``tuner promote``, reports, the progress line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

__all__ = ["TIE_BREAK", "TIE_RTOL", "best_trial", "ranked_trials", "trial_metric", "study_metric"]


# Ties on the study's metric are broken by a second one: accuracy (and macro-F1) on a few dozen
# validation rows takes few distinct values, so trials tie often, and Optuna's best_trial then
# gives the earliest. Log loss, a proper scoring rule, tells a confident right model from a lucky
# one (seen: equal accuracy, log loss 0.147 vs 0.065). Selecting on log loss outright would pick
# by another metric than the one the user chose and the sampler optimises; breaking its ties
# keeps that metric first. Regression metrics are continuous: trial order breaks their ties.
TIE_BREAK: dict[str, str] = {"accuracy": "log_loss", "f1_macro": "log_loss"}  # minimised
TIE_RTOL = 1e-6  # trials' metrics are float32: closer values are the same value


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best COMPLETE trial, as every path selects it (promotion, ``tuner best``,
    ``tuner promote``, reports, progress): see ``ranked_trials``. None: no complete trial."""
    ranked = ranked_trials(study.get_trials(deepcopy=False), study.direction.name.lower(), study_metric(study))
    return ranked[0] if ranked else None


def ranked_trials(
    trials: list[optuna.trial.FrozenTrial], direction: str, metric: str | None
) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials best first: by value, values within ``TIE_RTOL`` tied and ordered by
    the metric's ``TIE_BREAK`` (lower first; a trial without it after those with it), then by
    trial number."""
    import math

    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    sign = -1.0 if direction == "maximize" else 1.0
    complete.sort(key=lambda t: (sign * float(t.value), t.number))  # type: ignore[arg-type]
    second = TIE_BREAK.get(metric or "")
    ranked: list[optuna.trial.FrozenTrial] = []
    i = 0
    while i < len(complete):  # runs of tied values (sorted: the ties of a value follow it)
        head, j = float(complete[i].value), i + 1  # type: ignore[arg-type]
        while j < len(complete) and math.isclose(float(complete[j].value), head, rel_tol=TIE_RTOL, abs_tol=1e-12):  # type: ignore[arg-type]
            j += 1
        tied = complete[i:j]
        if second:
            tied.sort(key=lambda t: (trial_metric(t, second) is None, trial_metric(t, second) or 0.0, t.number))
        ranked += tied
        i = j
    return ranked


def trial_metric(trial: optuna.trial.FrozenTrial, name: str) -> float | None:
    """A validation metric a trial recorded (a user attribute per metric), or None."""
    value = trial.user_attrs.get(name)
    if value is None and isinstance(trial.user_attrs.get("metrics"), dict):
        value = trial.user_attrs["metrics"].get(name)
    return float(value) if isinstance(value, (int, float)) else None


def study_metric(study: optuna.Study) -> str | None:
    """The metric a study optimises (what ``open_study`` records), or None."""
    names = study.metric_names
    return names[0] if names else study.user_attrs.get("metric")
