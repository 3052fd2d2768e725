"""What a launch, a worker, a replay or a report trains on: the study's table, split and folds,
and the untouched test part.

One function reads the table and plans the validation for every command, so they all see the
same rows, the same split and the same folds. With ``validation.test_fraction`` the test part is
split off first (seeded, stratified for classification): everything else, the column roles
included, is decided on the rest (the dev part), and only the champion is scored on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from tuner.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from tuner.columns import Table
    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.validation import CVData

__all__ = ["Inputs", "UntouchedPart", "load_data", "load_inputs", "study_tables", "split_off_test"]


@dataclass(frozen=True)
class UntouchedPart:
    """The untouched test rows: raw (the champion is scored on them as ``tuner predict`` would
    be), and as the split "every dev row trains, the test rows validate" the baselines use."""

    frame: pd.DataFrame
    prepared: Prepared


@dataclass(frozen=True)
class Inputs:
    """The holdout split (``prepared``), the raw frame (input examples), the CV folds, and the
    test part (None without ``validation.test_fraction``); all but the test part are dev rows."""

    prepared: Prepared
    frame: pd.DataFrame
    cv: CVData
    test: UntouchedPart | None = None

    @property
    def train_part(self) -> Prepared:
        """What one trial trains on first: the first fold, or the holdout split."""
        return self.cv.folds[0] if self.cv.folds else self.prepared

    def to(self, device: Any) -> Inputs:
        """The tensors on ``device`` (once per launch, not per trial)."""
        cv = replace(self.cv, folds=[f.to(device) for f in self.cv.folds]) if self.cv.folds else self.cv
        return replace(self, prepared=self.prepared.to(device), cv=cv)


def split_off_test(y: np.ndarray, fraction: float, *, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(dev_index, test_index)``, sorted: a seeded ``fraction`` of the rows for the test part;
    stratified, each class gives its share (rounded) and keeps at least one row in the dev part.

    Raises:
        DataError: the fraction holds out no row.
    """
    rng = np.random.default_rng([seed, 7177])  # its own stream: not the holdout's permutation
    n = len(y)
    if stratify:
        _, codes = np.unique(y, return_inverse=True)
        picked = []
        for c in range(int(codes.max()) + 1):
            rows = rng.permutation(np.flatnonzero(codes == c))
            picked.append(rows[: min(int(round(fraction * len(rows))), len(rows) - 1)])
        test = np.concatenate(picked)
    else:
        test = rng.permutation(n)[: int(round(fraction * n))]
    if len(test) == 0:
        raise DataError(f"validation.test_fraction = {fraction} of {n} rows holds out no row; raise it or remove it")
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def study_tables(spec: StudySpec) -> tuple[Table, Table | None]:
    """The study's table as ``(dev part, test part)``; the test part is None without
    ``validation.test_fraction``. The column roles are the dev part's."""
    from tuner.data import study_table

    table = study_table(spec)
    fraction = spec.validation.test_fraction
    if fraction is None:
        return table, None
    dev_index, test_index = split_off_test(table.y, fraction, seed=spec.validation_seed, stratify=spec.task == "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the whole table warned about its columns already
        dev = study_table(spec, table.frame.iloc[dev_index].reset_index(drop=True))
    test = replace(dev, frame=table.frame.iloc[test_index].reset_index(drop=True), y=table.y[test_index])
    return dev, test


def load_data(spec: StudySpec) -> tuple[Prepared, pd.DataFrame]:
    """The study's dev rows, validated, split and encoded; also the rows themselves (for input
    examples, reports and the cross-validation folds, whose row numbers match ``Prepared``'s)."""
    dev, _ = study_tables(spec)
    return _holdout(spec, dev), dev.frame


def load_inputs(spec: StudySpec) -> Inputs:
    """Everything a launch or a worker trains on, with the batch sizes checked against the
    training rows."""
    from tuner.validation import load_folds

    dev, test = study_tables(spec)
    prepared = _holdout(spec, dev)
    cv = load_folds(spec, dev.frame)
    check_batch_sizes(spec, len(cv.folds[0].x_train) if cv.folds else len(prepared.x_train))
    return Inputs(prepared, dev.frame, cv, _test_part(spec, dev, test) if test is not None else None)


def _holdout(spec: StudySpec, dev: Table) -> Prepared:
    from tuner.data import prepare_table

    return prepare_table(dev, fraction=spec.validation.fraction, seed=spec.validation_seed, class_weight=spec.class_weight)


def _test_part(spec: StudySpec, dev: Table, test: Table) -> UntouchedPart:
    import pandas as pd

    from tuner.data import prepare_table

    n_dev, n_test = len(dev.y), len(test.y)
    both = replace(dev, frame=pd.concat([dev.frame, test.frame], ignore_index=True), y=np.concatenate([dev.y, test.y]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_table(both, fraction=spec.validation.fraction, seed=spec.validation_seed,
                                 split=(np.arange(n_dev), np.arange(n_dev, n_dev + n_test)), class_weight=spec.class_weight)
    return UntouchedPart(test.frame, prepared)


def check_batch_sizes(spec: StudySpec, n_train: int) -> None:
    """Warn where a batch size range reaches past the training rows. A fixed batch size at or
    above them is a deliberate full batch (on a trial's rows and on the refit's): no warning."""
    p = spec.space["batch_size"]
    if getattr(p, "type", None) == "fixed":
        return
    largest = getattr(p, "high", None) or max(getattr(p, "choices", None) or [getattr(p, "value", 0)])
    if largest > n_train:
        warnings.warn(
            f"batch sizes up to {largest} exceed the {n_train} training rows; those trials use "
            f"full batches of {n_train}",
            stacklevel=2,
        )
