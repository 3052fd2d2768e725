"""Column roles of a raw table, decided once per table and printed.

numeric; categorical (text, bool, pandas ``category``, or a column the study file lists in
``categorical``); date (ISO dates, or a datetime column; ``tuner.encoder`` expands them);
excluded: row ids (unique text per row, or unique integers that are monotone or named like an
id: ``rownames``, ``Unnamed: 0``, ``id``), constant columns, and the study file's ``exclude``.
The helpers that quote a bad cell (cut to 80 characters) live here too. numpy and pandas only.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from tuner.errors import DataError, did_you_mean

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Roles", "Table", "detect_roles", "table_inputs", "numeric_share", "bad_numeric_cells", "cut"]

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}([,.' ]\d{3})+([.,]\d+)?")
_ID_NAME = re.compile(r"(?i)(rownames|row_?(id|num(ber)?)?|index|unnamed: ?\d+|id|.*[_ ]id)")


def cut(value: Any, limit: int = 80) -> str:
    """``repr`` of a cell, cut to ``limit`` characters: error messages never echo a whole cell."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def numeric_share(col: pd.Series) -> float:
    """Share of the non-empty cells of a column that read as numbers (thousands separators
    allowed): 1.0 for a numeric column, ~1.0 for numbers with a few stray ``?`` cells."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return 0.0
    if pd.api.types.is_numeric_dtype(col):
        return 1.0
    values = col.dropna()
    if values.empty:
        return 0.0
    text = values.astype(str).str.strip()
    parsed = pd.to_numeric(text.str.replace(r"(?<=\d)[,' ](?=\d{3})", "", regex=True), errors="coerce")
    return float(parsed.notna().mean())


def bad_numeric_cells(col: pd.Series, first_row: int = 2, limit: int = 3) -> tuple[int, str]:
    """How many non-empty cells of ``col`` are not numbers, and the first ``limit`` of them as
    ``row N 'value'`` (``first_row``: the row number of the first data row; 2 in a CSV file)."""
    import pandas as pd

    bad = (pd.to_numeric(col, errors="coerce").isna() & col.notna()).to_numpy()
    where = np.flatnonzero(bad)
    shown = ", ".join(f"row {int(i) + first_row} {cut(col.iloc[int(i)])}" for i in where[:limit])
    return len(where), shown


# -- roles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """Which column does what; ``features`` keeps the table's column order."""

    numeric: list[str]
    categorical: list[str]
    date: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # column -> why ("row id", "constant", ...)
    order: list[str] = field(default_factory=list)  # the table's column order

    @property
    def features(self) -> list[str]:
        used = set(self.numeric) | set(self.categorical) | set(self.date)
        return [c for c in self.order if c in used]

    def role(self, name: str) -> str:
        return "numeric" if name in self.numeric else "categorical" if name in self.categorical else "date"

    def describe(self) -> str:
        """One line, e.g. ``features: 4 numeric, 2 categorical (island, sex); excluded: rownames (row id)``."""
        parts = [f"{len(self.numeric)} numeric"]
        for kind, names in (("categorical", self.categorical), ("date", self.date)):
            if names:
                parts.append(f"{len(names)} {kind} ({_names(names)})")
        line = "features: " + ", ".join(parts)
        if self.excluded:
            shown = [f"{name} ({why})" for name, why in self.excluded.items()]
            line += "; excluded: " + (", ".join(shown[:8]) + (f", +{len(shown) - 8} more" if len(shown) > 8 else ""))
        return line


def _names(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", +{len(names) - limit} more" if len(names) > limit else "")


def detect_roles(
    frame: pd.DataFrame,
    target: str,
    *,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    exclude: Sequence[str] = (),
    source: str = "data",
) -> Roles:
    """Decide the role of every column but the target, once, and warn about excluded ones.

    ``features`` (the study file's list) are used as given: no column of it is excluded;
    ``categorical`` makes a numeric column categorical; ``exclude`` drops columns.

    Raises:
        DataError: an override names a missing column or the target, a column is numbers but for
            a few cells, or no feature is left; all problems in one message.
    """
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    problems = []
    for key, names in (("features", features or []), ("categorical", categorical), ("exclude", exclude)):
        missing = [c for c in names if c not in columns]
        if missing:
            hint = did_you_mean(missing[0], columns) if len(missing) == 1 else ""
            problems.append(f"`{key}` names column(s) {missing}{hint} that are not in {source}; columns are {_cut_list(columns)}")
        if target in names:
            problems.append(f"target {target!r} is listed in `{key}`; remove it from there")
    both = sorted(set(categorical) & set(exclude))
    if both:
        problems.append(f"column(s) {both} are both in `categorical` and in `exclude`; keep one")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
    explicit = features is not None
    candidates = list(features) if features is not None else [c for c in columns if c != target]
    numeric: list[str] = []
    cats: list[str] = []
    dates: list[str] = []
    excluded: dict[str, str] = {c: "excluded in the study file" for c in exclude}
    n = len(frame)
    for name in candidates:
        if name in excluded:
            continue
        col = frame[name]
        if not explicit and _constant(col):
            excluded[name] = "constant" if col.notna().any() else "empty"
            continue
        if name in categorical or pd.api.types.is_bool_dtype(col) or isinstance(col.dtype, pd.CategoricalDtype):
            cats.append(name)
        elif pd.api.types.is_datetime64_any_dtype(col):
            dates.append(name)
        elif pd.api.types.is_numeric_dtype(col):
            if not explicit and _is_row_id(name, col, n):
                excluded[name] = "row id"
                continue
            numeric.append(name)
        elif _is_iso_dates(col):
            dates.append(name)
        elif numeric_share(col) >= 0.5:
            count, shown = bad_numeric_cells(col)
            first = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()].iloc[0]
            hint = " (thousands separators? write 1234.5, not 1,234.5)" if _THOUSANDS.fullmatch(str(first).strip()) else ""
            problems.append(f"column {name!r} holds numbers but {count} cell(s) are not: {shown}{hint}")
        elif not explicit and n >= 3 and col.notna().all() and col.nunique() == n:
            excluded[name] = "row id"
        else:
            cats.append(name)
    if problems:
        raise DataError(
            f"{source}: " + "; ".join(problems) + "; fix those cells or leave them empty (missing numbers are imputed), "
            "or list the column in `categorical` (or `exclude`)"
        )
    roles = Roles(numeric, cats, dates, excluded, columns)
    if not roles.features:
        raise DataError(
            f"{source} has no usable feature column besides the target {target!r} ({roles.describe()}); "
            f"columns are {_cut_list(columns)}"
        )
    dropped = {k: v for k, v in excluded.items() if v != "excluded in the study file"}
    if dropped:
        warnings.warn(
            f"{source}: column(s) left out of the features: "
            + ", ".join(f"{k} ({v})" for k, v in dropped.items())
            + "; list a column in `features` to use it anyway",
            stacklevel=2,
        )
    return roles


