"""Promotion: the champion is refit on every row the trials saw, whatever the validation scheme,
records those rows, and is scored once on an untouched test part; checked through `tuner predict`
on the registered model, against real SQLite studies and a real MLflow store."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import CARS, mlflow_store, write_study
from tuner.cli import main
from tuner.config import load_spec
from tuner.session import launch


def _predict(capsys: pytest.CaptureFixture[str], model: str, rows: Path, tracking: str) -> pd.DataFrame:
    capsys.readouterr()
    assert main(["predict", model, "--input", str(rows), "--tracking-uri", tracking]) == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def test_holdout_champion_is_refit_on_all_32_cars_and_predicts_the_least_squares_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's acceptance test: cars_linear validates on a 20% holdout, and its champion,
    through `tuner predict`, is the least-squares line of all 32 cars (not of the 26 training rows)."""
    from tuner.tracking import Tracker

    tracking = mlflow_store(workdir / "mlflow.db")
    spec = load_spec(workdir / "studies" / "cars_linear.toml")
    summary = launch(spec, n_trials=3, storage=f"sqlite:///{workdir / 'linear.db'}", tracking_uri=tracking,
                     progress=False, report=False)
    assert summary.validation.startswith("one split, 20% of rows held out")
    probe = workdir / "probe.csv"
    pd.DataFrame({"car": ["weightless", "one ton"], "wt": [0.0, 1.0]}).to_csv(probe, index=False)
    intercept, at_one = _predict(capsys, "cars-linear@champion", probe, tracking)["prediction"]

    cars = pd.read_csv(CARS)
    (a_ls, b_ls), *_ = np.linalg.lstsq(np.c_[np.ones(32), cars["wt"]], cars["mpg"], rcond=None)
    assert (a_ls, b_ls) == (pytest.approx(37.285, abs=1e-3), pytest.approx(-5.344, abs=1e-3))
    assert intercept == pytest.approx(a_ls, rel=0.01)
    assert at_one - intercept == pytest.approx(b_ls, rel=0.01)
    # The version and the trial's run say which rows the model was fit on; the registered value is
    # still the holdout's (what selected it and what the champion alias compares).
    version = Tracker(tracking, spec.name).champion(spec.model_name)
    assert version.tags["tuner.refit"] == "all 32 rows"
    assert float(version.tags["tuner.value"]) == summary.best_metrics["rmse"]
    run = Tracker(tracking, spec.name).client.get_run(version.run_id)
    assert run.data.tags["tuner.refit"] == "all 32 rows"


def test_refit_false_keeps_the_holdout_trials_own_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.tracking import Tracker

    tracking = mlflow_store(tmp_path / "mlflow.db")
    study = write_study(tmp_path, "own", features=["wt"], n_trials=2, body="[validation]\nfraction = 0.25\nrefit = false\n",
                        space='lr = { type = "float", low = 0.1, high = 0.2 }\nepochs = { type = "int", low = 50, high = 60 }\n'
                        'batch_size = { type = "fixed", value = 32 }\nhidden_size = { type = "fixed", value = 0 }\n'
                        'activation = { type = "fixed", value = "relu" }\n')
    spec = load_spec(study)
    summary = launch(spec, storage=f"sqlite:///{tmp_path / 'own.db'}", tracking_uri=tracking, progress=False, report=False)
    assert summary.validation.endswith("the champion is the trial's own model (refit = false)")
    version = Tracker(tracking, spec.name).champion(spec.model_name)
    assert version.tags["tuner.refit"] == "no (refit = false): the trial's own model, fit on 24 rows"
    # its predictions are the trial's own: on the validation rows, the trial's rmse
    from tuner.inputs import load_data

    prepared, frame = load_data(spec)
    rows = tmp_path / "val.csv"
    frame.iloc[prepared.val_index].to_csv(rows, index=False)
    predicted = _predict(capsys, f"{spec.model_name}@champion", rows, tracking)["prediction"].to_numpy()
    rmse = float(np.sqrt(np.mean((predicted - frame.iloc[prepared.val_index]["mpg"].to_numpy()) ** 2)))
    assert rmse == pytest.approx(summary.best_metrics["rmse"], rel=1e-4)


