"""The gate and the trial loop's storage cost: statements per trial pinned, asks in one read.

Real SQLite files for the study and the MLflow store; SQL statements counted by SQLAlchemy's
``before_cursor_execute`` (``benchmarks._arms.storage_probe``), deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import mlflow_store, write_study

# Upper bounds of SQL statements per trial of the trial loop (ask, params, reports, user attrs,
# tell, the MLflow run) for the study below: 6 trials of 6-8 epochs reported every 2nd epoch, 5
# params. Measured 2026-12-01 (optuna 5.0.0, mlflow 3.17): Optuna 59.7 sequential, 62.7 fused
# (before one read per ask and the tell without read-back: 76.3 and 88.3); MLflow 42 (21 of them
# MLflow's own 3 PRAGMAs at the start of each of its 7 sessions). About 8% headroom.
MAX_OPTUNA_SQL = {"sequential": 64, "fused": 68}
MAX_MLFLOW_SQL = 44

SPACE = (
    'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 6, high = 8 }\n'
    'batch_size = { type = "categorical", choices = [8] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_statements_per_trial_stay_under_their_pinned_bound(tmp_path: Path, execution: str) -> None:
    from benchmarks._arms import per_trial, storage_probe
    from tuner.config import load_spec
    from tuner.session import launch

    body = '[validation]\nfraction = 0.25\n[pruner]\nname = "median"\noptions = { n_startup_trials = 2 }\n'
    spec = load_spec(write_study(tmp_path, "cost", n_trials=6, space=SPACE, execution=execution, report_every=2, body=body))
    with storage_probe() as counts:
        summary = launch(spec, storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=mlflow_store(tmp_path / "mlflow.db"),
                         progress=False, promote=False, report=False)
    cost = per_trial(counts)
    print(execution, cost)
    assert summary.n_finished == 6 and cost["trials"] == 6
    assert cost["optuna_sql"] <= MAX_OPTUNA_SQL[execution], cost
    assert cost["mlflow_sql"] <= MAX_MLFLOW_SQL, cost


def test_ask_many_hands_out_at_most_the_free_slots_in_one_go(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec(write_study(tmp_path, "many"))
    gate = TrialGate(open_study(spec, url), 3, StudyLock(url, spec.name))
    try:
        first = gate.ask_many(2)
        assert [t.number for t in first] == [0, 1] and gate.n_asked == 2
        rest = gate.ask_many(5)  # one slot left of 3
        assert [t.number for t in rest] == [2]
        assert gate.ask_many(5, wait=False) == []  # every slot is held by this process's trials
        rest[0].report(0.5, 0)
        told = [gate.tell(t, 1.0 + t.number) for t in first] + [gate.tell(rest[0], state=TrialState.PRUNED)]
        assert [t.state for t in told] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
        assert gate.ask_many(5) == [] and gate.n_finished == 3
        stored = gate.study.get_trials()
        assert [(t.state, t.value) for t in stored[:2]] == [(TrialState.COMPLETE, 1.0), (TrialState.COMPLETE, 2.0)]
        # As study.tell: a PRUNED trial's value is its last report, in the storage and in what tell returned.
        assert (stored[2].state, stored[2].value, told[2].value) == (TrialState.PRUNED, 0.5, 0.5) and not gate.in_flight
    finally:
        gate.close()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")
def test_storage_probe_counts_the_heartbeat_threads_writes_apart_from_the_trial_loops(tmp_path: Path) -> None:
    """The evidence for the fused storage cost (docs/performance.md "Storage per trial"): the
    heartbeat thread's beats are counted by thread, not as the trial loop's statements."""
    import time

    from benchmarks._arms import per_trial, storage_probe
    from tuner.config import load_spec
    from tuner.gate import Heartbeat
    from tuner.study import open_study

    spec = load_spec(write_study(tmp_path, "beats", body="[heartbeat]\ninterval = 1\n"))
    study = open_study(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask()
    heartbeat = Heartbeat(study)
    with storage_probe(whole=True) as counts:
        heartbeat.add(trial._trial_id)  # the first beat: in this thread, before the trial is handed out
        first = counts["optuna_sql"]
        deadline = time.monotonic() + 30
        while counts["threads"].get("tuner-heartbeat", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        heartbeat.close()
    cost = per_trial(counts)
    assert first == 2 and counts["optuna_sql"] == first  # a beat is 2 statements; the thread's are not the loop's
    assert cost["heartbeat_sql"] >= 2 and cost["heartbeat_sql"] % 2 == 0 and cost["other_thread_sql"] == 0
    assert counts["methods"]["optuna.record_heartbeat"][0] == 1  # the main thread's one call, timed
