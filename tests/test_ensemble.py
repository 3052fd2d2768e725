"""The top-k ensemble champion: greedy selection, its out-of-fold estimate from the stored
predictions, one pickle-free model through both loaders, and no ensemble that does not win."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CARS, mlflow_store, run_tuner, tuner_env, write_study
from tuner.ensemble import OofScorer, cross_fitted, greedy_select
from tuner.model import Checkpoint, ModelConfig, TabularNet, predict_frame

SPACE = (
    'lr = { type = "float", low = 1e-2, high = 2e-1, log = true }\n'
    'epochs = { type = "int", low = 8, high = 12 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)


def test_greedy_selection_picks_the_pair_whose_errors_cancel_and_keeps_the_best_prefix() -> None:
    """A = y + d, B = y - 1.1 d, C = y + 3 d: A alone is best, A + B averages to y - 0.05 d; the
    later picks (A, then B again) never do better, so the weights stay A 1, B 1, C 0."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=40)
    d = rng.normal(size=40)
    preds = [(y + d)[None], (y - 1.1 * d)[None], (y + 3 * d)[None]]
    score = OofScorer([(0, np.arange(40), torch.tensor(y, dtype=torch.float32))], "regression")
    counts, metrics = greedy_select(preds, score, 4, metric="rmse", direction="minimize")
    assert counts == [1, 1, 0]
    assert metrics["rmse"] == pytest.approx(float(np.sqrt(np.mean((0.05 * d) ** 2))), rel=1e-4)
    counts, metrics = greedy_select(preds, score, 4, metric="r2", direction="maximize")
    assert counts == [1, 1, 0]
    # classification: probabilities are averaged; two confident half-right models make one right one
    labels = torch.tensor([0, 1, 0, 1])
    p1 = np.array([[0.9, 0.1], [0.6, 0.4], [0.9, 0.1], [0.6, 0.4]])  # right on rows 0 and 2
    p2 = np.array([[0.4, 0.6], [0.1, 0.9], [0.4, 0.6], [0.1, 0.9]])  # right on rows 1 and 3
    score = OofScorer([(0, np.arange(4), labels)], "classification")
    counts, metrics = greedy_select([p1[None], p2[None]], score, 3, metric="accuracy", direction="maximize")
    assert counts == [1, 1] and metrics["accuracy"] == 1.0


def test_cross_fitting_rejects_picks_that_only_fit_the_rows_they_were_chosen_on() -> None:
    """B cancels A's error on fold 0 and doubles it on fold 1: averaged out of fold, A + B wins
    (0.75 vs 1.0); picked on one fold and scored on the other it loses (1.25 vs 1.0)."""
    y = np.linspace(0.0, 5.0, 20)
    a = y + 1.0
    b = np.where(np.arange(20) < 10, y - 1.0, y + 2.0)
    score = OofScorer([(0, np.arange(10), torch.tensor(y[:10])), (0, np.arange(10, 20), torch.tensor(y[10:]))], "regression")
    counts, metrics = greedy_select([a[None], b[None]], score, 2, metric="rmse", direction="minimize")
    assert counts == [1, 1] and metrics["rmse"] == pytest.approx(0.75)
    assert cross_fitted([a[None], b[None]], score, 2, metric="rmse", direction="minimize") == pytest.approx((1.25, 1.0))
    # one split: its validation rows are dealt into fifths
    one = OofScorer([(0, np.arange(20), torch.tensor(y))], "regression")
    assert [len(outer.fits[0][1]) for _, outer in one.cross_fit()] == [4] * 5


def test_an_ensemble_checkpoint_loads_weights_only_and_predicts_the_weighted_average(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"a": np.linspace(-1, 1, 7), "b": np.linspace(2, 0, 7)})
    for classes in (None, ["x", "y", "z"]):
        task = "regression" if classes is None else "classification"
        nets = []
        for seed, (hidden, act) in enumerate([(4, "relu"), (0, "relu"), (6, "tanh")]):
            torch.manual_seed(seed)
            net = TabularNet(ModelConfig(["a", "b"], "t", task, hidden_size=hidden, activation=act, classes=classes))
            net.set_scaling([0.1, 1.0], [0.5, 2.0], 3.0, 2.0)
            nets.append(net.eval())
        path = tmp_path / "checkpoint.pt"
        torch.save(Checkpoint.ensemble(nets, [3, 1, 1]).to_payload(), path)
        loaded = Checkpoint.from_payload(torch.load(path, weights_only=True)).build()
        if classes is None:
            expected = (3 * predict_frame(nets[0], frame) + predict_frame(nets[1], frame) + predict_frame(nets[2], frame)) / 5
            np.testing.assert_allclose(predict_frame(loaded, frame), expected, rtol=1e-5)
        else:
            probs = [predict_frame(n, frame, proba=True).to_numpy() for n in nets]
            got = predict_frame(loaded, frame, proba=True)
            assert list(got.columns) == classes
            np.testing.assert_allclose(got.to_numpy(), (3 * probs[0] + probs[1] + probs[2]) / 5, rtol=1e-5)
    nets[1].set_scaling([0.0, 1.0], [0.5, 2.0], 3.0, 2.0)
    with pytest.raises(ValueError, match="share their columns, encoder and standardiser"):
        Checkpoint.ensemble(nets, [1, 1, 1])


