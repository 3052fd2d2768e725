"""Registering a study's best trial: once, under the study lock, whoever finishes the study.

A launch, the last worker of a shared study and ``tuner promote`` all go through ``promote``:
the best COMPLETE trial (``selection.best_trial``, the one selection rule) is refit on every row the
trials saw, whatever the validation scheme (scikit-learn's ``refit=True``; ``validation.refit =
false`` keeps a holdout trial's own model), scored once on the untouched test part if the study
has one, logged as a pickle-free MLflow model, registered with the rows it was fit on and its test
estimate, and given ``champion`` if it beats the current champion (else ``challenger``). Two
processes that finish together register it once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tuner.errors import TunerError
from tuner.lock import StudyLock
from tuner.selection import best_trial

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from tuner.config import StudySpec
    from tuner.inputs import Inputs, UntouchedPart
    from tuner.model import EnsembleNet, TabularNet
    from tuner.registry import Promotion
    from tuner.tracking import Tracker

__all__ = ["promote", "promote_study", "score_rows", "champion_verdict", "PROMOTED_ATTR", "TEST_ATTR", "REFIT_TAG", "TEST_TAG"]

PROMOTED_ATTR = "promoted_trial"  # study user attr: the trial registered last
TEST_ATTR = "test_estimate"  # study user attr: {"trial", "rows", "metrics"} of the champion on the test part
REFIT_TAG = "tuner.refit"  # (tracking.tag("refit")) run and version tag: the rows the registered model was fit on
TEST_TAG = "tuner.test_"  # + metric: run and version tags, the champion's metrics on the test part


def promote(
    spec: StudySpec, study: optuna.Study, tracker: Tracker, inputs: Inputs, lock: StudyLock, device: Any = "cpu"
) -> Promotion | None:
    """Register the best trial's model and move ``champion`` if it is better; None: no COMPLETE
    trial yet. Idempotent: the version of a trial already registered is reused, a trial refit
    (or scored) once is not refit (or scored) again."""
    from tuner.registry import promote as register
    from tuner.registry import registered_version

    with lock:
        best = best_trial(study)
        if best is None:
            return None
        run_id, number, value = best.user_attrs["mlflow_run_id"], best.number, float(best.value)  # type: ignore[arg-type]
        members: str | None = None  # "trial x weight, ..." of an adopted ensemble
        note: str | None = None
        if spec.ensemble is not None:  # a top-k ensemble where it beats the single best (tuner.ensemble)
            from tuner.ensemble import ensemble_run

            chosen, selection = ensemble_run(spec, study, tracker, inputs, device, held=_held(inputs))
            note = selection.describe() if selection is not None else "ensemble: the best trial stored no predictions"
            if chosen is not None and selection is not None:
                run_id, number, value, members = chosen, selection.best_trial, selection.value, selection.tag
        tags = dict(tracker.client.get_run(run_id).data.tags)
        if registered_version(tracker, spec.model_name, spec.name, number, ensemble=members) is None:
            if REFIT_TAG not in tags:  # an ensemble's run is refit when it is made
                tags.update(_refit(best, inputs, tracker, device))
            if inputs.test is not None and TEST_TAG + spec.metric not in tags:
                tags.update(_score_test(run_id, inputs.test, tracker))
        promotion = register(
            tracker,
            model_name=spec.model_name,
            run_id=run_id,
            study_name=spec.name,
            trial_number=number,
            metric=spec.metric,
            value=value,
            direction=spec.study_direction,
            space_hash=spec.space_hash(),
            # Raw rows: promote takes the model's input columns, typed for its signature.
            input_example=inputs.frame.head(5),
            tags={k: v for k, v in tags.items() if k == REFIT_TAG or k.startswith(TEST_TAG)},
            ensemble=members,
        )
        if note is not None:
            promotion = replace(promotion, ensemble=note)
        if study.user_attrs.get(PROMOTED_ATTR) != best.number:
            study.set_user_attr(PROMOTED_ATTR, best.number)
        test = {k.removeprefix(TEST_TAG): float(v) for k, v in tags.items() if k.startswith(TEST_TAG) and k != TEST_TAG + "rows"}
        if test:
            estimate = {"trial": best.number, "rows": int(tags.get(TEST_TAG + "rows", 0)), "metrics": test}
            if study.user_attrs.get(TEST_ATTR) != estimate:
                study.set_user_attr(TEST_ATTR, estimate)
        return promotion


def _refit(best: optuna.trial.FrozenTrial, inputs: Inputs, tracker: Tracker, device: Any) -> dict[str, str]:
    """Train the best trial's params (its epochs, its seed) on every row the trials saw through
    ``train()`` and store the weights in the trial's run, where promotion looks for them (a
    holdout trial's own weights are replaced: ``tuner replay`` retrains them). Returns the tag
    naming those rows; with ``refit = false`` nothing is trained and the tag says so."""
    from tuner.model import Checkpoint
    from tuner.replay import trial_seed
    from tuner.validation import refit

    cv = inputs.cv
    run_id = best.user_attrs["mlflow_run_id"]
    held = _held(inputs)
    if cv.all_rows is None:
        tags = {REFIT_TAG: f"no (refit = false): the trial's own model, fit on {len(inputs.prepared.x_train)} rows{held}"}
    else:
        result = refit(best.params, cv, device=device, seed=trial_seed(best, 0))
        state = {k: v.cpu() for k, v in result.model.state_dict().items()}
        tracker.save_checkpoint(run_id, Checkpoint(result.model.config, state))
        tags = {REFIT_TAG: f"all {len(cv.all_rows.x_train)} rows{held}"}
    tracker.end_run(run_id, "FINISHED", tags)
    return tags


def _held(inputs: Inputs) -> str:
    return f" (the {len(inputs.test.frame)} test rows left out)" if inputs.test is not None else ""


def _score_test(run_id: str, test: UntouchedPart, tracker: Tracker) -> dict[str, str]:
    """The registered model's metrics on the test part (raw rows, as ``tuner predict`` reads
    them), recorded as tags of the trial's run."""
    checkpoint, _ = tracker.load_checkpoint(run_id)
    metrics = score_rows(checkpoint.build(), test.frame)
    tags = {f"{TEST_TAG}{k}": repr(v) for k, v in metrics.items()}
    tags[TEST_TAG + "rows"] = str(len(test.frame))
    tracker.end_run(run_id, "FINISHED", tags)
    return tags


