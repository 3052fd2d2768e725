"""End to end: classification with text labels through the CLI, seeded reproducibility, replay,
and the cross-validated champion refit on all rows.

The CLI runs in this process (``main([...])``) and both tests share one MLflow store: creating a
fresh MLflow SQLite store costs seconds (its migrations), a subprocess another few for imports.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import CARS, mlflow_store, write_study
from tuner.browse import best_info
from tuner.cli import main
from tuner.config import load_spec
from tuner.replay import replay
from tuner.session import launch

SPACE = (
    'lr = { type = "float", low = 1e-2, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 3, high = 5 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    'dropout = { type = "float", low = 0.0, high = 0.3 }\n'
)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return mlflow_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def tuner(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``tuner ARGS`` in this process (``--debug``: an error raises here instead of exit 2)."""
    capsys.readouterr()
    assert main(["--debug", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_text_labels_round_trip_through_launch_and_predict(
    tmp_path: Path, tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cars = pd.read_csv(CARS)
    cars["gearbox"] = np.where(cars.pop("am") == 1, "manual", "automatic")
    data = tmp_path / "gearbox.csv"
    cars.to_csv(data, index=False)
    study = write_study(tmp_path, "gearbox", data=data, target="gearbox", n_trials=2,
                        body="[validation]\nfolds = 3\n", space=SPACE)
    out = tuner(capsys, "launch", str(study), "--tracking-uri", tracking, "--no-progress")
    assert "task inferred as classification: target 'gearbox' is not numeric (set task in the study file to override)" \
        in out
    assert "validation: 3-fold cross-validation, stratified (seed 0; set in the study file)" in out
    assert "majority" in out and "logistic_regression" in out
    assert "beats the best baseline" in out or "WARNING: the tuned model" in out

    rows = tmp_path / "rows.csv"
    cars.head(6).to_csv(rows, index=False)  # whole-number columns read as int64 here: predict must cope
    labels = tuner(capsys, "predict", "gearbox@champion", "--input", str(rows), "--tracking-uri", tracking)
    predicted = pd.read_csv(io.StringIO(labels))
    assert list(predicted.columns) == ["prediction"] and len(predicted) == 6
    assert set(predicted["prediction"]) <= {"automatic", "manual"}

    proba = tuner(capsys, "predict", "gearbox@champion", "--input", str(rows), "--tracking-uri", tracking, "--proba")
    p = pd.read_csv(io.StringIO(proba))
    assert list(p.columns) == ["automatic", "manual"]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the labels are the most probable class
    assert (np.where(p["manual"] > p["automatic"], "manual", "automatic") == predicted["prediction"]).all()


def _trials(storage: str, spec_path: Path) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name=load_spec(spec_path).name, storage=storage)
    return [(t.number, t.state.name, t.params, t.value, t.intermediate_values,
             t.user_attrs["provenance"].get("fold_seeds"))
            for t in study.trials]


@pytest.mark.slow
def test_seeded_runs_are_identical_replay_is_exact_and_the_champion_is_refit(
    tmp_path: Path, tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna
    import torch

    from tuner.registry import conform_input, load_model
    from tuner.tracking import Tracker
    from tuner.validation import fold_seeds, load_folds, refit

    study = write_study(tmp_path, "repro", n_trials=3, body="[validation]\nfolds = 3\n", space=SPACE)
    spec = load_spec(study)
    runs = {}
    for name in ("a", "b"):  # two fresh Optuna storages (one MLflow store: b finds a's model registered)
        storage = f"sqlite:///{tmp_path / name}.db"
        # report=False: the study report (tests/test_browse.py) plays no part in what is checked here.
        summary = launch(spec, storage=storage, tracking_uri=tracking, progress=False, report=False)
        runs[name] = (summary, _trials(storage, study))
    (sa, ta), (_, tb) = runs["a"], runs["b"]
    assert ta == tb and len(ta) == 3 and all(t[1] == "COMPLETE" for t in ta)
    assert sa.validation == "3-fold cross-validation (seed 0; set in the study file)"

    storage = f"sqlite:///{tmp_path / 'a'}.db"
    trial = optuna.load_study(study_name=spec.name, storage=storage).trials[1]
    record = trial.user_attrs["provenance"]
    assert record["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert set(record) >= {"torch", "optuna", "mlflow", "device", "data_sha256", "validation"}
    assert record["seed"] == 1 and record["fold_seeds"] == fold_seeds(1, 3)

    r = replay(spec, 1, storage=storage)
    assert r.identical and r.original == trial.value and r.warnings == []
    shown = tuner(capsys, "replay", str(study), "--storage", storage, "--trial", "1")
    assert f"original  {trial.value!r:>24}" in shown and shown.rstrip().endswith("identical")

    # The champion: the best trial's params refit on all 32 rows, registered with its CV value.
    promotion = sa.promotion
    assert promotion is not None and promotion.value == sa.best_metrics[spec.metric]
    model, version = load_model(f"{spec.model_name}@champion", tracking)
    assert float(version.tags["tuner.value"]) == promotion.value
    best = optuna.load_study(study_name=spec.name, storage=storage).best_trial
    run = Tracker(tracking, spec.name).client.get_run(best.user_attrs["mlflow_run_id"])
    assert run.data.tags["tuner.refit"] == "all 32 rows"
    again = refit(best.params, load_folds(spec, pd.read_csv(CARS)), seed=best.user_attrs["provenance"]["seed"]).model
    frame = pd.read_csv(CARS)
    expected = again(torch.tensor(frame[again.config.feature_names].to_numpy(), dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(model.predict(conform_input(model, frame)), expected, rtol=1e-6)

    info = best_info(spec, storage=storage, tracking_uri=tracking)
    assert info["validation"] == sa.validation and "least_squares" in info["baselines"]
    assert info["verdict"] == sa.verdict


@pytest.mark.slow
def test_holdout_trials_replay_exactly_and_a_changed_scheme_warns(tmp_path: Path, tracking: str) -> None:
    study = write_study(tmp_path, "holdout", n_trials=2, body="[validation]\nfraction = 0.25\n", space=SPACE)
    spec = load_spec(study)
    storage = f"sqlite:///{tmp_path / 'holdout'}.db"
    summary = launch(spec, storage=storage, tracking_uri=tracking, progress=False, report=False)
    assert summary.validation == "one split, 25% of rows held out (seed 0; set in the study file)"
    assert "least_squares" in summary.baselines and summary.verdict.startswith("the tuned model (rmse ")
    # the trial's own weights were replaced by the champion's refit on all rows; replay retrains them
    r = replay(spec, 0, storage=storage)
    assert r.identical and r.fold_metrics == []
    # the same study cross-validated now: its earlier one-split trials do not compare
    folds = write_study(tmp_path, "holdout", n_trials=3, body="[validation]\nfolds = 3\n", space=SPACE)
    with pytest.warns(UserWarning, match=r"was validated with one split, 25% .* do not compare with 3-fold"):
        launch(load_spec(folds), storage=storage, tracking_uri=tracking, progress=False, report=False)
