from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import CARS, STUDIES, write_study
from tuner.config import load_spec
from tuner.data import load_table, select_columns
from tuner.errors import ConfigError, DataError
from tuner.tasks import infer_task_of


@pytest.fixture(scope="module")
def cars() -> pd.DataFrame:
    return load_table(CARS)


@pytest.mark.parametrize(
    ("column", "task", "why"),
    [
        ("mpg", "regression", "25 distinct numeric values"),
        ("hp", "regression", "22 distinct integer values"),
        ("am", "classification", "2 distinct integer values"),
        ("carb", "classification", "6 distinct integer values"),
        ("model", "classification", "is not numeric"),
    ],
)
def test_task_is_inferred_from_the_target_column(cars: pd.DataFrame, column: str, task: str, why: str) -> None:
    inferred, note = infer_task_of(cars[column])
    assert inferred == task
    assert f"target {column!r}" in note and why in note


def test_inferred_task_and_its_reason_reach_the_spec_and_task_overrides_it(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, "am", target="am"))
    assert (spec.task, spec.metric) == ("classification", "accuracy")
    assert spec.task_note == "task inferred as classification: target 'am' has 2 distinct integer values"
    regress = load_spec(write_study(tmp_path, "am_reg", target="am", task="regression"))
    assert (regress.task, regress.metric, regress.task_note) == ("regression", "rmse", None)
    assert load_spec(write_study(tmp_path, "mpg")).task == "regression"


def test_metric_that_contradicts_the_inferred_task_names_the_inference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metric 'rmse' does not fit task 'classification' \(task inferred as "
                       r"classification: target 'am' has 2 distinct integer values; set task to override\)"):
        load_spec(write_study(tmp_path, target="am", metric="rmse"))


def test_task_note_cannot_come_from_the_study_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'task_note' is set by tuner"):
        load_spec(write_study(tmp_path, task_note="mine"))


def test_text_labels_are_allowed_for_classification_only(cars: pd.DataFrame) -> None:
    frame = cars.assign(gearbox=np.where(cars.am == 1, "manual", "automatic"))
    x, y, names = select_columns(frame, "gearbox", ["wt", "hp"], task="classification")
    assert x.shape == (32, 2) and sorted(set(y)) == ["automatic", "manual"]
    with pytest.raises(DataError, match=r"column 'gearbox' is not numeric, e.g. 'manual' \(row 2\); "
                       r"set task = \"classification\" in the study file"):
        select_columns(frame, "gearbox", ["wt"], task="regression")


def test_missing_or_single_class_labels_are_refused(cars: pd.DataFrame) -> None:
    holes = cars.assign(am=cars.am.astype("object").where(cars.index != 3))
    with pytest.raises(DataError, match=r"target 'am' has 1 empty label\(s\) \(first at row 5\)"):
        select_columns(holes, "am", ["wt"], task="classification")
    with pytest.raises(DataError, match=r"target 'am' has one class 1; there is nothing to classify"):
        select_columns(cars[cars.am == 1], "am", ["wt"], task="classification")


def test_shipped_transmission_study_is_a_cross_validated_classifier() -> None:
    spec = load_spec(STUDIES / "cars_am.toml")
    assert (spec.target, spec.task, spec.metric, spec.study_direction) == ("am", "classification", "accuracy", "maximize")
    assert (spec.validation.folds, spec.validation.repeats) == (5, 2)
    assert "n_layers" in load_spec(STUDIES / "cars_mlp.toml").space
