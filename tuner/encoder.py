"""The column encoder: a raw table's feature columns -> the model's float64 input matrix,
fitted on the training rows only (roles come from ``tuner.columns``).

- numeric: missing (or infinite) values take the training median, plus a 0/1 ``col:missing``
  input for each column that had missing values in training (fastai's ``FillMissing``);
- categorical: one-hot over the levels seen at least ``min_count`` times in training (missing is
  a level of its own), at most ``MAX_LEVELS`` of them; rarer levels share a ``col=<other>`` slot.
  A level never seen in training takes the ``<other>`` slot when training had one, else the
  block's training frequencies: exactly zero once standardised, i.e. no push toward any level.
  One-hot into the first ``nn.Linear`` *is* an embedding of the levels (one row of the weight
  per level), so the network, fused training included, needs nothing special for categoricals;
- date: year, month, day of week and day of year, imputed like numbers.

The fitted encoder is plain JSON-able data (strings, floats, bools, lists, None): it travels in
the model's weights-only checkpoint. This module imports numpy and pandas (never torch).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from tuner.columns import Roles, bad_numeric_cells
from tuner.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TableEncoder", "level_text", "MIN_LEVEL_COUNT", "MAX_LEVELS", "ENCODER_VERSION", "DATE_PARTS"]

MIN_LEVEL_COUNT = 5  # a level seen fewer times in training shares the <other> slot (fewer on small tables)
MAX_LEVELS = 50  # one-hot slots per column at most (PyTorch Tabular caps embeddings at 50 too)
ENCODER_VERSION = 1
DATE_PARTS = ("year", "month", "dayofweek", "dayofyear")
MISSING, OTHER = "<missing>", "<other>"


def level_text(col: pd.Series) -> np.ndarray:
    """A categorical column as an object array of level strings (None where missing): the same
    text for the same value whatever dtype the frame gave it (``4`` and ``4.0`` -> ``'4'``,
    ``True`` -> ``'True'``)."""
    import pandas as pd

    missing = col.isna().to_numpy()
    out = np.empty(len(col), dtype=object)
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        out[:] = [_number_text(v) for v in values]
    else:
        out[:] = [_number_text(float(v)) if isinstance(v, (float, np.floating)) else str(v) for v in col.to_numpy(dtype=object)]
    out[missing] = None
    return out


def _number_text(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and v % 1 == 0 and abs(v) < 2**53 else str(v)


def _as_numbers(name: str, col: pd.Series, first_row: int) -> np.ndarray:
    """A numeric column as float64 (missing and infinite as NaN); a text cell is an error that
    names the column and the row."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        values = col.to_numpy(dtype=np.float64)
    elif pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        count, shown = bad_numeric_cells(col, first_row)
        if count:
            raise DataError(
                f"column {name!r} is numeric in the model, but {count} cell(s) are not numbers: {shown}; "
                "fix them or leave them empty (missing numbers are imputed)"
            )
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    values = values.copy() if not values.flags.writeable else values
    values[~np.isfinite(values)] = np.nan
    return values


