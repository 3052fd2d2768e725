"""Tuner on a raw table against scikit-learn fed the same columns through one-hot + impute.

    python -m benchmarks.tables_quality                 # 20 trials per study (~3-5 min on 2 cores)
    python -m benchmarks.tables_quality --n-trials 8

On data/penguins.csv as published (text columns and NA cells left in), two problems: species
(classification, accuracy) and body_mass_g (regression, RMSE in grams). tuner runs its study
programmatically (``tuner.study.launch`` on fresh SQLite stores, studies/penguins.toml's space,
roles detected by tuner), and its best trial's validation metric is taken. On the very same
train/validation rows (the study's ``Prepared.train_index``/``val_index``) scikit-learn fits
HistGradientBoosting and a linear model behind a ColumnTransformer: median imputation with
missing indicators for numbers, "missing" + one-hot (unknown levels ignored) for text.
The acceptance bar: tuner within a few percent of HistGradientBoosting.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "penguins.toml"


def sklearn_scores(frame: Any, target: str, task: str, numeric: list[str], categorical: list[str],
                   train_index: np.ndarray, val_index: np.ndarray, *, ridge: bool = False) -> dict[str, float]:
    """Validation score of HistGradientBoosting and a linear model on one-hot + impute
    (``ridge``: scikit-learn's Ridge, alpha 1, instead of least squares for regression)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    def columns() -> ColumnTransformer:
        return ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), numeric),
            ("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="missing"),
                                  OneHotEncoder(handle_unknown="ignore", sparse_output=False)), categorical),
        ])

    x = frame[numeric + categorical].astype({c: object for c in categorical})
    x[categorical] = x[categorical].where(x[categorical].notna(), None)
    y = frame[target].to_numpy()
    models = {
        "hist_gradient_boosting": HistGradientBoostingClassifier(random_state=0) if task == "classification"
        else HistGradientBoostingRegressor(random_state=0),
        "linear": LogisticRegression(max_iter=5000) if task == "classification" else Ridge() if ridge else LinearRegression(),
    }
    out = {}
    for name, model in models.items():
        pipe = make_pipeline(columns(), model).fit(x.iloc[train_index], y[train_index])
        pred = pipe.predict(x.iloc[val_index])
        if task == "classification":
            out[name] = float((pred == y[val_index]).mean())
        else:
            out[name] = float(np.sqrt(np.mean((pred - y[val_index]) ** 2)))
    return out


def run(target: str, task: str, metric: str, n_trials: int) -> dict[str, Any]:
    from tuner.config import load_spec
    from tuner.inputs import load_data
    from tuner.session import launch

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(STUDY, name=f"penguins-{target}", target=target, task=task, metric=metric,
                         registered_model=f"penguins-{target}", storage=f"sqlite:///{tmp}/optuna.db",
                         tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared, frame = load_data(spec)
            summary = launch(spec, n_trials=n_trials, progress=False, report=False, promote=False)
    roles = prepared.roles
    assert roles is not None
    reference = sklearn_scores(frame, target, task, roles.numeric, roles.categorical,
                               prepared.train_index, prepared.val_index)
    return {"target": target, "metric": metric, "columns": prepared.columns, "n_val": len(prepared.val_index),
            "tuner": summary.best_metrics[metric], **reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=20)
    args = parser.parse_args()
    rows = [run("species", "classification", "accuracy", args.n_trials),
            run("body_mass_g", "regression", "rmse", args.n_trials)]
    print(f"| target | metric | validation rows | tuner ({args.n_trials} trials) | HistGradientBoosting | linear |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['metric']} | {r['n_val']} | {r['tuner']:.4g} | {r['hist_gradient_boosting']:.4g} "
              f"| {r['linear']:.4g} |")
    for r in rows:
        print(f"{r['target']}: {r['columns']}")


if __name__ == "__main__":
    main()