@pytest.fixture(scope="module")
def cv_study(tmp_path_factory: pytest.TempPathFactory):
    """A 4-fold cars study (fused) whose ensemble beats its single best trial out of fold
    (not cross-fitted: on 32 cars the picks do not hold up on rows they were not chosen on)."""
    from tuner.config import load_spec
    from tuner.session import launch

    root = tmp_path_factory.mktemp("ensemble")
    path = write_study(root, "ens", n_trials=8, execution="fused", registered_model="ens-cars",
                       storage=f"sqlite:///{root / 'optuna.db'}", tracking_uri=mlflow_store(root / "mlflow.db"),
                       body="ensemble = { size = 6, tolerance = 0.0, cross_check = false }\n[validation]\nfolds = 4\n", space=SPACE)
    spec = load_spec(path)
    summary = launch(spec, progress=False, report=False)
    return spec, summary


def test_the_ensembles_out_of_fold_estimate_recomputes_from_the_stored_predictions(cv_study) -> None:
    from tuner.study import open_study
    from tuner.tracking import Tracker
    from tuner.validation import kfold_indices

    spec, summary = cv_study
    study = open_study(spec, spec.storage_url, create=False)
    sel = study.user_attrs["ensemble"]
    assert sel["adopted"], sel["summary"]
    assert summary.promotion.ensemble.startswith("ensemble of trials") and summary.promotion.alias == "champion"
    tracker = Tracker(spec.tracking, spec.name)
    trials = {t.number: t for t in study.trials}
    members = sel["members"]
    assert len(members) >= 2 and sum(w for _, w in members) <= spec.ensemble.size
    oof = {n: tracker.load_predictions(trials[n].user_attrs["mlflow_run_id"]) for n, _ in members}
    assert all(p.dtype == np.float32 and p.shape == (1, 32) for p in oof.values())
    average = sum(w * oof[n].astype(np.float64) for n, w in members) / sum(w for _, w in members)
    y = np.loadtxt(CARS, delimiter=",", skiprows=1, usecols=1)  # mpg
    folds = kfold_indices(y, 4, seed=spec.validation_seed)

    def cv_rmse(pred: np.ndarray) -> float:
        return float(np.mean([np.sqrt(np.mean((pred[0, val] - y[val]) ** 2)) for _, val in folds]))

    assert sel["value"] == pytest.approx(cv_rmse(average), rel=1e-5)
    best = study.best_trial
    assert sel["best_trial"] == best.number
    best_oof = tracker.load_predictions(best.user_attrs["mlflow_run_id"])
    assert sel["best_value"] == pytest.approx(best.value, rel=1e-5) == pytest.approx(cv_rmse(best_oof), rel=1e-5)
    assert sel["value"] < sel["best_value"]
    version = tracker.champion(spec.model_name)
    assert version.tags["tuner.ensemble"] == ",".join(f"{n}x{w}" for n, w in members)
    assert float(version.tags["tuner.value"]) == pytest.approx(sel["value"])


