"""Registering a study's best trial: once, under the study lock, whoever finishes the study.

A launch, the last worker of a shared study and ``tuner promote`` all go through ``promote``:
the best COMPLETE trial's model (refit on all rows first where the study is cross-validated) is
logged as a pickle-free MLflow model, registered, and given ``champion`` if it beats the current
champion (else ``challenger``). Two processes that finish together register it once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tuner.errors import TunerError
from tuner.lock import StudyLock
from tuner.study import best_trial

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.inputs import Inputs
    from tuner.registry import Promotion
    from tuner.tracking import Tracker

__all__ = ["promote", "promote_study", "PROMOTED_ATTR"]

PROMOTED_ATTR = "promoted_trial"  # study user attr: the trial registered last


def promote(
    spec: StudySpec, study: optuna.Study, tracker: Tracker, inputs: Inputs, lock: StudyLock, device: Any = "cpu"
) -> Promotion | None:
    """Register the best trial's model and move ``champion`` if it is better; None: no COMPLETE
    trial yet. Idempotent: the version of a trial already registered is reused."""
    with lock:
        best = best_trial(study)
        if best is None:
            return None
        note = None
        if spec.ensemble is not None:  # a top-k ensemble where it beats the single best (tuner.ensemble)
            from tuner.ensemble import promote_ensemble

            chosen, selection = promote_ensemble(spec, study, tracker, inputs, device)
            if chosen is not None:
                return chosen
            note = selection.describe() if selection is not None else "ensemble: the best trial stored no predictions"
        run_id = best.user_attrs["mlflow_run_id"]
        if inputs.cv.all_rows is not None and not tracker.has_checkpoint(run_id):
            _refit(best, inputs, tracker, device)
        from tuner.registry import promote as register

        promotion = register(
            tracker,
            model_name=spec.model_name,
            run_id=run_id,
            study_name=spec.name,
            trial_number=best.number,
            metric=spec.metric,
            value=float(best.value),  # type: ignore[arg-type]
            direction=spec.study_direction,
            space_hash=spec.space_hash(),
            # Raw rows: promote takes the model's input columns, typed for its signature.
            input_example=inputs.frame.head(5),
        )
        if note is not None:
            promotion = replace(promotion, ensemble=note)
        if study.user_attrs.get(PROMOTED_ATTR) != best.number:
            study.set_user_attr(PROMOTED_ATTR, best.number)
        return promotion


def _refit(best: optuna.trial.FrozenTrial, inputs: Inputs, tracker: Tracker, device: Any) -> None:
    """A cross-validated trial has no single model: train its params on all rows through
    ``train()`` and store the weights in the trial's run, where promotion looks for them."""
    from tuner.model import Checkpoint
    from tuner.replay import trial_seed
    from tuner.validation import refit

    cv = inputs.cv
    result = refit(best.params, cv, device=device, seed=trial_seed(best, 0))
    state = {k: v.cpu() for k, v in result.model.state_dict().items()}
    run_id = best.user_attrs["mlflow_run_id"]
    tracker.save_checkpoint(run_id, Checkpoint(result.model.config, state))
    tracker.end_run(run_id, "FINISHED", {"tuner.refit": f"all {len(cv.all_rows.x_train) if cv.all_rows else 0} rows"})


def promote_study(spec: StudySpec, *, storage: str | None = None, tracking_uri: str | None = None) -> Promotion:
    """``tuner promote``: register the best trial of a stored study.

    Raises:
        TunerError: no such study, or no complete trial yet.
    """
    from tuner.inputs import load_inputs
    from tuner.study import open_study
    from tuner.tracking import Tracker

    url = storage or spec.storage_url
    study = open_study(spec, url, create=False)
    if best_trial(study) is None:
        raise TunerError(f"study {spec.name!r} has no complete trial yet; run `tuner launch` or `tuner worker` first")
    tracker = Tracker(tracking_uri or spec.tracking, spec.name)
    lock = StudyLock(url, spec.name)
    try:
        promotion = promote(spec, study, tracker, load_inputs(spec), lock)
    finally:
        lock.close()
    assert promotion is not None
    return promotion
