from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CARS
from tuner.data import BatchDataset, batches, load_table, loader_batches, prepare, select_columns
from tuner.errors import DataError


@pytest.fixture(scope="module")
def cars() -> pd.DataFrame:
    return load_table(CARS)


def test_cars_csv_is_the_published_mtcars(cars: pd.DataFrame) -> None:
    assert cars.shape == (32, 12)
    assert list(cars.columns) == ["model", "mpg", "cyl", "disp", "hp", "drat", "wt", "qsec", "vs", "am", "gear", "carb"]
    assert cars["mpg"].sum() == pytest.approx(642.9)
    assert cars["wt"].sum() == pytest.approx(102.952)
    assert cars.loc[cars.model == "Maserati Bora", "hp"].item() == 335


def test_default_features_are_the_numeric_columns_but_the_target(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", None)
    assert names == ["cyl", "disp", "hp", "drat", "wt", "qsec", "vs", "am", "gear", "carb"]
    assert x.shape == (32, 10) and y[0] == 21.0


def test_standardiser_is_fitted_on_training_rows_only_and_matches_pandas(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", ["wt", "hp"])
    d = prepare(x, y, feature_names=names, target="mpg", fraction=0.25, seed=3)
    train_rows = cars.iloc[d.train_index]
    np.testing.assert_allclose(d.x_mean_, train_rows[["wt", "hp"]].mean().to_numpy())
    np.testing.assert_allclose(d.x_std_, train_rows[["wt", "hp"]].std().to_numpy())
    assert d.y_mean_ == pytest.approx(train_rows["mpg"].mean())
    assert d.y_std_ == pytest.approx(train_rows["mpg"].std())
    # the standardised training columns have mean 0 and (ddof=1) std 1; validation rows do not
    assert d.x_train.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(d.x_train.std(0), torch.ones(2))
    assert not torch.allclose(d.x_val.mean(0), torch.zeros(2), atol=1e-3)


def test_split_is_seeded_disjoint_and_complete(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", None)
    a = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
    b = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
    c = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=1)
    assert (len(a.train_index), len(a.val_index)) == (26, 6)
    assert set(a.train_index).isdisjoint(a.val_index)
    assert sorted([*a.train_index, *a.val_index]) == list(range(32))
    np.testing.assert_array_equal(a.val_index, b.val_index)
    assert list(a.val_index) != list(c.val_index)
    np.testing.assert_allclose(a.y_val_raw.numpy(), y[a.val_index], rtol=1e-6)


def test_dataloader_batches_equal_the_in_memory_batches(cars: pd.DataFrame) -> None:
    x, y, names = select_columns(cars, "mpg", None)
    d = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
    index = batches(len(d.x_train), 8, torch.Generator().manual_seed(5))
    got = list(loader_batches(BatchDataset(d.x_train, d.y_train), index, torch.device("cpu")))
    assert [len(b[0]) for b in got] == [8, 8, 8, 2]
    for (xb, yb), idx in zip(got, index):
        torch.testing.assert_close(xb, d.x_train[idx])
        torch.testing.assert_close(yb, d.y_train[idx])


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file '.*missing.csv' does not exist; set `data` in the study file"):
        load_table(tmp_path / "missing.csv")


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is empty; it needs a header row and data rows"):
        load_table(_csv(tmp_path, ""))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has a header but no data rows"):
        load_table(_csv(tmp_path, "a,b,y\n"))


def test_target_missing_lists_the_columns(cars: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"target column 'MPG' \(did you mean 'mpg'\?\) is not in data; columns are \['model', 'mpg', "):
        select_columns(cars, "MPG", None)


def test_missing_feature_is_named(cars: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"feature column\(s\) \['weight'\] not in data"):
        select_columns(cars, "mpg", ["wt", "weight"])


def test_non_numeric_feature_names_column_and_example(cars: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"column 'model' is not numeric, e.g. 'Mazda RX4' \(row 2\)"):
        select_columns(cars, "mpg", ["wt", "model"])


def test_non_numeric_target(cars: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"column 'model' is not numeric"):
        select_columns(cars, "model", ["wt"])


def test_nan_and_inf_name_columns_and_row_count(tmp_path: Path) -> None:
    frame = load_table(_csv(tmp_path, "a,b,y\n1,2,3\n,2,3\n1,inf,3\n4,5,\n1,2,3\n"))
    with pytest.raises(DataError, match=r"NaN or infinite values in column\(s\) \['a', 'b', 'y'\] \(3 row\(s\)\)"):
        select_columns(frame, "y", None)


def test_constant_feature_warns_and_stays_finite(cars: pd.DataFrame) -> None:
    frame = cars.assign(const=1.0)
    x, y, names = select_columns(frame, "mpg", ["wt", "const"])
    with pytest.warns(UserWarning, match=r"feature column\(s\) \['const'\] are constant on the training rows"):
        d = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
    assert d.constant_features == ["const"]
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_val).all()
    assert d.x_std_[1] == 1.0


def test_too_few_rows_for_the_split(tmp_path: Path) -> None:
    frame = load_table(_csv(tmp_path, "a,y\n1,2\n2,3\n"))
    x, y, names = select_columns(frame, "y", None)
    with pytest.raises(DataError, match=r"2 row\(s\) are too few for a validation fraction of 0.2: need at least 3 rows"):
        prepare(x, y, feature_names=names, target="y", fraction=0.2, seed=0)