def test_test_part_is_untouched_and_scores_the_champion_and_the_baselines_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.inputs import load_inputs, split_off_test
    from tuner.tracking import Tracker

    tracking = mlflow_store(tmp_path / "mlflow.db")
    study = write_study(tmp_path, "honest", n_trials=2, body="[validation]\nfolds = 3\ntest_fraction = 0.25\n")
    spec = load_spec(study)
    inputs = load_inputs(spec)
    # 8 of 32 cars held back: no fold, no holdout, no refit row is one of them
    cars = pd.read_csv(CARS)
    dev_index, test_index = split_off_test(cars["mpg"].to_numpy(), 0.25, seed=0, stratify=False)
    assert len(test_index) == 8 and len(inputs.frame) == 24 and len(inputs.test.frame) == 8
    assert set(inputs.test.frame["model"]) == set(cars["model"].iloc[test_index])
    assert not set(inputs.test.frame["model"]) & set(inputs.frame["model"])
    assert len(inputs.cv.all_rows.x_train) == 24 and sum(len(f.x_val) for f in inputs.cv.folds) == 24

    summary = launch(spec, storage=f"sqlite:///{tmp_path / 'honest.db'}", tracking_uri=tracking, progress=False, report=False)
    assert summary.validation.endswith("; 25% of rows untouched as the test part")
    version = Tracker(tracking, spec.name).champion(spec.model_name)
    assert version.tags["tuner.refit"] == "all 24 rows (the 8 test rows left out)"
    # the registered model's metrics on the test rows, as `tuner predict` sees them
    rows = tmp_path / "test.csv"
    inputs.test.frame.to_csv(rows, index=False)
    predicted = _predict(capsys, f"{spec.model_name}@champion", rows, tracking)["prediction"].to_numpy()
    rmse = float(np.sqrt(np.mean((predicted - inputs.test.frame["mpg"].to_numpy()) ** 2)))
    assert summary.test_metrics["rmse"] == pytest.approx(rmse, rel=1e-5) == float(version.tags["tuner.test_rmse"])
    assert summary.test_rows == 8
    # the baselines on the same test rows, fitted on the 24 dev rows: least squares by hand
    x_dev = inputs.frame[inputs.cv.all_rows.feature_names].to_numpy(dtype=float)
    x_test = inputs.test.frame[inputs.cv.all_rows.feature_names].to_numpy(dtype=float)
    coef, *_ = np.linalg.lstsq(np.c_[np.ones(24), x_dev], inputs.frame["mpg"], rcond=None)
    ls_rmse = float(np.sqrt(np.mean((np.c_[np.ones(8), x_test] @ coef - inputs.test.frame["mpg"]) ** 2)))
    assert summary.test_baselines["least_squares"]["rmse"] == pytest.approx(ls_rmse, rel=1e-6)
    assert summary.test_baselines["mean"]["rmse"] == pytest.approx(
        float(np.sqrt(np.mean((inputs.frame["mpg"].mean() - inputs.test.frame["mpg"]) ** 2))), rel=1e-6)
    # the verdict is taken on the test part
    assert f"rmse {summary.test_metrics['rmse']:.4g}" in summary.verdict

    # printed beside the selection value, and shown by `tuner best`
    capsys.readouterr()
    assert main(["best", str(study), "--storage", f"sqlite:///{tmp_path / 'honest.db'}", "--tracking-uri", tracking]) == 0
    shown = capsys.readouterr().out
    assert (f"estimate: rmse {summary.best_metrics['rmse']:.4g} on validation (what chose it), "
            f"{summary.test_metrics['rmse']:.4g} on the 8 untouched test rows (the honest estimate)") in shown
    assert "test baseline least_squares: rmse=" in shown


def test_a_stratified_test_part_keeps_every_class_in_the_dev_rows() -> None:
    from tuner.inputs import split_off_test

    y = np.array(["a"] * 10 + ["b"] * 5 + ["c"])  # "c" has one row: it stays in the dev part
    dev, test = split_off_test(y, 0.2, seed=3, stratify=True)
    assert sorted(y[test]) == ["a", "a", "b"] and "c" in set(y[dev])
    assert split_off_test(y, 0.2, seed=3, stratify=True)[1].tolist() == test.tolist()  # seeded
    assert not set(dev) & set(test) and len(dev) + len(test) == 16
