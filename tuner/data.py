"""Table -> validated frame -> column roles -> seeded train/validation split -> encoded,
standardised tensors.

Every problem of the input is found here, before any trial starts, and reported in one line
that names the column (and an example value, cut to 80 characters) and the fix. Column roles
and the encoder (imputation, one-hot levels) live in ``tuner.columns``; both are fitted here on
the training rows only, like the standardiser.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tuner.columns import Roles, Table, cut, numeric_share, table_inputs
from tuner.encoder import TableEncoder
from tuner.errors import DataError, did_you_mean

if TYPE_CHECKING:
    import pandas as pd

    from tuner.config import StudySpec

__all__ = [
    "load_table",
    "output_path",
    "write_csv",
    "select_columns",
    "prepare",
    "prepare_table",
    "study_table",
    "Prepared",
    "BatchDataset",
    "batches",
    "loader_batches",
    "PARQUET_SUFFIXES",
]

PARQUET_SUFFIXES = (".parquet", ".pq")


def load_table(
    path: str | Path,
    *,
    what: str = "data file",
    fix: str = "set `data` in the study file to a CSV or Parquet path",
) -> pd.DataFrame:
    """Read a CSV (or a ``.parquet`` file) with pandas and refuse files that cannot be a table.

    ``what`` names the file in messages and ``fix`` is the advice for a missing one (``tuner
    predict`` passes its own: the study file is not involved there).

    Raises:
        DataError: missing/empty/undecodable file, header only, one column, duplicate names.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {str(path)!r} is empty; it needs a header row and data rows")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        frame = _read_parquet(path, what)
        header = [str(c) for c in frame.columns]
    else:
        try:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            frame = _read_csv(path)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                "save it as UTF-8 CSV"
            ) from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise DataError(f"{what} {str(path)!r} is not a readable CSV: {str(e).strip()[:200]}") from None
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise DataError(f"{what} {str(path)!r} has duplicate column names {[c[:80] for c in duplicates]}; rename them")
    if frame.shape[1] == 1:
        sep = next((s for s in ";\t|" if s in str(frame.columns[0])), None)
        hint = f"; it looks {sep!r}-separated: save it comma-separated" if sep else "; it needs a target and features"
        raise DataError(f"{what} {str(path)!r} has one column {cut(str(frame.columns[0]))}{hint}")
    if len(frame) == 0:
        raise DataError(f"{what} {str(path)!r} has a header but no data rows")
    return frame