def score_rows(net: TabularNet | EnsembleNet, frame: pd.DataFrame) -> dict[str, float]:
    """A model's metrics on raw rows that hold its target (``train.evaluate``'s metrics)."""
    import warnings

    import numpy as np
    import torch

    from tuner.errors import DataError
    from tuner.model import encode_frame
    from tuner.train import output_metrics

    config = net.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # imputations: the test rows may need ones training did not
        x = torch.as_tensor(encode_frame(net, frame)[0])
    labels = frame[config.target].to_numpy()
    if config.task == "regression":
        y = torch.as_tensor(labels.astype(np.float64), dtype=torch.float32)
    else:
        index = {c: i for i, c in enumerate(config.classes or [])}
        unknown = sorted({str(v) for v in labels if v not in index})
        if unknown:
            raise DataError(f"test rows hold classes {unknown} the model never saw; lower validation.test_fraction")
        y = torch.as_tensor([index[v] for v in labels], dtype=torch.long)
    net.eval()
    with torch.inference_mode():  # forward: target units (regression) or logits, a single net or an ensemble
        out = net(x)
    names, values = output_metrics(out, y, config.task, torch.zeros(()), torch.ones(()))
    return dict(zip(names, values.tolist()))


def champion_verdict(
    spec: StudySpec,
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    metrics: dict[str, float],
    reference: dict[str, dict[str, float]],
    test_reference: dict[str, dict[str, float]] | None,
) -> tuple[dict[str, Any] | None, bool, str]:
    """``(test estimate, beats the baselines, verdict)`` for the launch summary and ``tuner best``:
    the best trial's estimate on the untouched test part (None without one), and the verdict on
    the test part where there is one (neither the champion nor a baseline was chosen there), else
    on the validation ``metrics`` against the validation baselines ``reference``."""
    from tuner.baselines import verdict

    estimate = study.user_attrs.get(TEST_ATTR)
    test = estimate if estimate and estimate.get("trial") == best.number else None
    if test is not None and test_reference:
        value, against, tuned = float(test["metrics"][spec.metric]), test_reference, test["metrics"]
    else:
        value, against, tuned = float(best.value), reference, metrics  # type: ignore[arg-type]
    beats, text = verdict(spec.metric, spec.study_direction, value, against, tuned)
    return test, beats, text


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