@pytest.mark.slow
def test_the_ensemble_champion_reloads_pickle_free_through_both_loaders(cv_study, tmp_path: Path, monkeypatch) -> None:
    """``tuner predict`` and ``mlflow.pyfunc.load_model`` (pickle refused) give the weighted
    average of the members, each refit on all rows through ``train()`` here independently."""
    import mlflow
    import pandas as pd

    from tuner.inputs import load_inputs
    from tuner.replay import trial_seed
    from tuner.study import open_study
    from tuner.validation import refit

    spec, _ = cv_study
    study = open_study(spec, spec.storage_url, create=False)
    members = study.user_attrs["ensemble"]["members"]
    inputs = load_inputs(spec)
    frame = pd.read_csv(CARS)
    trials = {t.number: t for t in study.trials}
    preds = [predict_frame(refit(trials[n].params, inputs.cv, device="cpu", seed=trial_seed(trials[n], 0)).model.cpu(), frame)
             for n, _ in members]
    expected = sum(w * p for (_, w), p in zip(members, preds)) / sum(w for _, w in members)

    out = tmp_path / "pred.csv"
    proc = run_tuner("predict", f"{spec.model_name}@champion", "--input", str(CARS), "--output", str(out),
                     "--tracking-uri", spec.tracking, cwd=tmp_path, env=tuner_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(pd.read_csv(out)["prediction"].to_numpy(), expected, rtol=1e-4)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(spec.tracking)
    model = mlflow.pyfunc.load_model(f"models:/{spec.model_name}@champion")
    np.testing.assert_allclose(np.asarray(model.predict(frame.drop(columns=["mpg"]))), expected, rtol=1e-4)


def test_an_ensemble_that_does_not_beat_the_single_best_is_not_registered(tmp_path: Path) -> None:
    """A one-split (holdout) study stores its trials' validation predictions; with a tolerance no
    ensemble can clear, the single best trial is the champion and the summary says why."""
    from tuner.config import load_spec
    from tuner.session import launch
    from tuner.tracking import Tracker

    path = write_study(tmp_path, "noens", n_trials=4, execution="sequential", registered_model="noens",
                       storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=mlflow_store(tmp_path / "mlflow.db"),
                       body="ensemble = { size = 5, tolerance = 100.0 }\n[validation]\nfraction = 0.25\n", space=SPACE)
    spec = load_spec(path)
    summary = launch(spec, progress=False, report=False)
    assert summary.promotion is not None and summary.promotion.trial_number == summary.best_number
    assert "not adopted" in summary.promotion.ensemble
    tracker = Tracker(spec.tracking, spec.name)
    assert [v.tags.get("tuner.ensemble") for v in tracker.model_versions(spec.model_name)] == [None]
    runs = tracker.trial_runs(spec.name)
    assert len(runs) == 4
    assert {tracker.load_predictions(r.info.run_id).shape for r in runs if r.info.status == "FINISHED"} == {(1, 8)}


@pytest.mark.slow
def test_tuner_promote_in_another_process_selects_the_same_ensemble_from_the_stored_predictions(cv_study, tmp_path: Path) -> None:
    spec, summary = cv_study
    proc = run_tuner("promote", str(spec.source), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"already registered: {summary.promotion.model_uri}" in proc.stdout
    assert summary.promotion.ensemble in proc.stdout


def test_a_one_split_study_with_all_rows_gets_its_ensemble_refit_on_them(tmp_path: Path) -> None:
    """Where the validation data has all rows (cross-validation; a one-split study once its
    champion is refit on all rows too), an adopted ensemble of a one-split study is registered:
    selected on the validation rows, its members refit on all 32 cars."""
    from dataclasses import replace

    from tuner.config import load_spec
    from tuner.data import prepare_table, study_table
    from tuner.inputs import load_inputs
    from tuner.lock import StudyLock
    from tuner.promotion import promote
    from tuner.session import launch
    from tuner.study import open_study
    from tuner.tracking import Tracker

    path = write_study(tmp_path, "holdout", n_trials=6, execution="sequential", registered_model="holdout-ens",
                       storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=mlflow_store(tmp_path / "mlflow.db"),
                       body="ensemble = { size = 4, tolerance = 0.0, cross_check = false }\n[validation]\nfraction = 0.25\n",
                       space=SPACE)
    spec = load_spec(path)
    launch(spec, progress=False, report=False, promote=False)
    inputs = load_inputs(spec)
    everything = np.arange(32)
    all_rows = prepare_table(study_table(spec, inputs.frame), fraction=0.25, seed=spec.validation_seed, split=(everything, everything))
    inputs = replace(inputs, cv=replace(inputs.cv, all_rows=all_rows))
    study = open_study(spec, spec.storage_url, create=False)
    tracker = Tracker(spec.tracking, spec.name)
    lock = StudyLock(spec.storage_url, spec.name)
    try:
        promotion = promote(spec, study, tracker, inputs, lock)
    finally:
        lock.close()
    assert promotion is not None and promotion.ensemble.endswith("champion"), promotion.ensemble
    version = tracker.champion(spec.model_name)
    assert version.tags["tuner.ensemble"] == ",".join(f"{n}x{w}" for n, w in study.user_attrs["ensemble"]["members"])
    assert tracker.client.get_run(version.run_id).data.tags["tuner.refit"] == "all 32 rows"