def output_path(path: str | Path, what: str = "output file") -> Path:
    """A path a CSV can be written to, checked before the work that produces it.

    Raises:
        DataError: a folder, a folder that does not exist, or not writable.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{what} {str(p)!r} is a folder; pass a file path, e.g. {str(p / 'predictions.csv')!r}")
    if not p.parent.is_dir():
        raise DataError(f"{what} {str(p)!r}: its folder {str(p.parent)!r} does not exist; create it or pass another path")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise DataError(f"{what} {str(p)!r} is not writable; pass another path")
    return p


def write_csv(frame: pd.DataFrame, path: Path, what: str = "output file") -> None:
    """``frame.to_csv`` without the index; a failed write (a full disk) is one line.

    Raises:
        DataError: the write failed.
    """
    try:
        frame.to_csv(path, index=False)
    except OSError as e:
        raise DataError(f"cannot write {what} {str(path)!r}: {e.strerror or e}; free some space or pass another path") from None


def _read_csv(path: Path) -> pd.DataFrame:
    # The C engine, not engine="pyarrow": on 1M rows x 20 floats (393 MB) it read in 2.1-2.9 s
    # at a 789 MB peak, pyarrow in 2.9-4.7 s at 1019 MB (865 MB with Arrow dtypes), on 2 cores.
    import pandas as pd

    return pd.read_csv(path, encoding="utf-8")


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError as e:
        raise DataError(f"reading {what} {str(path)!r} needs pyarrow: pip install pyarrow ({e})") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a broken file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{what} {str(path)!r} is not a readable Parquet file: {first}") from None
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()  # a saved index (e.g. pandas' to_parquet) is a column like any other
    frame.columns = [str(c) for c in frame.columns]
    return frame


def select_columns(
    frame: pd.DataFrame,
    target: str,
    features: Sequence[str] | None,
    *,
    source: str = "data",
    task: Literal["regression", "classification"] = "regression",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pick the target and feature columns as float arrays, collecting every problem first.

    Returns:
        ``(x, y, feature_names)``: x is ``(rows, features)`` float64, y is ``(rows,)``: float64
        for regression, the column's own values (labels of any type) for classification.
    """
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    if target not in columns:
        raise DataError(f"target column {target!r}{did_you_mean(target, columns)} is not in {source}; columns are {columns}")
    if features is None:
        # A column that is numbers but for a few bad cells ('?', '1,234') is a broken feature,
        # not a text column: keep it, so the check below names the cell instead of dropping it.
        features = [c for c in columns if c != target and numeric_share(frame[c]) >= 0.5]
        if not features:
            raise DataError(f"{source} has no numeric column besides the target {target!r}; columns are {columns}")
    missing = [c for c in features if c not in columns]
    if missing:
        hint = did_you_mean(missing[0], columns) if len(missing) == 1 else ""
        raise DataError(f"feature column(s) {missing}{hint} not in {source}; columns are {columns}")
    if target in features:
        raise DataError(f"target {target!r} is also listed as a feature; remove it from `features`")
    problems = []
    # Class labels may be text: only a regression target must be numeric.
    for name in [*features, target] if task == "regression" else features:
        col = frame[name]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            bad = pd.to_numeric(col, errors="coerce").isna() & col.notna()
            example = col[bad].iloc[0] if bad.any() else col.dropna().iloc[0] if col.notna().any() else None
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2 if bad.any() else None  # +2: header, 1-based
            where = f" (row {row})" if row else ""
            if isinstance(example, str) and re.fullmatch(r"[-+]?\d{1,3}([,.' ]\d{3})+([.,]\d+)?", example.strip()):
                where += " (thousands separators? write 1234.5, not 1,234.5)"
            problems.append(f"column {name!r} is not numeric, e.g. {example!r}{where}")
    if task == "regression" and any(f"column {target!r} " in p for p in problems):
        problems.append("set task = \"classification\" in the study file if the target holds class labels")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems) + "; fix or drop those values, or leave the column out of `features`")
    if task == "classification":
        labels = frame[target]
        if labels.isna().any():
            row = int(np.flatnonzero(labels.isna().to_numpy())[0]) + 2
            raise DataError(
                f"{source}: target {target!r} has {int(labels.isna().sum())} empty label(s) (first at row {row}); "
                "drop or fill those rows"
            )
        if labels.nunique() < 2:
            only = labels.iloc[0].item() if isinstance(labels.iloc[0], np.generic) else labels.iloc[0]
            raise DataError(f"{source}: target {target!r} has one class {only!r}; there is nothing to classify")
    numeric = [*features, target] if task == "regression" else list(features)
    values = frame[numeric].to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(values)
    if bad_rows.any():
        cols = [n for n, b in zip(numeric, bad_rows.any(axis=0)) if b]
        n_rows = int(bad_rows.any(axis=1).sum())
        raise DataError(
            f"{source}: NaN or infinite values in column(s) {cols} ({n_rows} row(s)); drop or fill those rows"
        )
    if task == "classification":
        return values, frame[target].to_numpy(), list(features)
    return values[:, :-1], values[:, -1], list(features)


