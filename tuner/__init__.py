"""tuner: hyperparameter tuning for PyTorch models on tabular data (Optuna + MLflow).

Public names are imported lazily so that ``tuner --help`` and the MLflow model code (which
imports ``tuner.model`` only) do not pay for optuna, mlflow or pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "StudySpec": "tuner.config",
    "load_spec": "tuner.config",
    "load_table": "tuner.data",
    "prepare": "tuner.data",
    "Prepared": "tuner.data",
    "TabularNet": "tuner.model",
    "ModelConfig": "tuner.model",
    "train": "tuner.train",
    "train_many": "tuner.fused",
    "TrainResult": "tuner.train",
    "resolve_device": "tuner.train",
    "cross_validate": "tuner.validation",
    "kfold_indices": "tuner.validation",
    "infer_task": "tuner.tasks",
    "replay": "tuner.replay",
    "launch": "tuner.session",
    "LaunchSummary": "tuner.session",
    "open_study": "tuner.study",
    "reconcile": "tuner.reconcile",
    "promote_study": "tuner.promotion",
    "TunerError": "tuner.errors",
    "ConfigError": "tuner.errors",
    "DataError": "tuner.errors",
    "StorageError": "tuner.errors",
    "TrackingError": "tuner.errors",
    "ModelError": "tuner.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
