"""Search space: study-file parameters -> Optuna ``suggest_*`` calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from tuner.config import CategoricalParam, FixedParam, FloatParam, IntParam

if TYPE_CHECKING:
    import optuna

__all__ = ["sample", "describe_change", "incompatible_changes"]


def sample(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """One value per parameter. Fixed values are one-choice categoricals, so they are stored
    with the trial (visible in the dashboard, replayable) at no cost to the sampler."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        if isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            params[name] = trial.suggest_categorical(name, p.choices)
        elif isinstance(p, FixedParam):
            params[name] = trial.suggest_categorical(name, [p.value])
        else:  # pragma: no cover - config validation admits only the four kinds
            raise TypeError(f"unknown parameter kind {type(p).__name__}")
    return params


def describe_change(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """A short text of what differs between two search spaces (as ``StudySpec.space_dict()``)."""
    parts = []
    for name in sorted(set(stored) | set(current)):
        old, new = stored.get(name), current.get(name)
        if old == new:
            continue
        if old is None:
            parts.append(f"+{name} {new}")
        elif new is None:
            parts.append(f"-{name} {old}")
        else:
            changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            parts.append(f"{name}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return "; ".join(parts)


def incompatible_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Changes Optuna cannot take within one study (one distribution per parameter name): another
    kind (float/int/choice), another log setting, other choices. Ranges may move; names may come
    and go."""

    def distribution(p: Mapping[str, Any]) -> tuple[str, Any]:
        if p["type"] == "fixed":
            return "choice", [p["value"]]
        if p["type"] == "categorical":
            return "choice", list(p["choices"])
        return p["type"], bool(p.get("log"))

    problems = []
    for name in sorted(set(stored) & set(current)):
        (old_kind, old), (new_kind, new) = distribution(stored[name]), distribution(current[name])
        if old_kind != new_kind:
            problems.append(f"{name} changed from {old_kind} to {new_kind}")
        elif old != new:
            problems.append(f"{name} {'choices' if old_kind == 'choice' else 'log'} changed from {old!r} to {new!r}")
    return problems
