from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import CARS
from tuner.baselines import _logistic_regression, baselines, cv_baselines, verdict
from tuner.data import load_table, prepare, select_columns
from tuner.validation import kfold_indices


@pytest.fixture(scope="module")
def cars() -> pd.DataFrame:
    return load_table(CARS)


def test_least_squares_on_all_rows_matches_the_reference_fit(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", ["wt"])
    rows = np.arange(32)
    everything = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0, split=(rows, rows))
    b = baselines(everything)
    assert b["least_squares"]["rmse"] == pytest.approx(2.949, abs=1e-3)  # FACTS: mpg ~ wt, R² 0.753
    assert b["least_squares"]["r2"] == pytest.approx(0.753, abs=1e-3)
    assert b["mean"]["r2"] == pytest.approx(0.0, abs=1e-12)


def test_cv_baselines_average_the_folds_and_keep_the_best_single_feature(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", None)
    folds = [prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0, split=s)
             for s in kfold_indices(y, 5, seed=0)]
    b = cv_baselines(folds)
    assert sorted(b) == ["least_squares", "least_squares_wt", "mean"]
    per_fold = [baselines(f)["least_squares"]["rmse"] for f in folds]
    assert b["least_squares"]["rmse"] == pytest.approx(np.mean(per_fold))


def test_logistic_regression_matches_sklearn(cars: pd.DataFrame) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    for target, features in (("am", ["wt", "hp", "qsec"]), ("cyl", ["mpg", "disp", "hp"])):
        x, y, _ = select_columns(cars, target, features, task="classification")
        _, codes = np.unique(y, return_inverse=True)
        x = (x - x.mean(0)) / x.std(0)
        ours = _logistic_regression(x[:24], codes[:24], x[24:], int(codes.max()) + 1)
        ref = sklearn.LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(x[:24], codes[:24]).predict_proba(x[24:])
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_classification_baselines(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "am", None, task="classification")
    d = prepare(x, y, feature_names=names, target="am", fraction=0.25, seed=0, task="classification")
    b = baselines(d)
    y_val = d.y_val_raw.numpy()
    majority = np.bincount(d.y_train.numpy()).argmax()
    assert b["majority"]["accuracy"] == pytest.approx((y_val == majority).mean())
    assert b["logistic_regression"]["accuracy"] >= 0.75 and set(b["majority"]) == {"accuracy", "log_loss", "f1_macro"}


def test_verdict_says_in_plain_words_whether_the_tuned_model_wins() -> None:
    ref = {"mean": {"rmse": 6.0}, "least_squares_wt": {"rmse": 3.03}}
    assert verdict("rmse", "minimize", 2.6, ref) == (
        True, "the tuned model (rmse 2.6) beats the best baseline, least squares on wt alone (rmse 3.03)"
    )
    beats, text = verdict("accuracy", "maximize", 0.8, {"logistic_regression": {"accuracy": 0.97}})
    assert not beats
    assert text.startswith(
        "the tuned model (accuracy 0.8) does NOT beat the best baseline, logistic regression (accuracy 0.97)"
    )


def test_verdict_on_a_tie_says_tie_and_close_values_get_the_digits_that_tell_them_apart() -> None:
    ref = {"least_squares": {"rmse": 2.5171234}}
    beats, text = verdict("rmse", "minimize", 2.5171234, ref)
    assert (beats, text) == (
        False,
        "the tuned model ties with the best baseline, least squares (rmse 2.517): it gains nothing; "
        "use the baseline, or widen the search space or run more trials",
    )
    beats, text = verdict("rmse", "minimize", 2.5169, ref)
    assert beats and text == "the tuned model (rmse 2.5169) beats the best baseline, least squares (rmse 2.5171)"
    # 68 of 69 rows right, once in float32 (a trial's metric) and once in float64 (a baseline's): a tie.
    import numpy as np

    beats, text = verdict("accuracy", "maximize", float(np.float32(68 / 69)), {"logistic_regression": {"accuracy": 68 / 69}})
    assert not beats and text.startswith("the tuned model ties with the best baseline, logistic regression (accuracy 0.9855)")
    assert "does NOT beat" not in text and "beats" not in text
    # a tie on accuracy names both log losses: the tie-break the selection uses
    beats, text = verdict("accuracy", "maximize", 0.9, {"logistic_regression": {"accuracy": 0.9, "log_loss": 0.065}},
                          {"accuracy": 0.9, "log_loss": 0.147})
    assert not beats and text.startswith(
        "the tuned model ties with the best baseline, logistic regression (accuracy 0.9; log loss 0.147 against 0.065): "
        "it gains nothing")
