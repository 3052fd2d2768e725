"""Reference models on the same split as the trials: a tuned model must beat these."""

from __future__ import annotations

import numpy as np

from tuner.data import Prepared

__all__ = ["baselines"]


def baselines(data: Prepared) -> dict[str, dict[str, float]]:
    """Validation metrics of the training-mean predictor and of ordinary least squares
    (closed form, same features, same standardised training rows)."""
    x_train, x_val = data.x_train.double().numpy(), data.x_val.double().numpy()
    y_val = data.y_val_raw.double().numpy()
    if data.task != "regression":
        counts = np.bincount(data.y_train.numpy(), minlength=data.n_outputs)
        majority = counts.argmax()
        return {"majority": {"accuracy": float((y_val == majority).mean())}}
    y_train = data.y_train.double().numpy() * data.y_std_ + data.y_mean_
    design = np.c_[np.ones(len(x_train)), x_train]
    coef, *_ = np.linalg.lstsq(design, y_train, rcond=None)
    preds = {
        "mean": np.full_like(y_val, y_train.mean()),
        "least_squares": np.c_[np.ones(len(x_val)), x_val] @ coef,
    }
    return {name: _regression_metrics(p, y_val) for name, p in preds.items()}


def _regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred - y
    sst = float(((y - y.mean()) ** 2).sum())
    return {
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "r2": float(1 - (err**2).sum() / max(sst, 1e-12)),
    }
