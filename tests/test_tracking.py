"""Tracker against a real SQLite MLflow store: a trial's run, its weights, the store's settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from tuner.model import Checkpoint, ModelConfig, TabularNet
from tuner.tracking import WEIGHTS_FILE, Tracker


def _checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    config = ModelConfig(feature_names=["wt", "hp"], target="mpg", hidden_size=3)
    return Checkpoint(config, {k: v.clone() for k, v in TabularNet(config).state_dict().items()})


def test_a_trial_run_holds_its_rows_and_weights_and_closes(tracking_uri: str) -> None:
    tracker = Tracker(tracking_uri, "exp")
    parent = tracker.start_parent("exp", {})
    run_id = tracker.start_trial(parent, "exp", 3)
    checkpoint = _checkpoint()
    tracker.end_trial(
        run_id,
        status="FINISHED",
        params={"lr": 0.01, "hidden_size": 3},
        history={0: {"rmse": 4.0}, 10: {"rmse": 3.0}},
        metrics={"rmse": 3.0},
        tags={"tuner.state": "COMPLETE"},
        checkpoint=checkpoint,
    )

    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01", "hidden_size": "3"}
    assert run.data.metrics == {"rmse": 3.0, "final_rmse": 3.0}
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "rmse")] == [(0, 4.0), (10, 3.0)]
    assert run.data.tags["tuner.trial"] == "3" and run.data.tags["mlflow.parentRunId"] == parent
    # The weights went straight to the run's artifact folder: found and read back like any artifact.
    assert tracker.has_checkpoint(run_id)
    assert [f.path for f in tracker.client.list_artifacts(run_id)] == [WEIGHTS_FILE]
    loaded, digest = tracker.load_checkpoint(run_id)
    assert loaded.config == checkpoint.config and len(digest) == 64
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in checkpoint.state_dict.items())
    assert tracker._artifact_uris == {}  # nothing kept per closed run


def test_weights_of_a_run_another_tracker_opened_are_logged_through_mlflow(tracking_uri: str) -> None:
    run_id = Tracker(tracking_uri, "exp").start_trial(None, "exp", 0)
    other = Tracker(tracking_uri, "exp")  # e.g. the champion refit after a resumed launch

    other.save_checkpoint(run_id, _checkpoint())

    assert other.has_checkpoint(run_id)


def test_sqlite_store_commits_without_fsync_in_wal_mode(tmp_path: Path, tracking_uri: str) -> None:
    tracker = Tracker(tracking_uri, "exp")
    engine = tracker.client._tracking_client.store.engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with sqlite3.connect(tmp_path / "mlflow.db") as other:  # the mode lives in the file
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
