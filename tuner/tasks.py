"""Task inference: is the target a quantity to regress or a label to classify?

A study file may leave ``task`` out; ``config.load_spec`` then asks :func:`infer_task`, records
the reason in ``StudySpec.task_note`` and the launch summary prints it, so the guess is visible
and a ``task = "..."`` line in the study file overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["infer_task", "infer_task_of", "MAX_INFERRED_CLASSES"]

# An integer target with at most this many distinct values is read as class labels (0/1, 1-5
# stars, gear counts); more distinct integers are read as a count to regress.
MAX_INFERRED_CLASSES = 10

Task = Literal["regression", "classification"]


def infer_task_of(column: pd.Series) -> tuple[Task, str]:
    """The task a target column suggests, and why, in words for the launch summary."""
    import numpy as np
    import pandas as pd

    from tuner.columns import numeric_share

    name = column.name
    values = column.dropna()
    if not pd.api.types.is_bool_dtype(column) and not pd.api.types.is_numeric_dtype(column) and numeric_share(column) >= 0.9:
        # Numbers with a few stray cells ('?'): a quantity with typos, not 25 classes; the data
        # check then names the bad cells.
        return "regression", f"task inferred as regression: target {name!r} is numbers but for a few cells"
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        return "classification", f"task inferred as classification: target {name!r} is not numeric"
    n_distinct = int(values.nunique())
    with np.errstate(invalid="ignore"):  # inf % 1 is NaN: not integral (the data check names the inf)
        integral = bool(np.all(np.mod(values.to_numpy(dtype=np.float64), 1) == 0))
    if integral and 2 <= n_distinct <= MAX_INFERRED_CLASSES:
        return "classification", (
            f"task inferred as classification: target {name!r} has {n_distinct} distinct integer values"
        )
    kind = "integer" if integral else "numeric"
    return "regression", f"task inferred as regression: target {name!r} has {n_distinct} distinct {kind} values"


def infer_task(data: Path, target: str) -> tuple[Task, str] | None:
    """Read the target column of ``data`` and infer the task; None when the file or the column
    cannot be read (``load_data`` reports that problem with its own message later)."""
    import pandas as pd

    try:
        if data.suffix.lower() in (".parquet", ".pq"):
            column = pd.read_parquet(data, columns=[target])[target]
        else:
            column = pd.read_csv(data, usecols=[target], encoding="utf-8")[target]
    except Exception:  # any unreadable file: data.load_table explains it later
        return None
    if column.notna().sum() == 0:
        return None
    return infer_task_of(column)