def _cut_list(names: list[str], limit: int = 30) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def _constant(col: pd.Series) -> bool:
    """One value (or none) in every row; O(n) without hashing (1M-row tables)."""
    missing = col.isna()
    if missing.all():
        return True
    if missing.any():
        return False
    return bool((col == col.iloc[0]).all())


def _is_row_id(name: str, col: pd.Series, n: int) -> bool:
    """An exported row number: integers, unique per row, and monotone or named like an id."""
    import pandas as pd

    if n < 3 or col.isna().any() or not (pd.api.types.is_integer_dtype(col) or _integral(col)):
        return False
    if col.nunique() != n:
        return False
    return bool(col.is_monotonic_increasing or col.is_monotonic_decreasing or _ID_NAME.fullmatch(name.strip()))


def _integral(col: pd.Series) -> bool:
    import pandas as pd

    if not pd.api.types.is_float_dtype(col):
        return False
    values = col.to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf % 1 is NaN: not integral, no warning
        if not (values[:256] % 1 == 0).all():  # measurements: rejected on the first rows, cheaply
            return False
        return bool(np.isfinite(values).all() and (values % 1 == 0).all())


def _is_iso_dates(col: pd.Series) -> bool:
    values = col.dropna()
    if values.empty:
        return False
    sample = values.iloc[:: max(1, len(values) // 1000)].astype(str).str.strip()
    return bool(sample.str.fullmatch(_ISO_DATE).mean() >= 0.95)


# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A raw table ready to split: its rows with a target, the target, and the column roles."""

    frame: pd.DataFrame  # every column of the rows that have a target (index 0..n-1)
    y: np.ndarray  # float64 (regression) or the labels as the table has them (classification)
    roles: Roles
    target: str
    task: Literal["regression", "classification"]
    source: str = "data"

    @property
    def x(self) -> pd.DataFrame:
        return self.frame[self.roles.features]


def table_inputs(
    frame: pd.DataFrame,
    target: str,
    *,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    exclude: Sequence[str] = (),
    source: str = "data",
    task: Literal["regression", "classification"] = "regression",
) -> Table:
    """The target and the feature roles of a raw table (text, missing values and ids left in).

    Rows with an empty target are dropped with a warning that counts them.

    Raises:
        DataError: no such target; a regression target that is not numbers (the first bad
            cells named, row and value); one class; a bad override (see ``detect_roles``).
    """
    columns = [str(c) for c in frame.columns]
    if target not in columns:
        raise DataError(f"target column {target!r}{did_you_mean(target, columns)} is not in {source}; columns are {columns[:30]}")
    labels = frame[target]
    if task == "regression":
        labels = _numeric_target(labels, target, source)
        if np.isinf(labels.to_numpy(dtype=np.float64)).any():
            row = int(np.flatnonzero(np.isinf(labels.to_numpy(dtype=np.float64)))[0]) + 2
            raise DataError(f"{source}: target {target!r} is infinite at row {row}; fix or drop those rows")
    empty = labels.isna().to_numpy()
    if empty.all():
        raise DataError(f"{source}: target {target!r} is empty in every row; there is nothing to learn")
    if empty.any():
        warnings.warn(
            f"{source}: {int(empty.sum())} row(s) with an empty target {target!r} dropped "
            f"(first at row {int(np.flatnonzero(empty)[0]) + 2}); {int((~empty).sum())} rows remain",
            stacklevel=2,
        )
        frame, labels = frame[~empty].reset_index(drop=True), labels[~empty].reset_index(drop=True)
    if task == "classification" and labels.nunique() < 2:
        raise DataError(f"{source}: target {target!r} has one class {cut(labels.iloc[0])}; there is nothing to classify")
    roles = detect_roles(frame, target, features=features, categorical=categorical, exclude=exclude, source=source)
    y = labels.to_numpy(dtype=np.float64) if task == "regression" else labels.to_numpy()
    return Table(frame, y, roles, target, task, source)


def _numeric_target(labels: pd.Series, target: str, source: str) -> pd.Series:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        return labels.astype(np.float64)
    if numeric_share(labels) >= 0.9:
        count, shown = bad_numeric_cells(labels)
        raise DataError(
            f"{source}: target {target!r} holds numbers but {count} cell(s) are not: {shown}; fix them or leave "
            "them empty (rows without a target are dropped)"
        )
    example = labels.dropna().iloc[0] if labels.notna().any() else None
    raise DataError(
        f"{source}: target {target!r} is not numeric, e.g. {cut(example)}; set task = \"classification\" in the "
        "study file if it holds class labels"
    )
