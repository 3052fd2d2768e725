"""What a launch, a worker, a replay or a report trains on: the study's table, split and folds.

One function reads the table and plans the validation for every command, so they all see the
same rows, the same split and the same folds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.validation import CVData

__all__ = ["Inputs", "load_data", "load_inputs"]


@dataclass(frozen=True)
class Inputs:
    """The holdout split (``prepared``), the raw frame (input examples), the CV folds."""

    prepared: Prepared
    frame: pd.DataFrame
    cv: CVData

    @property
    def train_part(self) -> Prepared:
        """What one trial trains on first: the first fold, or the holdout split."""
        return self.cv.folds[0] if self.cv.folds else self.prepared

    def to(self, device: Any) -> Inputs:
        """The tensors on ``device`` (once per launch, not per trial)."""
        cv = replace(self.cv, folds=[f.to(device) for f in self.cv.folds]) if self.cv.folds else self.cv
        return replace(self, prepared=self.prepared.to(device), cv=cv)


def load_data(spec: StudySpec) -> tuple[Prepared, pd.DataFrame]:
    """The study's table, validated, split and encoded; also its rows with a target (for input examples)."""
    from tuner.data import load_study_data

    return load_study_data(spec)


def load_inputs(spec: StudySpec) -> Inputs:
    """Everything a launch or a worker trains on, with the batch sizes checked against the
    training rows."""
    from tuner.validation import load_folds

    prepared, frame = load_data(spec)
    cv = load_folds(spec, frame)
    check_batch_sizes(spec, len(cv.folds[0].x_train) if cv.folds else len(prepared.x_train))
    return Inputs(prepared, frame, cv)


def check_batch_sizes(spec: StudySpec, n_train: int) -> None:
    p = spec.space["batch_size"]
    largest = getattr(p, "high", None) or max(getattr(p, "choices", None) or [getattr(p, "value", 0)])
    if largest > n_train:
        warnings.warn(
            f"batch sizes up to {largest} exceed the {n_train} training rows; those trials use "
            f"full batches of {n_train}",
            stacklevel=2,
        )
