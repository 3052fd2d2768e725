"""Links between a study's trials, their MLflow runs and the registered model.

optuna-dashboard shows a Markdown note per trial and per study (``optuna_dashboard.save_note``):
tuner writes each trial's MLflow run link, state and validation metric there, and the study's
note links the MLflow experiment and the champion. The notes are written in one pass at the end
of a launch, not inside the objective, so a trial pays nothing for them.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable

from tuner.links import dashboard_base

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.registry import Promotion
    from tuner.tracking import Tracker

__all__ = [
    "study_url",
    "trial_url",
    "trial_note",
    "write_notes",
    "write_launch_notes",
    "read_note",
    "best_links",
    "rebase_notes",
    "rebase_study_notes",
]


def study_url(study: optuna.Study) -> str:
    return f"{dashboard_base()}/dashboard/studies/{study._study_id}"


def trial_url(study: optuna.Study, number: int) -> str:
    return f"{study_url(study)}/trials?numbers={number}"


def _note_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Any:
    # save_note/get_note read only .storage, .study._study_id and ._trial_id of a live Trial;
    # building a real optuna.Trial for a finished one would call the sampler's before_trial.
    return SimpleNamespace(storage=study._storage, study=study, _trial_id=trial._trial_id)


def trial_note(trial: optuna.trial.FrozenTrial, metric: str, run_url: str | None) -> str:
    """The Markdown note of one finished trial."""
    lines = [f"**{trial.state.name}**"]
    value = trial.user_attrs.get(metric, trial.value)
    if value is not None:
        lines[0] += f" · validation {metric} = {float(value):.6g}"
    if run_url:
        lines.append(f"MLflow run: [{trial.user_attrs.get('mlflow_run_id', 'run')}]({run_url})")
    reason = trial.user_attrs.get("stop_reason")
    if reason:
        lines.append(f"Stopped: {reason}")
    return "\n\n".join(lines)


def write_notes(
    study: optuna.Study,
    trials: Iterable[optuna.trial.FrozenTrial],
    *,
    spec: StudySpec,
    tracker: Tracker,
    promotion: Promotion | None = None,
) -> int:
    """Write the note of each given trial and the study's note; returns the trial notes written."""
    save_note = _notes().save_note
    n = 0
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        save_note(_note_target(study, t), trial_note(t, spec.metric, tracker.run_url(run_id) if run_id else None))
        n += 1
    lines = [
        f"MLflow experiment: [{spec.name}]({tracker.experiment_url()})",
        f"Search space hash: `{spec.space_hash()}`",
    ]
    if promotion is not None:
        url = tracker.model_version_url(promotion.model_name, promotion.version)
        lines.append(
            f"Best trial {promotion.trial_number} ({spec.metric} = {promotion.value:.6g}) is registered as "
            f"[{promotion.model_name} version {promotion.version}]({url}), alias `{promotion.alias}`: "
            f"`tuner predict {promotion.model_name}@{promotion.alias} --input FILE.csv`"
        )
    save_note(study, "\n\n".join(lines))
    return n


def read_note(study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> str:
    """A trial's note (or the study's with ``trial=None``); empty when none was written."""
    return str(_notes().get_note(study if trial is None else _note_target(study, trial)))


def write_launch_notes(
    study: optuna.Study, parent_run_id: str, *, spec: StudySpec, tracker: Tracker, promotion: Promotion | None
) -> int:
    """Notes for exactly the trials this launch ran (its parent run's children), and the study's.

    A failure here is a warning, not a failed launch: the trials and the model are already stored.
    """
    import warnings

    try:
        ran = {r.info.run_id for r in tracker.runs_of(parent_run_id)}
        trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("mlflow_run_id") in ran]
        return write_notes(study, trials, spec=spec, tracker=tracker, promotion=promotion)
    except Exception as e:  # storage hiccup after the work is done
        warnings.warn(f"could not write the optuna-dashboard notes: {e}", stacklevel=2)
        return 0


def best_links(
    study: optuna.Study, best: optuna.trial.FrozenTrial, *, spec: StudySpec, tracker: Tracker
) -> dict[str, Any]:
    """Every link of the best trial: dashboard pages, MLflow run and experiment, the champion
    version's page and lineage tags. Keys are added to ``tuner best``'s JSON."""
    links: dict[str, Any] = {
        "dashboard_study_url": study_url(study),
        "dashboard_trial_url": trial_url(study, best.number),
        "mlflow_experiment_url": tracker.experiment_url(),
    }
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        links["mlflow_run_url"] = tracker.run_url(run_id)
        parent = tracker.parent_of(run_id)
        if parent:
            links["mlflow_launch_run_url"] = tracker.run_url(parent)
    champion = tracker.champion(spec.model_name)
    if champion is not None:
        links["champion_url"] = tracker.model_version_url(spec.model_name, champion.version)
        links["champion_tags"] = {k: v for k, v in sorted(champion.tags.items()) if k.startswith("tuner.")}
        links["champion_run_url"] = tracker.run_url(champion.run_id) if champion.run_id else None
    return links


# ](BASE/#/experiments/ID...) or ](BASE/#/models/...) in a note's Markdown
_LINK = re.compile(r"\]\((?P<base>https?://[^)\s#]*?)/?#/(?P<path>[^)\s]*)\)")


def _rebased(text: str, base: str) -> str:
    def fix(m: re.Match[str]) -> str:
        path = m.group("path")
        if re.fullmatch(r"experiments/[^/]+", path):  # an experiment's overview -> its runs
            path += "/runs"
        return f"]({base.rstrip('/')}/#/{path})"

    return _LINK.sub(fix, text)


def rebase_notes(study: optuna.Study, base: str) -> int:
    """Point the MLflow links in a study's optuna-dashboard notes at ``base`` (e.g. the port
    ``tuner ui`` serves now) and at the runs view; returns the notes rewritten (0: already right).

    Only the study's note is read when nothing needs to change.
    """
    save_note = _notes().save_note

    study_note = read_note(study)
    if not study_note or _rebased(study_note, base) == study_note:
        return 0
    n = 0
    for t in study.get_trials(deepcopy=False):
        note = read_note(study, t)
        new = _rebased(note, base) if note else note
        if new != note:
            save_note(_note_target(study, t), new)
            n += 1
    save_note(study, _rebased(study_note, base))
    return n + 1


def rebase_study_notes(storage: Any, study_name: str, base: str) -> int:
    """``rebase_notes`` for the study named ``study_name`` in ``storage`` (0 when it is not there)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0  # the dashboard still lists the storage's other studies
    return rebase_notes(study, base)


_NOTES: Any = None


def _notes() -> Any:
    """optuna-dashboard's ``save_note``/``get_note`` (its ``_note`` module, which imports only
    optuna), loaded without the package: ``import optuna_dashboard`` imports its server, and with it
    ``optuna.importance`` and scikit-learn, 2-3 s of every launch for two functions that write a
    study's system attributes. The package's own import is the fallback."""
    global _NOTES
    if _NOTES is None:
        import importlib.util

        try:
            found = importlib.util.find_spec("optuna_dashboard")  # finds the folder, imports nothing
            assert found is not None and found.submodule_search_locations
            path = Path(list(found.submodule_search_locations)[0]) / "_note.py"
            spec = importlib.util.spec_from_file_location("tuner_dashboard_note", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.save_note, module.get_note  # noqa: B018 - both must be there
            _NOTES = module
        except Exception:
            import optuna_dashboard

            _NOTES = optuna_dashboard
    return _NOTES
