"""Many workers on one study: exact budget, one study/parent run, PostgreSQL errors and restarts.

Real SQLite files, the real PostgreSQL server on 127.0.0.1 (a database per test) and real
`tuner worker` / `tuner launch --workers` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import free_port, mlflow_store, need, port_open, run_tuner, tuner_env, write_study
from tuner.errors import StorageError, TunerError

PG_HOST, PG_PORT = "127.0.0.1", 5432  # the machine's server: databases of our own, never stopped


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(
        f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres", autocommit=True, connect_timeout=10
    ) as conn:
        conn.execute(sql)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped after), as a tuner storage URL."""
    need(port_open(PG_HOST, PG_PORT), f"PostgreSQL on {PG_HOST}:{PG_PORT}")
    name = f"tuner_scale_{uuid.uuid4().hex[:10]}"
    pg_admin(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg://postgres:pw-not-checked@{PG_HOST}:{PG_PORT}/{name}"
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def check_study(
    storage: str, tracking: str, name: str, n_trials: int, *, all_runs: bool = True, distinct_params: bool = True
) -> list[Any]:
    """Exactly ``n_trials`` finished trials, none RUNNING, unique numbers and params, and one
    MLflow child run per trial, linked both ways. Returns the trials."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # distinct sampler seeds per worker: no two trials drew the same params
    if distinct_params:
        assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished)
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`tuner.role` = 'trial'", max_results=5000)
    by_id = {r.info.run_id: r for r in runs}
    # one child run per trial (failed trials included; not a trial the storage failed to start)
    assert len(runs) == len(trials) if all_runs else len(runs) >= len(finished)
    for t in finished:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["tuner.trial"] == str(t.number)
        assert run.info.status in ("FINISHED", "KILLED")  # KILLED: pruned
    return trials


# -- the exact budget, in one process (threads with their own storage and lock) ---------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_budget_is_exact_with_concurrent_workers(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import optuna

    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    spec = load_spec(write_study(tmp_path, "budget"))
    n_workers, n_trials = 6, 30
    with StudyLock(url, spec.name):
        open_study(spec, url)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            lock = StudyLock(url, spec.name)
            gate = TrialGate(open_study(spec, url, sampler_seed=i), n_trials, lock, poll=0.05)
            while (trial := gate.ask()) is not None:
                gate.tell(trial, trial.suggest_float("x", 0, 1))
            gate.close()
            lock.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    trials = optuna.load_study(study_name=spec.name, storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))


def test_budget_waits_for_running_trials_and_reruns_a_failed_one(tmp_path: Path) -> None:
    """A slot held by a running trial is not handed out; when that trial fails, it is."""
    import optuna

    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec(write_study(tmp_path, "wait"))
    lock = StudyLock(url, spec.name)
    held = open_study(spec, url).ask()  # another worker's trial, still running
    gate = TrialGate(open_study(spec, url), 2, lock, poll=0.05)
    threading.Timer(0.5, lambda: held.study.tell(held, state=optuna.trial.TrialState.FAIL)).start()
    while (trial := gate.ask()) is not None:
        gate.tell(trial, 1.0)
    states = [t.state.name for t in gate.study.get_trials()]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]


def test_budget_stops_at_the_deadline(tmp_path: Path) -> None:
    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec(write_study(tmp_path, "deadline"))
    gate = TrialGate(open_study(spec, url), 10**6, StudyLock(url, spec.name), deadline=time.monotonic() + 0.3)
    while (trial := gate.ask()) is not None:
        time.sleep(0.05)
        gate.tell(trial, 1.0)
    assert 1 <= len(gate.study.trials) <= 10 and gate.in_flight == {}


def test_a_retry_left_waiting_once_the_study_is_full_is_failed_not_left_for_ever(tmp_path: Path) -> None:
    """Issue 12 (5): a stale trial's retry that no slot is left for is failed with the reason; a
    trial the user enqueued stays WAITING (a larger n_trials runs it)."""
    import optuna

    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec(write_study(tmp_path, "full"))
    study = open_study(spec, url)
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    study.enqueue_trial({"lr": 0.01}, user_attrs={})  # the user's
    retry = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs={"failed_trial": 0})
    study.add_trial(retry)
    gate = TrialGate(open_study(spec, url), 2, StudyLock(url, spec.name))
    assert gate.ask() is None
    trials = {t.number: t for t in optuna.load_study(study_name=spec.name, storage=url).get_trials()}
    assert [(n, t.state.name) for n, t in sorted(trials.items())] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "WAITING"), (3, "FAIL")]
    assert trials[3].user_attrs["fail_reason"] == "not run: the study reached n_trials first"


def test_gate_records_the_first_heartbeat_before_handing_a_trial_out(tmp_path: Path) -> None:
    """A process killed right after ask() leaves a trial the next stale check can judge."""
    import sqlite3

    from tuner.config import load_spec
    from tuner.gate import TrialGate
    from tuner.lock import StudyLock
    from tuner.study import open_study

    db = tmp_path / "optuna.db"
    spec = load_spec(write_study(tmp_path, "beat"))
    gate = TrialGate(open_study(spec, f"sqlite:///{db}"), 3, StudyLock(f"sqlite:///{db}", spec.name))
    trial = gate.ask()
    assert trial is not None
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM trial_heartbeats WHERE trial_id = ?", (trial._trial_id,)).fetchone()
    assert n == 1
    gate.tell(trial, 1.0)
    gate.close()


# -- small pieces ----------------------------------------------------------------------------


def test_workers_get_distinct_sampler_seeds(tmp_path: Path) -> None:
    from tuner.config import load_spec
    from tuner.session import _worker_seed

    spec = load_spec(write_study(tmp_path, "seeds"))
    seeds = [_worker_seed(spec, i) for i in range(8)]
    assert len(set(seeds)) == 8 and spec.seed not in seeds
    assert _worker_seed(spec, None) != _worker_seed(spec, None)  # containers without an index


def test_gpus_pin_one_worker_per_gpu() -> None:
    from tuner.workers import _worker_env, parse_gpus

    gpus = parse_gpus("0, 1")
    assert gpus == ["0", "1"]
    envs = [_worker_env(i, 4, "run1", "sqlite:////tmp/x.db", "sqlite:////tmp/m.db", gpus[i % len(gpus)]) for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["TUNER_WORKER_INDEX"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["TUNER_N_WORKERS"] for e in envs} == {"4"}
    assert envs[0]["TUNER_PARENT_RUN_ID"] == "run1" and envs[0]["TUNER_STORAGE"] == "sqlite:////tmp/x.db"
    with pytest.raises(TunerError, match="comma-separated GPU indices"):
        parse_gpus("0,,1")


def test_unreachable_postgres_fails_fast_with_host_port_and_no_password(tmp_path: Path) -> None:
    from tuner.config import load_spec
    from tuner.session import launch

    port = free_port()  # nothing listens there: PostgreSQL "stopped"
    url = f"postgresql+psycopg://tuner:s3cret-pw@127.0.0.1:{port}/optuna"
    spec = load_spec(write_study(tmp_path, "down"))
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{port}") as e:
        launch(spec, role="worker", storage=url, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert time.monotonic() - started < 15
    assert "s3cret-pw" not in str(e.value) and "tuner:***@" in str(e.value)


def test_cli_worker_unreachable_postgres_exit_2(tmp_path: Path) -> None:
    study = write_study(tmp_path, "down")
    port = free_port()
    env = tuner_env(TUNER_STORAGE=f"postgresql+psycopg://tuner:s3cret-pw@127.0.0.1:{port}/optuna")
    started = time.monotonic()
    r = run_tuner(
        "launch",
        str(study),
        "--workers",
        "2",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
        cwd=tmp_path,
        env=env,
    )
    assert time.monotonic() - started < 30  # includes the interpreter start-up
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "s3cret-pw" not in r.stderr + r.stdout
    assert r.stderr.count("\n") == 1


def test_pooled_connections_killed_by_the_server_are_replaced(tmp_path: Path, pg_url: str) -> None:
    """pool_pre_ping: a pooled connection the server dropped (as a restart does) is replaced on
    checkout instead of failing the next storage call."""
    import optuna

    from tuner.study import open_storage

    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage, study_name="ping")
    study.enqueue_trial({"x": 1.0})
    db = pg_url.rsplit("/", 1)[1]
    pg_admin(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    )
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)  # would raise without pre-ping
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]
    storage.engine.dispose()


# -- processes: SQLite on one host, PostgreSQL, restarts ---------------------------------------


def _start_workers(n: int, study: Path, cwd: Path, env: dict[str, str], *extra: str) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "tuner", "worker", str(study), "--no-progress", *extra]
    return [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(n)
    ]


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    return outs


@pytest.mark.slow
def test_four_workers_on_one_sqlite_study_then_promote(tmp_path: Path) -> None:
    """4 `tuner worker`s started together on a fresh SQLite file: exactly n_trials, no lock errors;
    with --no-promote nothing is registered until `tuner promote`."""
    study = write_study(tmp_path, "lite", n_trials=12, body='[pruner]\nname = "none"\n')
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = tuner_env(TUNER_STORAGE=storage, MLFLOW_TRACKING_URI=tracking)
    procs = _start_workers(4, study, tmp_path, env, "--no-promote")
    outs = _wait_all(procs)
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert not any("locked" in o.lower() or "Traceback" in o for o in outs), outs
    assert sum(int(o.split("worker: ran ")[1].split()[0]) for o in outs) == 12
    check_study(storage, tracking, "lite", 12)
    r = run_tuner("promote", str(study), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "model registered: models:/lite/1" in r.stdout and "alias champion" in r.stdout
    # Workers cross-validate like a one-process launch (32 rows: 5 folds), and promotion refits
    # the cross-validated best trial on all rows before registering it.
    import optuna
    from mlflow import MlflowClient

    best = optuna.load_study(study_name="lite", storage=storage).best_trial
    assert len(best.user_attrs["fold_rmse"]) == 5
    run = MlflowClient(tracking).get_run(best.user_attrs["mlflow_run_id"])
    assert run.data.tags["tuner.refit"] == "all 32 rows"


@pytest.mark.slow
def test_launch_with_workers_fuses_in_every_worker(tmp_path: Path) -> None:
    """`tuner launch --workers 2` on a fused study: each worker trains its own K trials at once
    (N workers x K slots, K a quarter of its share of the budget: as many trials in flight as one
    fused launch), every trial's provenance says fused, and the budget stays exact."""
    from tests.faultkit import FUSED_F4_SPACE

    # Trials of ~2-3 s (as in F4): the study outlasts the seconds by which one worker starts after the other.
    body = '[pruner]\nname = "none"\n'
    study = write_study(tmp_path, "fw", n_trials=12, space=FUSED_F4_SPACE, body=body, execution="fused")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_store(tmp_path / "mlflow.db")
    r = run_tuner("launch", str(study), "--workers", "2", "--no-progress", "--storage", storage, "--tracking-uri", tracking,
                  cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "execution: fused in each of 2 workers" in r.stderr, r.stderr
    trials = check_study(storage, tracking, "fw", 12)
    provenance = [t.user_attrs["provenance"] for t in trials]
    assert {p["execution"] for p in provenance} == {"fused"}
    by_worker: dict[str, list[Any]] = {}
    for t, p in zip(trials, provenance):
        by_worker.setdefault(p["worker"], []).append(t)
    assert len(by_worker) == 2, by_worker.keys()  # both workers ran trials
    # Fused, not one after another, and at width fused_width(12, 2) = 2 (one launch alone: 3):
    # at most 2 of a worker's trials were ever in flight at once, and 2 were.
    for worker, own in by_worker.items():
        in_flight = [sum(u.datetime_start <= t.datetime_start < u.datetime_complete for u in own) for t in own]
        assert max(in_flight) == 2, (worker, [(t.number, t.datetime_start, t.datetime_complete) for t in own])


@pytest.mark.slow
def test_launch_eight_workers_on_postgres_is_exact(tmp_path: Path, pg_url: str) -> None:
    """`tuner launch --workers 8`: exactly n_trials finished across 8 processes, all trial runs
    under the one parent run the launch created, one champion."""
    from mlflow import MlflowClient

    # 8 x 6 (the 8 x 20 with TUNER_TEST_PG_TRIALS=160). One holdout split (not the default 5 folds): the test is about the
    # storage, and each trial stays a few milliseconds of training. TUNER_TEST_PG_TRIALS overrides.
    n_trials = int(os.environ.get("TUNER_TEST_PG_TRIALS", "48"))
    body = '[validation]\nfraction = 0.2\n[pruner]\nname = "none"\n'
    study = write_study(tmp_path, "pg8", n_trials=n_trials, body=body)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_tuner("launch", str(study), "--workers", "8", "--storage", pg_url, "--tracking-uri", tracking, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"study pg8: {n_trials}/{n_trials} finished trials ({n_trials} run now" in r.stdout
    assert "pw-not-checked" not in r.stdout + r.stderr
    assert "alias champion" in r.stdout
    trials = check_study(pg_url, tracking, "pg8", n_trials)
    assert len({t.user_attrs["provenance"]["worker"] for t in trials}) >= 2  # the work was shared
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("pg8")
    parents = client.search_runs([exp.experiment_id], "tags.`tuner.role` = 'launch'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], "tags.`tuner.role` = 'trial'", max_results=1000)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert str(client.get_model_version_by_alias("pg8", "champion").version) == "1"


@pytest.mark.slow
def test_workers_survive_a_postgres_restart(tmp_path: Path, pg_cluster: Any) -> None:
    """The server restarts mid-study: workers reconnect (pool pre-ping), the trials in flight end
    COMPLETE or FAIL (never RUNNING), and the study still reaches exactly n_trials. The server is
    a throwaway cluster of this test's own (``pg_cluster``), never the machine's."""
    import optuna

    pg_url = pg_cluster.create_database("restart")
    n_trials = 10
    space = (
        'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
        'epochs = { type = "int", low = 40, high = 60 }\n'
        'batch_size = { type = "categorical", choices = [2] }\n'
        'hidden_size = { type = "int", low = 2, high = 8 }\n'
        'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    )
    study = write_study(tmp_path, "restart", n_trials=n_trials, space=space, body='[pruner]\nname = "none"\n')
    tracking = mlflow_store(tmp_path / "mlflow.db")
    cmd = [
        sys.executable,
        "-m",
        "tuner",
        "launch",
        str(study),
        "--workers",
        "2",
        "--storage",
        pg_url,
        "--tracking-uri",
        tracking,
        "-v",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=tuner_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its workers are in its process group: all stopped if the test fails
    )
    try:
        storage = optuna.storages.RDBStorage(pg_url)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                trials = optuna.load_study(study_name="restart", storage=storage).get_trials(deepcopy=False)
            except KeyError:
                trials = []
            if sum(t.state.name == "COMPLETE" for t in trials) >= 2 and any(t.state.name == "RUNNING" for t in trials):
                break
            time.sleep(0.3)
        storage.engine.dispose()
        assert proc.poll() is None, "the study ended before the restart"
        started = time.monotonic()
        pg_cluster.restart()
        restart_seconds = time.monotonic() - started
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert restart_seconds < 30, f"the throwaway cluster took {restart_seconds:.1f}s to restart"
    trials = check_study(pg_url, tracking, "restart", n_trials, all_runs=False)
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}


def test_the_throwaway_cluster_is_its_own_server(pg_cluster: Any) -> None:
    """pg_cluster listens on its own port, restarts, and is not the machine's server."""
    import psycopg

    assert pg_cluster.port != PG_PORT and pg_cluster.is_up()
    url = pg_cluster.create_database("own")
    pg_cluster.restart()
    with psycopg.connect(f"host={pg_cluster.host} port={pg_cluster.port} user=postgres dbname=own", connect_timeout=10) as conn:
        (data_dir,) = conn.execute("SHOW data_directory").fetchone()
    assert data_dir == str(pg_cluster.data) and url.endswith(f":{pg_cluster.port}/own")
    assert pg_cluster.startup_seconds is not None and pg_cluster.startup_seconds < 60


@pytest.mark.slow
# Fused only: sequential exactness on PostgreSQL is test_launch_eight_workers_on_postgres_is_exact's.
@pytest.mark.parametrize("execution", ["fused"])
def test_f4_two_launches_on_one_postgres_study_run_exactly_n_trials(tmp_path: Path, pg_url: str, execution: str) -> None:
    """Issue 12, F4 on PostgreSQL: two `tuner launch` processes started together on one study
    (the machine's server, a database of this test's own) end with exactly n_trials finished."""
    from tests.faultkit import FUSED_F4_SPACE, launch_together
    from tuner.config import load_spec

    n_trials = 8
    # Fused: 2 in flight per process, trials of ~2-3 s so that the study outlasts the seconds by
    # which one process starts after the other. Sequential trials interleave by their slot claims.
    space = None if execution == "sequential" else FUSED_F4_SPACE
    body = '[heartbeat]\ninterval = 1\ngrace_period = 60\n[pruner]\nname = "none"\n'
    spec = load_spec(write_study(tmp_path, "pgf4", n_trials=n_trials, space=space, body=body, execution=execution))
    tracking = mlflow_store(tmp_path / "mlflow.db")
    results = launch_together(spec, tmp_path, "--storage", pg_url, "--tracking-uri", tracking)
    outputs = [out for _, out in results]
    assert [code for code, _ in results] == [0, 0], outputs
    assert any(f"execution: {execution}" in out for out in outputs), outputs
    # Two launches of one file share its seed: the gate reseeds a launch that sees the other's trial
    # running, so no trial repeats another's params.
    check_study(pg_url, tracking, "pgf4", n_trials)
    ran = [int(out.split(" run now")[0].rsplit("(", 1)[1]) for out in outputs]
    assert sum(ran) == n_trials and all(n > 0 for n in ran), outputs


@pytest.mark.parametrize("value, message", [("four", "is not a whole number"), ("0", "must be >= 1")])
def test_a_bad_worker_count_in_the_environment_is_one_line_before_anything_is_stored(
    tmp_path: Path, value: str, message: str
) -> None:
    study = write_study(tmp_path, "count")
    r = run_tuner("worker", str(study), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
                  env=tuner_env(TUNER_N_WORKERS=value))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: TUNER_N_WORKERS=") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