@dataclass(frozen=True)
class Prepared:
    """A train/validation split with the standardiser fitted on the training rows only.

    ``x_*`` are standardised features, ``y_train`` is the standardised target (regression) that
    the loss sees, ``y_val_raw`` the validation target in its own units that the metrics see.
    """

    feature_names: list[str]
    target: str
    task: Literal["regression", "classification"]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val_raw: torch.Tensor
    x_mean_: np.ndarray
    x_std_: np.ndarray
    y_mean_: float
    y_std_: float
    train_index: np.ndarray
    val_index: np.ndarray
    classes: list[Any] | None = None
    constant_features: list[str] = field(default_factory=list)
    # The encoder (tuner.columns.TableEncoder.to_dict()) fitted on the training rows: the model
    # then reads raw columns; None for a plain numeric matrix (feature_names are its columns).
    encoder: dict[str, Any] | None = None
    roles: Roles | None = None
    class_weight_: list[float] | None = None  # cross-entropy weight per class, from the training rows

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def input_columns(self) -> list[str]:
        """The raw columns a model trained on this split reads."""
        return TableEncoder(self.encoder).input_columns if self.encoder else list(self.feature_names)

    @property
    def columns(self) -> str:
        """The column roles in one line (what ``launch`` prints and the study stores)."""
        return self.roles.describe() if self.roles else f"features: {len(self.feature_names)} numeric"

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> Prepared:
        """The same split with its tensors on ``device`` (done once per study, not per trial)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_val=self.x_val.to(device),
            y_val_raw=self.y_val_raw.to(device),
        )


def prepare(
    x: np.ndarray | pd.DataFrame,
    y: np.ndarray,
    *,
    feature_names: Sequence[str],
    target: str,
    fraction: float,
    seed: int,
    task: Literal["regression", "classification"] = "regression",
    split: tuple[np.ndarray, np.ndarray] | None = None,
    roles: Roles | None = None,
    layout: TableEncoder | None = None,
    class_weight: Literal["balanced"] | None = None,
) -> Prepared:
    """Split rows with a seeded permutation and standardise with train-only statistics.

    ``x`` is a float matrix, or a DataFrame of raw feature columns with their ``roles``: the
    encoder (imputation, indicators, one-hot levels) is then fitted on the training rows and the
    split's tensors are its output. ``layout``: another encoder whose inputs to keep (the folds
    of a cross-validation share one input width). ``split`` = ``(train_index, val_index)``
    replaces the permutation (a cross-validation fold, or all rows twice to refit a champion);
    ``fraction`` and ``seed`` are then unused.

    Raises:
        DataError: too few rows for the split, or a target with one distinct value.
    """
    n = len(x)
    n_val = max(1, int(round(fraction * n)))
    n_train = n - n_val if split is None else len(split[0])
    if n_train < 2:
        need = next(m for m in range(3, 10_000) if m - max(1, int(round(fraction * m))) >= 2)
        raise DataError(
            f"{n} row(s) are too few for a validation fraction of {fraction}: need at least {need} rows "
            "(2 to train, 1 to validate); add rows or lower validation.fraction"
        )
    if task == "regression" and np.ptp(y) == 0:
        raise DataError(f"target {target!r} has a single value ({y[0]:g}) in every row; there is nothing to learn")
    if split is not None:
        train_index, val_index = np.sort(split[0]), np.sort(split[1])
    else:
        order = np.random.default_rng(seed).permutation(n)
        is_val = np.zeros(n, dtype=bool)
        is_val[order[n_train:]] = True
        # Sorted row numbers, O(n) (the same arrays as sorting the two parts of the permutation).
        train_index, val_index = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        del is_val
    encoder = None
    raw_numeric = set(feature_names)
    if not isinstance(x, np.ndarray):
        if roles is None:
            raise TypeError("prepare() of a DataFrame needs its column roles (roles=...)")
        # Fit the encoder on the training rows only, like the standardiser below.
        encoder = TableEncoder.fit(x.iloc[train_index], roles, layout=layout)
        x, _ = encoder.transform(x)
        feature_names, raw_numeric = encoder.output_names, set(roles.numeric)
    # Fit the standardiser on the training rows only: no leakage from validation. ddof=1
    # matches pandas' DataFrame.std(). Done in place on the one float64 copy of the training
    # rows, with the same operations as numpy's std (x - mean, squared, summed): the same bits,
    # without whole-array temporaries (large CSVs).
    x_train = x[train_index]
    x_mean = x_train.mean(axis=0)
    x_train -= x_mean
    x_std = np.sqrt(np.add.reduce(np.multiply(x_train, x_train), axis=0) / (n_train - 1))
    constant = [name for name, s in zip(feature_names, x_std) if not s > 0]
    # An encoded input (a level, an indicator) absent from these training rows is zero, and inert.
    if [c for c in constant if c in raw_numeric]:
        warnings.warn(
            f"feature column(s) {constant} are constant on the training rows; they carry no information "
            "(kept, scaled by 1 instead of their zero spread)",
            stacklevel=2,
        )
    x_std = np.where(x_std > 0, x_std, 1.0)
    x_train /= x_std
    x_train_t = torch.from_numpy(x_train.astype(np.float32))
    del x_train
    x_val = x[val_index]
    x_val -= x_mean
    x_val /= x_std
    x_val_t = torch.from_numpy(x_val.astype(np.float32))
    del x_val
    classes = None
    weights = None
    if task == "classification":
        classes_arr, y_idx = np.unique(y, return_inverse=True)
        classes = classes_arr.tolist()
        if class_weight == "balanced":
            # sklearn's rule, on the training rows: n / (k * count); a class absent there gets 0.
            counts = np.bincount(y_idx[train_index], minlength=len(classes))
            weights = [float(len(train_index) / (len(classes) * c)) if c else 0.0 for c in counts]
        y_mean, y_std = 0.0, 1.0
        y_train_t = torch.as_tensor(y_idx[train_index], dtype=torch.long)
        y_val_t = torch.as_tensor(y_idx[val_index], dtype=torch.long)
    else:
        y_mean = float(y[train_index].mean())
        y_std = float(y[train_index].std(ddof=1)) or 1.0
        y_train_t = torch.as_tensor((y[train_index] - y_mean) / y_std, dtype=torch.float32)
        y_val_t = torch.as_tensor(y[val_index], dtype=torch.float32)
    return Prepared(
        feature_names=list(feature_names),
        target=target,
        task=task,
        x_train=x_train_t,
        y_train=y_train_t,
        x_val=x_val_t,
        y_val_raw=y_val_t,
        x_mean_=x_mean,
        x_std_=x_std,
        y_mean_=y_mean,
        y_std_=y_std,
        train_index=train_index,
        val_index=val_index,
        classes=classes,
        constant_features=constant,
        encoder=encoder.to_dict() if encoder is not None else None,
        roles=roles,
        class_weight_=weights,
    )


def prepare_table(
    table: Table,
    *,
    fraction: float,
    seed: int,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    layout: TableEncoder | None = None,
    class_weight: Literal["balanced"] | None = None,
) -> Prepared:
    """``prepare`` on a raw table: encoder and standardiser fitted on its training rows."""
    return prepare(
        table.x, table.y, feature_names=table.roles.features, target=table.target, fraction=fraction, seed=seed,
        task=table.task, split=split, roles=table.roles, layout=layout, class_weight=class_weight,
    )


def study_table(spec: StudySpec, frame: pd.DataFrame | None = None) -> Table:
    """The study's table (read from ``spec.data`` unless given) with its target and roles."""
    frame = load_table(spec.data) if frame is None else frame
    return table_inputs(
        frame, spec.target, features=spec.features, categorical=spec.categorical, exclude=spec.exclude,
        source=str(spec.data), task=spec.task,
    )


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled index batches (on the CPU; the same order for every loader)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


class BatchDataset(Dataset):
    """Rows of host tensors fetched a batch at a time: one index tensor -> one (x, y) batch.

    Used with ``DataLoader(batch_size=None, sampler=...)`` so that there is one call and no
    per-sample collate per batch; this is the path for data too large to live on the device.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class _IndexBatches(Sampler):
    def __init__(self, index_batches: list[torch.Tensor]) -> None:
        self.index_batches = index_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.index_batches)

    def __len__(self) -> int:
        return len(self.index_batches)


def loader_batches(
    dataset: BatchDataset, index_batches: list[torch.Tensor], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one epoch through a torch DataLoader, moved to ``device``."""
    # Only host tensors can be pinned (a Prepared already on the GPU would raise in the loader).
    pin = device.type == "cuda" and dataset.x.device.type == "cpu"
    loader = DataLoader(dataset, batch_size=None, sampler=_IndexBatches(index_batches), pin_memory=pin)
    for xb, yb in loader:
        yield xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
