"""Issue 3, B7: a learning rate up to 10 makes some trials diverge; they stop at the first
non-finite loss, are PRUNED with the reason (user_attrs and MLflow tag), never COMPLETE with an
infinite value, and the study still registers a finite champion."""

from __future__ import annotations

import math
from pathlib import Path

from conftest import mlflow_store, write_study
from faultkit import (
    champion,
    check_consistent,
    mlflow_runs,
)

from tuner.config import load_spec
from tuner.session import launch

SPACE = (
    'lr = { type = "float", low = 1e-2, high = 10.0, log = true }\n'
    'epochs = { type = "int", low = 2, high = 3 }\n'
    'batch_size = { type = "categorical", choices = [8, 16] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    'optimizer = { type = "fixed", value = "sgd" }\n'
)


def test_b7_diverging_trials_are_pruned_with_the_reason_and_the_champion_is_finite(tmp_path: Path) -> None:
    path = write_study(tmp_path, "b7", space=SPACE, n_trials=6, tracking_uri=mlflow_store(tmp_path / "mlflow.db"))
    spec = load_spec(path)

    summary = launch(spec, progress=False)

    trials, runs = check_consistent(spec)
    assert summary.n_finished == 6 and len(trials) == 6
    diverged = [t for t in trials if "non-finite" in t.user_attrs.get("stop_reason", "")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert diverged and complete, [(t.params["lr"], t.state.name) for t in trials]
    run_of = {r.info.run_id: r for r in runs}
    for t in diverged:
        assert t.state.name == "PRUNED"
        assert len(t.intermediate_values) < t.params["epochs"]  # stopped at the first non-finite loss
        assert all(math.isfinite(v) for v in t.intermediate_values.values())
        run = run_of[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["tuner.stop_reason"] == t.user_attrs["stop_reason"]
        assert f"(lr={t.params['lr']:g})" in t.user_attrs["stop_reason"]
    assert all(math.isfinite(t.value) and t.value < 1e6 for t in complete)
    assert min(t.params["lr"] for t in diverged) > 0.1  # only high rates diverge
    assert all(math.isfinite(v) for r in runs for v in r.data.metrics.values())  # no 1.8e308 in MLflow
    best = champion(spec)
    assert best is not None and math.isfinite(float(best.tags["tuner.value"]))
    assert len([r for r in mlflow_runs(spec) if r.data.tags["tuner.role"] == "trial"]) == 6
