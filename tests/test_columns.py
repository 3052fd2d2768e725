"""Real tables: column roles, the encoder fitted on training rows only, missing and unseen
values at predict time, target hygiene, parquet, and old numeric checkpoints."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CARS
from tuner.columns import Roles, detect_roles, table_inputs
from tuner.data import load_table, prepare, prepare_table
from tuner.encoder import TableEncoder
from tuner.errors import DataError
from tuner.model import Checkpoint, ModelConfig, TabularNet, encode_frame, predict_frame
from tuner.train import train

PENGUINS = Path(__file__).resolve().parents[1] / "data" / "penguins.csv"


def _frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "rownames": np.arange(1, n + 1),
        "x": rng.normal(size=n),
        "colour": rng.choice(["red", "green", "blue"], size=n),
        "flag": rng.choice([True, False], size=n),
        "grade": pd.Categorical(rng.choice(["lo", "hi"], size=n)),
        "day": pd.date_range("2024-01-01", periods=n, freq="D").strftime("%Y-%m-%d"),
        "const": 7,
        "name": [f"item {i}" for i in range(n)],
        "count": rng.integers(0, 4, size=n),
        "y": rng.normal(size=n),
    })


def test_roles_are_detected_once_and_described_in_one_line() -> None:
    with pytest.warns(UserWarning, match=r"rownames \(row id\), const \(constant\), name \(row id\)"):
        roles = detect_roles(_frame(), "y")
    assert roles.numeric == ["x", "count"]
    assert roles.categorical == ["colour", "flag", "grade"]
    assert roles.date == ["day"]
    assert roles.excluded == {"rownames": "row id", "const": "constant", "name": "row id"}
    assert roles.features == ["x", "colour", "flag", "grade", "day", "count"]
    assert roles.describe() == (
        "features: 2 numeric, 3 categorical (colour, flag, grade), 1 date (day); "
        "excluded: rownames (row id), const (constant), name (row id)"
    )


def test_study_file_overrides_categorical_exclude_and_features() -> None:
    frame = _frame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roles = detect_roles(frame, "y", categorical=["count"], exclude=["day", "flag"])
    assert "count" in roles.categorical and roles.excluded["day"] == "excluded in the study file"
    assert "flag" not in roles.features
    # an explicit feature list is used as given: a row id the user asks for is kept
    roles = detect_roles(frame, "y", features=["rownames", "colour"])
    assert (roles.numeric, roles.categorical, roles.excluded) == (["rownames"], ["colour"], {})
    with pytest.raises(DataError, match=r"target 'y' is listed in `categorical`.*`exclude` names column\(s\) \['nope'\]"):
        detect_roles(frame, "y", categorical=["y"], exclude=["nope"])
    with pytest.raises(DataError, match=r"`exclude` names column\(s\) \['Colour'\] \(did you mean 'colour'\?\) that are not in"):
        detect_roles(frame, "y", exclude=["Colour"])


def test_an_unnamed_exported_index_is_a_row_id_but_a_float_column_never_is() -> None:
    frame = pd.read_csv(io.StringIO(",price,carat\n" + "".join(f"{i},{300 + i},{0.2 + i / 7:.3f}\n" for i in range(1, 40))))
    with pytest.warns(UserWarning, match=r"Unnamed: 0 \(row id\)"):
        roles = detect_roles(frame, "price")
    assert roles.numeric == ["carat"]


def test_a_numeric_feature_with_a_stray_cell_names_row_and_value_cut_to_80_characters() -> None:
    frame = pd.DataFrame({"a": ["1", "2", "x" * 200, "4"], "y": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(DataError, match=r"column 'a' holds numbers but 1 cell\(s\) are not: row 4 'x{76}\.\.\.;") as e:
        detect_roles(frame, "y")
    assert "x" * 81 not in str(e.value)
    assert "categorical" in str(e.value)  # the fix: declare it categorical, or clean the cell
    roles = detect_roles(frame, "y", categorical=["a"])
    assert roles.categorical == ["a"]


def test_a_numeric_target_with_a_stray_question_mark_is_an_error_not_25_classes(tmp_path: Path) -> None:
    from tuner.tasks import infer_task

    rows = "".join(f"{i},{i * 1.5}\n" for i in range(30)).replace("12,18.0", "12,?")
    path = tmp_path / "t.csv"
    path.write_text("x,y\n" + rows)
    task, note = infer_task(path, "y")  # type: ignore[misc]
    assert task == "regression" and "numbers but for a few cells" in note
    with pytest.raises(DataError, match=r"target 'y' holds numbers but 1 cell\(s\) are not: row 14 '\?'"):
        table_inputs(load_table(path), "y")


def test_rows_with_a_missing_target_are_dropped_with_a_count() -> None:
    frame = _frame()
    frame.loc[[3, 10, 11], "y"] = np.nan
    with pytest.warns(UserWarning, match=r"3 row\(s\) with an empty target 'y' dropped \(first at row 5\); 57 rows remain"):
        table = table_inputs(frame, "y", features=["x", "colour"])
    assert len(table.y) == len(table.frame) == 57 and np.isfinite(table.y).all()


def test_imputation_and_indicators_are_fitted_on_the_training_rows_only() -> None:
    frame = pd.DataFrame({"a": np.arange(40, dtype=float), "b": np.arange(40, dtype=float), "y": np.arange(40.0) % 7})
    d0 = prepare_table(table_inputs(frame, "y", features=["a", "b"]), fraction=0.25, seed=0)
    val, train_rows = d0.val_index, d0.train_index
    frame.loc[val, "a"] = np.nan  # missing only in validation rows: no indicator, no effect on the median
    frame.loc[val[:2], "b"] = 1e9  # extreme validation values do not move the training median
    frame.loc[train_rows[:3], "b"] = np.nan
    d = prepare_table(table_inputs(frame, "y", features=["a", "b"]), fraction=0.25, seed=0)
    np.testing.assert_array_equal(d.val_index, val)
    assert d.feature_names == ["a", "b", "b:missing"]
    enc = TableEncoder(d.encoder)
    medians = {c["name"]: c["medians"][0] for c in enc.columns}
    assert medians["a"] == np.median(np.arange(40.0)[train_rows])
    assert medians["b"] == np.nanmedian(frame.loc[train_rows, "b"])
    # the validation rows' missing a took the training median: standardised, the training mean's distance
    x_val_a = d.x_val[:, 0].numpy() * d.x_std_[0] + d.x_mean_[0]
    np.testing.assert_allclose(x_val_a, medians["a"], rtol=1e-5)


def test_folds_share_one_layout_and_a_level_a_fold_never_trained_on_is_inert(tmp_path: Path) -> None:
    from tests.conftest import write_study
    from tuner.config import load_spec
    from tuner.inputs import load_data
    from tuner.validation import load_folds

    rng = np.random.default_rng(3)
    n = 50
    frame = pd.DataFrame({"x": rng.normal(size=n), "c": rng.choice(["p", "q"], size=n), "y": rng.normal(size=n)})
    frame.loc[7, "x"] = np.nan
    frame.loc[0:5, "c"] = "rare"  # 6 rows: kept as a level on all rows; some folds train on few or none
    csv = tmp_path / "t.csv"
    frame.to_csv(csv, index=False)
    spec = load_spec(write_study(tmp_path, data=csv, target="y", task="regression", body="[validation]\nfolds = 5\n"))
    _, rows = load_data(spec)
    cv = load_folds(spec, rows)
    widths = {f.n_features for f in cv.folds} | {cv.all_rows.n_features}  # type: ignore[union-attr]
    assert len(widths) == 1
    names = cv.folds[0].feature_names
    assert "x:missing" in names and "c=rare" in names
    for fold in cv.folds:
        if 7 in fold.val_index:  # the fold whose training rows have no missing x: its indicator is inert
            col = names.index("x:missing")
            assert torch.count_nonzero(fold.x_train[:, col]) == 0 and torch.count_nonzero(fold.x_val[:, col]) == 0


def test_unseen_levels_and_all_missing_rows_predict_known_labels() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = table_inputs(pd.read_csv(PENGUINS), "species", task="classification")
    d = prepare_table(table, fraction=0.2, seed=0)
    model = train(dict(lr=0.02, epochs=30, batch_size=32, hidden_size=8), d, device="cpu").model
    assert model is not None
    new = pd.DataFrame({"island": ["Atlantis", None], "bill_length_mm": [40.0, None], "bill_depth_mm": [18.0, None],
                        "flipper_length_mm": [190.0, None], "body_mass_g": [3800.0, None], "sex": ["male", None],
                        "year": [2008, None]})
    with pytest.warns(UserWarning, match=r"levels not seen in training.*island \(2 row\(s\)\)"):
        labels = predict_frame(model, new)
    assert set(labels) <= {"Adelie", "Chinstrap", "Gentoo"}
    # an unseen level is the block's training average: zero once standardised
    x, _ = encode_frame(model, new)
    island = [i for i, n in enumerate(model.config.feature_names) if n.startswith("island=")]
    z = (torch.from_numpy(x[:, island]) - model.x_mean[island]) / model.x_std[island]
    assert z.abs().max() < 1e-6
    proba = predict_frame(model, new, proba=True)
    assert np.isfinite(proba.to_numpy()).all()


def test_rare_levels_share_the_other_slot_which_takes_new_levels_too() -> None:
    frame = pd.DataFrame({"c": ["a"] * 30 + ["b"] * 30 + ["z1", "z2", "z3"], "y": np.arange(63.0)})
    roles = Roles(numeric=[], categorical=["c"], order=["c", "y"])
    enc = TableEncoder.fit(frame, roles)
    assert enc.output_names == ["c=a", "c=b", "c=<other>"]
    x, notes = enc.transform(pd.DataFrame({"c": ["a", "z2", "never seen", None]}))
    np.testing.assert_array_equal(x, [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert notes == []  # <other> trained on rows: nothing neutral
    nan_level = TableEncoder.fit(pd.DataFrame({"c": ["a"] * 10 + [None] * 10}), roles)
    assert nan_level.output_names == ["c=a", "c=<missing>"]  # missing is a level of its own


def test_dates_expand_to_calendar_parts() -> None:
    frame = pd.DataFrame({"d": ["2024-03-01", "2023-12-31", None, "2024-02-29T10:00:00"]})
    enc = TableEncoder.fit(frame, Roles(numeric=[], categorical=[], date=["d"], order=["d"]))
    assert enc.output_names == ["d:year", "d:month", "d:dayofweek", "d:dayofyear", "d:missing"]
    x, _ = enc.transform(frame)
    np.testing.assert_array_equal(x[0], [2024, 3, 4, 61, 0])  # a Friday, day 61 of a leap year
    assert x[2, -1] == 1 and x[2, 0] == 2024  # missing: the median year, flagged


def test_the_encoder_travels_in_the_weights_only_checkpoint() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = table_inputs(pd.read_csv(PENGUINS), "body_mass_g")
    d = prepare_table(table, fraction=0.2, seed=0)
    model = train(dict(lr=0.02, epochs=3, batch_size=32, hidden_size=4), d, device="cpu").model
    buf = io.BytesIO()
    torch.save(Checkpoint(model.config, model.state_dict()).to_payload(), buf)
    buf.seek(0)
    again = Checkpoint.from_payload(torch.load(buf, weights_only=True)).build()
    assert again.config.input_columns == ["species", "island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm",
                                          "sex", "year"]
    raw = pd.read_csv(PENGUINS)
    np.testing.assert_array_equal(predict_frame(again, raw), predict_frame(model, raw))
    assert np.isfinite(predict_frame(again, raw)).all()  # the all-NaN rows too


def test_a_text_cell_in_a_numeric_column_at_predict_names_column_and_row() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = prepare_table(table_inputs(pd.read_csv(PENGUINS), "species", task="classification"), fraction=0.2, seed=0)
    model = train(dict(lr=0.02, epochs=1, batch_size=64, hidden_size=0), d, device="cpu").model
    frame = pd.read_csv(PENGUINS).head(4).astype({"bill_depth_mm": object})
    frame.loc[2, "bill_depth_mm"] = "deep"
    with pytest.raises(DataError, match=r"column 'bill_depth_mm' is numeric in the model, but 1 cell\(s\) are not numbers: row 4 'deep'"):
        predict_frame(model, frame)


def test_an_old_numeric_champion_still_loads_and_imputes_the_training_mean() -> None:
    config = ModelConfig(feature_names=["wt", "hp"], target="mpg", hidden_size=3)
    net = TabularNet(config)
    net.set_scaling([3.0, 150.0], [1.0, 60.0], 20.0, 6.0)
    payload = Checkpoint(config, net.state_dict()).to_payload()
    del payload["config"]["encoder"]  # a checkpoint written before the encoder existed
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    old = Checkpoint.from_payload(torch.load(buf, weights_only=True)).build()
    assert old.config.encoder is None and old.config.input_columns == ["wt", "hp"]
    frame = pd.DataFrame({"wt": [3.0, np.nan], "hp": [150.0, 150.0], "extra": ["x", "y"]})
    with pytest.warns(UserWarning, match=r"imputed with the training mean: wt \(1 row\(s\)\)"):
        preds = predict_frame(old, frame)
    assert preds[0] == pytest.approx(preds[1])  # the missing wt is the training mean, 3.0


def test_parquet_tables_load_like_csv(tmp_path: Path) -> None:
    frame = pd.read_csv(PENGUINS)
    frame.to_parquet(tmp_path / "p.parquet")
    back = load_table(tmp_path / "p.parquet")
    assert list(back.columns) == list(frame.columns) and len(back) == 344
    assert back["bill_length_mm"].isna().sum() == 2
    cars = load_table(CARS)
    assert len(cars) == 32


def test_a_missing_input_file_is_not_blamed_on_the_study_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file .* set `data` in the study file"):
        load_table(tmp_path / "nosuch.csv")
    with pytest.raises(DataError, match=r"^input file '.*nosuch.csv' does not exist; pass an existing CSV") as e:
        load_table(tmp_path / "nosuch.csv", what="input file", fix="pass an existing CSV or Parquet file to --input")
    assert "study file" not in str(e.value)


def test_balanced_class_weights_come_from_the_training_rows() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    y = np.where(np.arange(80) < 60, "many", "few")
    d = prepare(x, y, feature_names=["a", "b"], target="y", fraction=0.25, seed=0, task="classification",
                class_weight="balanced")
    counts = np.bincount(d.y_train.numpy())
    assert d.class_weight_ == pytest.approx([len(d.y_train) / (2 * c) for c in counts])
    r = train(dict(lr=0.05, epochs=3, batch_size=16, hidden_size=0), d, device="cpu")
    assert np.isfinite(r.metrics["log_loss"])


@pytest.mark.slow
def test_penguins_launch_prints_roles_and_its_champion_predicts_raw_rows_without_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance: the raw penguins CSV trains with no manual work; the champion predicts every
    row (NaN rows included) through `tuner predict` and through MLflow's pyfunc with pickle
    refused, identically; a CSV with an unseen island and an all-empty row gets known labels."""
    from tests.conftest import mlflow_store, write_study
    from tuner.cli import main

    tracking = mlflow_store(tmp_path / "mlflow.db")
    space = ('lr = { type = "float", low = 1e-2, high = 1e-1, log = true }\n'
             'epochs = { type = "int", low = 5, high = 8 }\n'
             'batch_size = { type = "categorical", choices = [32] }\n'
             'hidden_size = { type = "int", low = 4, high = 8 }\n'
             'activation = { type = "categorical", choices = ["relu", "tanh"] }\n')
    study = write_study(tmp_path, "penguins", data=PENGUINS, target="species", n_trials=2, space=space)
    assert main(["--debug", "launch", str(study), "--tracking-uri", tracking, "--no-progress", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "features: 5 numeric, 2 categorical (island, sex)" in err
    assert main(["--debug", "best", str(study), "--tracking-uri", tracking]) == 0
    assert "features: 5 numeric, 2 categorical (island, sex)" in capsys.readouterr().out

    out = tmp_path / "all.csv"
    assert main(["predict", "penguins@champion", "--input", str(PENGUINS), "--tracking-uri", tracking,
                 "--output", str(out)]) == 0
    ours = pd.read_csv(out)["prediction"]
    raw = pd.read_csv(PENGUINS)
    assert len(ours) == 344 and ours.notna().all() and set(ours) <= set(raw.species)

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    pyfunc = mlflow.pyfunc.load_model("models:/penguins@champion")
    np.testing.assert_array_equal(pyfunc.predict(raw.drop(columns="species")), ours.to_numpy())

    new = tmp_path / "new.csv"
    new.write_text("island,bill_length_mm,bill_depth_mm,flipper_length_mm,body_mass_g,sex,year\n"
                   "Atlantis,39.1,18.7,181,3750,male,2007\n,,,,,,\nBiscoe,47.5,14.2,220,5000,female,2009\n")
    capsys.readouterr()
    assert main(["predict", "penguins@champion", "--input", str(new), "--tracking-uri", tracking]) == 0
    got = capsys.readouterr()
    assert set(pd.read_csv(io.StringIO(got.out))["prediction"]) <= set(raw.species)
    assert "levels not seen in training" in got.err
    capsys.readouterr()
    assert main(["predict", "penguins@champion", "--input", str(tmp_path / "nosuch.csv"), "--tracking-uri", tracking]) == 2
    assert "study file" not in capsys.readouterr().err
