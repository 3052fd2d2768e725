"""Warm start: known-good params run first, as Optuna's enqueued (WAITING) trials.

Two sources: the study file's ``[[enqueue]]`` tables (checked against the search space when the
file is loaded, ``config.fit_problems``) and ``tuner launch STUDY --warm-start-from OTHER[:K]``,
the K best COMPLETE trials of another study (same selection rule as the champion's) with the
params that fit this space. Both go through ``study.enqueue_trial(params, skip_if_exists=True)``
under the study lock, so a relaunch, or every worker of a pool, enqueues them once. The gate
hands WAITING trials out first and counts them as any trial once they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuner.config import fit_problems, fit_value
from tuner.errors import ConfigError, StorageError, redact_url

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec

__all__ = ["enqueue_known", "parse_warm_start", "warm_start_params", "DEFAULT_WARM_START"]

DEFAULT_WARM_START = 5  # trials taken from the other study when K is not given


def parse_warm_start(text: str) -> tuple[str, int]:
    """``OTHER[:K]`` -> ``(OTHER, K)``; OTHER is a study name in this study's storage, or a
    study file (its own storage and name).

    Raises:
        ConfigError: K is not a whole number > 0, or OTHER is empty.
    """
    name, sep, count = text.rpartition(":")
    if not sep or not count.lstrip("-").isdigit():
        name, count = text, str(DEFAULT_WARM_START)  # no ":K" (a path may hold a ':' of its own)
    if not name or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--warm-start-from {text!r}: write OTHER_STUDY[:K] with K a whole number > 0, e.g. cars-mlp:5")
    return name, int(count)


def warm_start_params(
    other: optuna.Study, spec: StudySpec, k: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """The params of ``other``'s ``k`` best COMPLETE trials that fit ``spec``'s space, and one
    note naming the params dropped (names not in this space, values outside it)."""
    from tuner.selection import ranked_trials, study_metric

    chosen: list[dict[str, Any]] = []
    dropped: dict[str, list[int]] = {}
    for trial in ranked_trials(other.get_trials(deepcopy=False), other.direction.name.lower(), study_metric(other))[:k]:
        bad = dict(fit_problems(trial.params, spec.space))
        for name in bad:
            dropped.setdefault(name, []).append(trial.number)
        params = {n: fit_value(n, v, spec.space) for n, v in trial.params.items() if n not in bad}
        if params:
            chosen.append(params)
    notes = []
    if dropped:
        which = ", ".join(f"{n} (trial{'s' if len(t) > 1 else ''} {', '.join(map(str, t))})" for n, t in sorted(dropped.items()))
        notes.append(f"warm start: dropped params of study {other.study_name!r} that do not fit this search space "
                     f"(the sampler draws them): {which}")
    return chosen, notes


def enqueue_known(study: optuna.Study, spec: StudySpec, warm_start: str | None, url: str) -> list[str]:
    """Enqueue the study file's ``[[enqueue]]`` params and, with ``warm_start``, the other
    study's best; returns the lines to print (none when nothing new was enqueued). Call under
    the study lock: ``skip_if_exists`` is a read then a write.

    Raises:
        StorageError: the other study does not exist (the studies there are listed).
        ConfigError: a bad ``OTHER[:K]``.
    """
    lines: list[str] = []
    sources: list[tuple[str, list[dict[str, Any]]]] = []
    if spec.enqueue:
        sources.append(("the study file's [[enqueue]]", [{n: fit_value(n, v, spec.space) for n, v in p.items()} for p in spec.enqueue]))
    if warm_start:
        other = _other_study(warm_start, spec, url)
        name, k = parse_warm_start(warm_start)
        best, notes = warm_start_params(other, spec, k)
        lines += notes
        sources.append((f"the {len(best)} best trials of study {other.study_name!r}", best))
    for label, batch in sources:
        before = len(study.get_trials(deepcopy=False))
        for known in batch:
            study.enqueue_trial(known, skip_if_exists=True)
        added = len(study.get_trials(deepcopy=False)) - before
        if added:
            lines.append(f"warm start: {added} trial(s) enqueued from {label}"
                         + (f" ({len(batch) - added} already in the study)" if added < len(batch) else ""))
    return lines


def _other_study(warm_start: str, spec: StudySpec, url: str) -> optuna.Study:
    import optuna

    from tuner.study import open_storage

    name, _ = parse_warm_start(warm_start)
    if name.endswith(".toml"):
        from tuner.config import load_spec

        other_spec = load_spec(name)
        name, url = other_spec.name, other_spec.storage_url
        from tuner.stores import require_storage

        require_storage(url, other_spec.source)
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name != spec.name]
        raise StorageError(
            f"--warm-start-from: no study {name!r} in {redact_url(url)} (other studies there: {names}); "
            "name one of them, or pass its study file (OTHER.toml[:K])"
        ) from None