def _date_parts(col: pd.Series) -> np.ndarray:
    """``(rows, 4)`` float64: year, month, day of week, day of year; NaN where not a date."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(col):
        when = col
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            when = pd.to_datetime(col.astype(object), errors="coerce", format="ISO8601", utc=True)
    dt = when.dt
    parts = [dt.year, dt.month, dt.dayofweek, dt.dayofyear]
    return np.stack([p.to_numpy(dtype=np.float64, na_value=np.nan) for p in parts], axis=1)


class TableEncoder:
    """Raw feature columns -> the model's float64 input matrix, fitted on training rows only.

    ``spec`` is the JSON-able state: ``{"version": 1, "columns": [...]}``, one entry per raw
    column in input order (see ``to_dict``). Build one with ``fit``; rebuild with ``from_dict``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        if spec.get("version") != ENCODER_VERSION:
            raise ValueError(f"encoder version {spec.get('version')!r} is not {ENCODER_VERSION}; upgrade tuner")
        self.spec = spec
        self.columns: list[dict[str, Any]] = spec["columns"]

    # -- fitting ------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        roles: Roles,
        *,
        layout: TableEncoder | None = None,
        min_count: int | None = None,
        max_levels: int = MAX_LEVELS,
    ) -> TableEncoder:
        """Fit on ``frame`` (the training rows). ``layout``: keep another encoder's inputs
        (levels, indicator columns) and fit only the values here, so cross-validation folds share
        one input width; a level or indicator this part never saw stays inert (zero once
        standardised), as if fitted here alone."""
        n = len(frame)
        if min_count is None:
            min_count = min(MIN_LEVEL_COUNT, max(1, n // 20))
        planned = {c["name"]: c for c in layout.columns} if layout is not None else {}
        columns = []
        for name in roles.features:
            kind = roles.role(name)
            plan = planned.get(name)
            if kind == "categorical":
                columns.append(_fit_categorical(name, level_text(frame[name]), plan, min_count, max_levels))
                continue
            values = _date_parts(frame[name]) if kind == "date" else _as_numbers(name, frame[name], 2)[:, None]
            missing = np.isnan(values).any(axis=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: median 0 below
                medians = np.nanmedian(values, axis=0) if n else np.zeros(values.shape[1])
            medians = np.where(np.isfinite(medians), medians, 0.0)
            had_missing = bool(missing.any())
            columns.append({
                "name": name,
                "kind": kind,
                "medians": [float(m) for m in medians],
                "indicator": bool(plan["indicator"]) if plan is not None else had_missing,
                "had_missing": had_missing,
            })
        return cls({"version": ENCODER_VERSION, "columns": columns})

    # -- the inputs ---------------------------------------------------------------------

    @property
    def input_columns(self) -> list[str]:
        """The raw columns the encoder reads, in order."""
        return [c["name"] for c in self.columns]

    @property
    def categorical(self) -> list[str]:
        return [c["name"] for c in self.columns if c["kind"] == "categorical"]

    @property
    def output_names(self) -> list[str]:
        """One name per model input: ``col``, ``col:missing``, ``col=level``, ``col:year``..."""
        names: list[str] = []
        for c in self.columns:
            name = c["name"]
            if c["kind"] == "categorical":
                names += [f"{name}={MISSING if lv is None else lv}" for lv in c["levels"]]
                names += [f"{name}={OTHER}"] if c["other"] else []
            else:
                names += [name] if c["kind"] == "numeric" else [f"{name}:{p}" for p in DATE_PARTS]
                names += [f"{name}:missing"] if c["indicator"] else []
        return names

    def transform(self, frame: pd.DataFrame, *, first_row: int = 2) -> tuple[np.ndarray, list[str]]:
        """Encode ``frame`` (extra columns ignored) as ``(rows, inputs)`` float64, and notes on
        what was imputed that training never had to (for a warning).

        Raises:
            DataError: a column is missing, or a numeric column holds text (names column and row).
        """
        missing_cols = [c for c in self.input_columns if c not in frame.columns]
        if missing_cols:
            raise DataError(f"input lacks column(s) {missing_cols}; the model reads {self.input_columns}")
        blocks: list[np.ndarray] = []
        new_missing: dict[str, int] = {}
        new_levels: dict[str, int] = {}
        for c in self.columns:
            col = frame[c["name"]]
            if c["kind"] == "categorical":
                block, n_unseen = _encode_categorical(c, level_text(col))
                if n_unseen:
                    new_levels[c["name"]] = n_unseen
                blocks.append(block)
                continue
            values = _date_parts(col) if c["kind"] == "date" else _as_numbers(c["name"], col, first_row)[:, None]
            missing = np.isnan(values).any(axis=1)
            if missing.any():
                values = np.where(np.isnan(values), np.asarray(c["medians"]), values)
                if not c["had_missing"]:
                    new_missing[c["name"]] = int(missing.sum())
            blocks.append(values)
            if c["indicator"]:
                live = missing if c["had_missing"] else np.zeros(len(col), dtype=bool)
                blocks.append(live.astype(np.float64)[:, None])
        x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
        notes = []
        if new_missing:
            notes.append(
                "missing values in column(s) that had none in training, imputed with the training median: "
                + ", ".join(f"{k} ({v} row(s))" for k, v in new_missing.items())
            )
        if new_levels:
            shown = ", ".join(f"{k} ({v} row(s))" for k, v in new_levels.items())
            notes.append(f"levels not seen in training, encoded as the training average: {shown}")
        return x, notes

    def example(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame``'s input columns typed as the model's signature should list them: numbers
        as the table has them (int64 stays long: MLflow refuses int64 input for a double column;
        a column that had missing values is float64 already), text and bool levels as strings."""
        import pandas as pd

        out = {}
        for c in self.columns:
            col = frame[c["name"]]
            if c["kind"] == "numeric" or (c["kind"] == "categorical" and pd.api.types.is_numeric_dtype(col)
                                          and not pd.api.types.is_bool_dtype(col)):
                out[c["name"]] = col if pd.api.types.is_integer_dtype(col) else col.astype(np.float64)
            elif c["kind"] == "categorical":
                out[c["name"]] = pd.Series(level_text(col), index=col.index, dtype=object)
            else:
                out[c["name"]] = col
        return pd.DataFrame(out, index=frame.index)

    def to_dict(self) -> dict[str, Any]:
        return self.spec

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TableEncoder:
        return cls(spec)


def _fit_categorical(
    name: str, text: np.ndarray, plan: dict[str, Any] | None, min_count: int, max_levels: int
) -> dict[str, Any]:
    keys = np.where(text == None, MISSING, text).astype(str) if len(text) else np.array([], dtype=str)  # noqa: E711
    found, counts = np.unique(keys, return_counts=True)
    count_of = {(None if k == MISSING else str(k)): int(n) for k, n in zip(found, counts)}
    if plan is None:
        frequent = sorted((lv for lv, n in count_of.items() if n >= min_count), key=lambda lv: (-count_of[lv], str(lv)))
        kept = frequent[:max_levels]
        levels = sorted((lv for lv in kept if lv is not None)) + ([None] if None in kept else [])
        other = sum(count_of.values()) > sum(count_of[lv] for lv in levels)
    else:
        levels, other = list(plan["levels"]), bool(plan["other"])
    n_other = sum(count_of.values()) - sum(count_of.get(lv, 0) for lv in levels)
    n = max(len(text), 1)
    freq = [count_of.get(lv, 0) / n for lv in levels] + ([n_other / n] if other else [])
    return {
        "name": name,
        "kind": "categorical",
        "levels": levels,
        "other": other,
        "seen": [count_of.get(lv, 0) > 0 for lv in levels],
        "other_seen": bool(other and n_other > 0),
        "freq": freq,
    }


def _encode_categorical(c: dict[str, Any], text: np.ndarray) -> tuple[np.ndarray, int]:
    """One-hot block of a categorical column and how many rows held a level training never saw."""
    import pandas as pd

    levels: list[str | None] = c["levels"]
    named = [lv for lv in levels if lv is not None]
    codes = pd.Index(named, dtype=object).get_indexer(text).astype(np.int64)  # -1: missing or unknown
    if None in levels:
        codes = np.where(pd.isna(text), levels.index(None), codes)
    seen = np.asarray(c["seen"] + ([c["other_seen"]] if c["other"] else []), dtype=bool)
    width = len(seen)
    if c["other"]:
        codes = np.where(codes >= 0, codes, width - 1)  # rare in training, or new: the <other> slot
    # a level (or <other>) without training rows is unseen: the neutral encoding below
    unseen = (codes < 0) | ~seen[np.clip(codes, 0, max(width - 1, 0))] if width else np.ones(len(text), dtype=bool)
    block = np.zeros((len(text), width))
    hot = np.flatnonzero(~unseen)
    block[hot, codes[hot]] = 1.0
    if unseen.any():
        block[unseen] = np.asarray(c["freq"], dtype=np.float64)
    return block, int(unseen.sum())
