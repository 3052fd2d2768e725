"""Reference models on the same split or folds as the trials: a tuned model must beat these.

Regression: predict-the-training-mean, ordinary least squares on all features (closed form) and
least squares on the single most useful feature. Classification: the training majority class
and L2-regularised logistic regression (Newton steps, sklearn's default ``C = 1``).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

from tuner.data import Prepared

__all__ = ["baselines", "cv_baselines", "verdict", "BASELINE_LABELS"]

# Names as the summary prints them.
BASELINE_LABELS = {
    "mean": "predict the mean",
    "least_squares": "least squares",
    "majority": "majority class",
    "logistic_regression": "logistic regression",
}


def baselines(data: Prepared) -> dict[str, dict[str, float]]:
    """Validation metrics of each baseline fitted on ``data``'s training rows."""
    if data.task != "regression":
        return _classification_baselines(data)
    return _pick_single_feature([_regression_baselines(data)])


def cv_baselines(folds: Sequence[Prepared]) -> dict[str, dict[str, float]]:
    """Each baseline's metrics averaged over the same folds as the trials."""
    if folds[0].task != "regression":
        per_fold = [_classification_baselines(f) for f in folds]
        return {name: _mean([p[name] for p in per_fold]) for name in per_fold[0]}
    return _pick_single_feature([_regression_baselines(f) for f in folds])


def verdict(
    metric: str,
    direction: Literal["minimize", "maximize"],
    value: float,
    baseline_metrics: dict[str, dict[str, float]],
    tuned: dict[str, float] | None = None,
) -> tuple[bool, str]:
    """Whether the tuned model beats the best baseline on the study's metric, in plain words. A
    tie is called a tie; with the tuned model's other metrics (``tuned``), a tie on accuracy also
    names both log losses (the selection's tie-break, ``tuner.selection.TIE_BREAK``)."""
    from tuner.selection import TIE_BREAK, TIE_RTOL

    scored = {name: m[metric] for name, m in baseline_metrics.items() if metric in m}
    if not scored:
        return True, f"no baseline reports {metric}"
    pick = min if direction == "minimize" else max
    name = pick(scored, key=lambda n: scored[n])
    best = scored[name]
    label = BASELINE_LABELS.get(name) or _label(name)
    ours, theirs = _distinct(value, best)
    # Trials' metrics are computed in float32 (7 digits), the baselines' in float64: 68/69 is
    # 0.98550725 for one and 0.985507246 for the other, and that is a tie, not a win.
    if math.isclose(value, best, rel_tol=TIE_RTOL, abs_tol=1e-9):  # the selection's tie, tuner.selection
        second = TIE_BREAK.get(metric)
        also = ""
        if second and tuned and second in tuned and second in baseline_metrics[name]:
            also = f"; {second.replace('_', ' ')} {tuned[second]:.4g} against {baseline_metrics[name][second]:.4g}"
        return False, (  # the digits that would tell them apart are float noise: show the common value
            f"the tuned model ties with the best baseline, {label} ({metric} {value:.4g}{also}): it gains nothing; "
            "use the baseline, or widen the search space or run more trials"
        )
    beats = value < best if direction == "minimize" else value > best
    if beats:
        return True, f"the tuned model ({metric} {ours}) beats the best baseline, {label} ({metric} {theirs})"
    return False, (
        f"the tuned model ({metric} {ours}) does NOT beat the best baseline, {label} ({metric} {theirs}): "
        "use the baseline, or widen the search space or run more trials"
    )


def _distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with 4 significant digits, or as many more as it takes to tell them apart
    (never "2.517 vs 2.517" for two different numbers)."""
    for digits in range(4, 13):
        x, y = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if x != y:
            return x, y
    return f"{a:.4g}", f"{b:.4g}"


def _label(name: str) -> str:
    if name.startswith("least_squares_"):
        return f"least squares on {name.removeprefix('least_squares_')} alone"
    return name.replace("_", " ")


# -- regression ------------------------------------------------------------------------------


def _regression_baselines(data: Prepared) -> dict[str, dict[str, float]]:
    x_train, x_val = data.x_train.double().cpu().numpy(), data.x_val.double().cpu().numpy()
    y_val = data.y_val_raw.double().cpu().numpy()
    y_train = data.y_train.double().cpu().numpy() * data.y_std_ + data.y_mean_
    out = {
        "mean": _regression_metrics(np.full_like(y_val, y_train.mean()), y_val),
        "least_squares": _regression_metrics(_least_squares(x_train, y_train, x_val), y_val),
    }
    if data.n_features > 1:
        for j, name in enumerate(data.feature_names):
            pred = _least_squares(x_train[:, [j]], y_train, x_val[:, [j]])
            out[f"least_squares_{name}"] = _regression_metrics(pred, y_val)
    return out


def _least_squares(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(np.c_[np.ones(len(x_train)), x_train], y_train, rcond=None)
    return np.c_[np.ones(len(x_val)), x_val] @ coef


def _pick_single_feature(per_fold: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average over folds; of the one-feature least-squares fits keep only the best (by RMSE)."""
    averaged = {name: _mean([p[name] for p in per_fold]) for name in per_fold[0]}
    singles = [n for n in averaged if n.startswith("least_squares_")]
    if singles:
        keep = min(singles, key=lambda n: averaged[n]["rmse"])
        averaged = {n: m for n, m in averaged.items() if n not in singles or n == keep}
    return averaged


def _regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred - y
    sst = float(((y - y.mean()) ** 2).sum())
    return {
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "r2": float(1 - (err**2).sum() / max(sst, 1e-12)),
    }


# -- classification --------------------------------------------------------------------------


def _classification_baselines(data: Prepared) -> dict[str, dict[str, float]]:
    y_train = data.y_train.cpu().numpy()
    y_val = data.y_val_raw.cpu().numpy()
    k = data.n_outputs
    counts = np.bincount(y_train, minlength=k).astype(np.float64)
    prior = np.tile(counts / counts.sum(), (len(y_val), 1))
    return {
        "majority": _classification_metrics(prior, y_val),
        "logistic_regression": _classification_metrics(
            _logistic_regression(data.x_train.double().cpu().numpy(), y_train, data.x_val.double().cpu().numpy(), k),
            y_val,
        ),
    }


def _logistic_regression(x: np.ndarray, y: np.ndarray, xv: np.ndarray, n_classes: int) -> np.ndarray:
    """Multinomial logistic regression with sklearn's default L2 penalty (``C = 1``: mean
    cross-entropy + ||W||^2 / (2 n), intercept unpenalised), fitted by damped Newton steps in
    closed form; returns the validation class probabilities. The penalty keeps the weights
    finite on separable data (the cars' ``am`` is separable)."""
    n = len(x)
    design, design_val = np.c_[np.ones(n), x], np.c_[np.ones(len(xv)), xv]
    dim, k = design.shape[1], n_classes
    onehot = np.eye(k)[y]
    # Two classes: sklearn fits one weight vector v; softmax's pair (v/2, -v/2) has half its
    # squared norm, so the pair needs twice the penalty to match.
    penalty = np.full(dim, (2.0 if k == 2 else 1.0) / n)
    penalty[0] = 1e-8  # the intercept: only enough to pin softmax's redundant direction
    w = np.zeros((dim, k))

    def loss(w: np.ndarray) -> float:
        logits = design @ w
        lse = np.logaddexp.reduce(logits, axis=1)
        return float((lse - (logits * onehot).sum(1)).mean() + 0.5 * (penalty[:, None] * w * w).sum())

    current = loss(w)
    for _ in range(50):
        p = _softmax(design @ w)
        grad = design.T @ (p - onehot) / n + penalty[:, None] * w
        hess = np.empty((dim, k, dim, k))
        for a in range(k):
            for b in range(k):
                weight = p[:, a] * (float(a == b) - p[:, b]) / n
                hess[:, a, :, b] = (design * weight[:, None]).T @ design
        hess = hess.reshape(dim * k, dim * k) + np.diag(np.repeat(penalty, k))
        step = np.linalg.solve(hess, grad.reshape(-1)).reshape(dim, k)
        scale = 1.0
        while scale > 1e-6 and loss(w - scale * step) > current:
            scale /= 2  # damped: never let a Newton step increase the loss
        w = w - scale * step
        previous, current = current, loss(w)
        if previous - current < 1e-12:
            break
    return _softmax(design_val @ w)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _classification_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, log loss and macro-F1 as ``train.evaluate`` computes them."""
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    log_loss = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)).mean())
    true_1h, pred_1h = np.eye(k)[y], np.eye(k)[pred]
    tp = (true_1h * pred_1h).sum(0)
    support = true_1h.sum(0) + pred_1h.sum(0)
    present = support > 0
    f1 = 2 * tp[present] / support[present]
    return {"accuracy": float((pred == y).mean()), "log_loss": log_loss, "f1_macro": float(f1.mean())}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
