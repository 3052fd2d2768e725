"""Issue 12: a launch killed with -9 at any moment, on any execution path, is finished by the next
launch: exactly n_trials finished trials, no trial RUNNING or WAITING, no MLflow run RUNNING.

Faults are real: a `tuner launch` process (forked from this one, so without the interpreter's
start-up cost) is SIGKILLed when the stores show a chosen state, read with sqlite3 directly; the
relaunch is another `tuner launch` process with a time bound, so a relaunch that waits for ever
fails the test with its log instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import mlflow_store, run_tuner, tuner_env, write_study
from faultkit import GRACE, HEARTBEAT, champion, check_consistent, exit_code, fork_cli, load_trials, mlflow_runs, states

from tuner.config import load_spec

N_TRIALS = 8  # fused: width 2 (n_trials // 4), so several trials are in flight at every moment
RELAUNCH_TIMEOUT = 90.0  # a relaunch of the few trials left takes ~10 s; more is a hang
# Trials of ~0.3-0.5 s (5 folds x 8-12 epochs at batch 4) so every moment is seen by a 50 ms poll.
SPACE = (
    'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 8, high = 12 }\n'
    'batch_size = { type = "categorical", choices = [4] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)
BODY = HEARTBEAT + '[pruner]\nname = "none"\n'  # no pruning: every finished trial is COMPLETE


def _study(tmp_path: Path, execution: str, name: str = "kills", *, body: str = BODY, space: str = SPACE, n_trials: int = N_TRIALS) -> Any:
    path = write_study(
        tmp_path, name, body=body, space=space, n_trials=n_trials, execution=execution,
        tracking_uri=mlflow_store(tmp_path / "mlflow.db"),
    )
    return load_spec(path)


def store_state(db: Path) -> dict[str, int]:
    """Trial counts by state, and RUNNING trials that already have their MLflow run (sqlite3: no
    Optuna cache); empty while the study does not exist yet."""
    if not db.exists():
        return {}
    try:
        with closing(sqlite3.connect(db, timeout=5)) as conn:
            out = dict(conn.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())
            (out["RUNNING_WITH_RUN"],) = conn.execute(
                "SELECT count(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
            ).fetchone()
    except sqlite3.Error:
        return {}
    return out


def finished(s: dict[str, int]) -> int:
    return s.get("COMPLETE", 0) + s.get("PRUNED", 0)


# The moments of a kill, as the stores show them: a trial must be in flight with its run open.
MOMENTS = {
    "early": lambda s: finished(s) == 0 and s.get("RUNNING_WITH_RUN", 0) > 0,
    "mid": lambda s: N_TRIALS // 2 <= finished(s) < N_TRIALS and s.get("RUNNING_WITH_RUN", 0) > 0,
    "late": lambda s: N_TRIALS - 2 <= finished(s) < N_TRIALS and s.get("RUNNING_WITH_RUN", 0) > 0,
}


def kill_at(pid: int, db: Path, moment: str, *, group: bool = False, timeout: float = 120) -> dict[str, int]:
    """SIGKILL ``pid`` (its process group with ``group``) once the store shows ``moment``; reap it.
    Returns the state seen at the kill. Fails if the launch ended first or never got there."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            seen = store_state(db)
            if MOMENTS[moment](seen):
                break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pytest.fail(f"the launch ended (exit {os.waitstatus_to_exitcode(status)}) before the {moment!r} moment; last seen {seen}")
            if time.monotonic() > deadline:
                pytest.fail(f"the {moment!r} moment not reached within {timeout}s; last seen {seen}")
            time.sleep(0.05)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert exit_code(pid) == -signal.SIGKILL
    return seen


def wait_running_stale(spec: Any, timeout: float = GRACE + 5) -> None:
    """Wait (bounded) until Optuna's own rule judges every RUNNING trial stale. A RUNNING trial
    without a heartbeat row is never stale (Optuna skips it): after ``timeout`` the relaunch is
    what the test judges, not this wait."""
    from tuner.study import open_storage

    storage = open_storage(spec.storage_url, spec)
    try:
        study_id = storage.get_study_id_from_name(spec.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = {t._trial_id for t in storage.get_all_trials(study_id, deepcopy=False) if t.state.name == "RUNNING"}
            if running <= set(storage._get_stale_trial_ids(study_id)):
                return
            time.sleep(0.1)
    finally:
        storage.engine.dispose()


def relaunch(spec: Any, tmp_path: Path, *extra: str, timeout: float = RELAUNCH_TIMEOUT) -> tuple[int, str]:
    """`tuner launch` after the crash, as a process with a bound; returns (exit code, its log)."""
    log = tmp_path / "relaunch.log"
    pid = fork_cli(["launch", str(spec.source), "--no-progress", "--no-report", *extra], log)
    try:
        code = exit_code(pid, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"the relaunch did not end within {timeout:.0f}s (killed); its log: {_tail(log)}; store: {store_state(_db(spec))}")
    return code, log.read_text()


def _db(spec: Any) -> Path:
    return Path(spec.storage_url.removeprefix("sqlite:///"))


def _tail(log: Path, n: int = 4) -> str:
    try:
        return " / ".join(line for line in log.read_text(errors="replace").splitlines()[-n:] if line.strip())
    except OSError:
        return "(no log)"


def assert_finished_cleanly(spec: Any) -> None:
    """Exactly n_trials finished, nothing RUNNING or WAITING, no trial or launch run RUNNING."""
    trials = load_trials(spec)
    by_state = states(trials)
    assert finished({k: v for k, v in by_state.items()}) == N_TRIALS, by_state
    assert by_state.get("RUNNING", 0) == 0 and by_state.get("WAITING", 0) == 0, by_state
    runs = mlflow_runs(spec)
    running = sorted(
        (r.data.tags.get("tuner.role", "?"), r.data.tags.get("tuner.trial", "-")) for r in runs if r.info.status == "RUNNING"
    )
    assert running == [], f"MLflow runs left RUNNING (role, trial): {running}"
    check_consistent(spec)
    assert champion(spec) is not None


@pytest.mark.slow
# Sequential early is test_faults.py's F1 (kill -9 in the first trial, then the stale retry).
@pytest.mark.parametrize(
    ("execution", "moment"),
    [("sequential", "mid"), ("sequential", "late"), ("fused", "early"), ("fused", "mid"), ("fused", "late")],
    ids=["sequential-mid", "sequential-late", "fused-early", "fused-mid", "fused-late"],
)
def test_a_launch_killed_at_any_moment_is_finished_exactly_by_the_next(tmp_path: Path, execution: str, moment: str) -> None:
    spec = _study(tmp_path, execution)
    pid = fork_cli(["launch", str(spec.source), "--no-progress"], tmp_path / "killed.log")
    seen = kill_at(pid, _db(spec), moment)
    assert f"execution: {execution}" in (tmp_path / "killed.log").read_text()
    wait_running_stale(spec)

    code, log = relaunch(spec, tmp_path)

    assert code == 0, log
    assert f"{N_TRIALS}/{N_TRIALS} finished trials" in log, (seen, log)
    assert_finished_cleanly(spec)


@pytest.mark.slow
def test_a_killed_launch_relaunched_within_the_grace_period_ends_the_dead_trials_run(tmp_path: Path) -> None:
    """Relaunched at once, the dead trial is still live by its heartbeat at the launch's first
    reconcile; it is failed later (by a trial-slot claim or Optuna's stale check before a trial),
    and its run must end too. A 5 s grace period: the relaunch's first reconcile surely comes
    within it (a 2 s grace races the relaunch's start-up)."""
    body = "[heartbeat]\ninterval = 1\ngrace_period = 5\n" + '[pruner]\nname = "none"\n'
    spec = _study(tmp_path, "sequential", body=body)
    pid = fork_cli(["launch", str(spec.source), "--no-progress"], tmp_path / "killed.log")
    kill_at(pid, _db(spec), "mid")

    code, log = relaunch(spec, tmp_path)

    assert code == 0, log
    assert_finished_cleanly(spec)


def _new_session() -> None:
    os.setsid()  # the launch and the workers it spawns: one process group, killed together


@pytest.mark.slow
def test_a_launch_with_workers_killed_with_its_workers_is_finished_by_the_next(tmp_path: Path) -> None:
    """The machine dies under `launch --workers 2` (the launch and its workers SIGKILLed): the next
    `launch --workers 2` ends the dead launch's run and finishes the study exactly."""
    spec = _study(tmp_path, "sequential")
    pid = fork_cli(["launch", str(spec.source), "--no-progress", "--workers", "2"], tmp_path / "killed.log", _new_session)
    kill_at(pid, _db(spec), "mid", group=True)
    wait_running_stale(spec)

    code, log = relaunch(spec, tmp_path, "--workers", "2")

    assert code == 0, log
    assert_finished_cleanly(spec)


# -- issue 12 (4): a `launch --workers` killed with -9 ---------------------------------------


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (the workers of a launch)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_workers_of_a_launch_killed_with_9_stop_and_reconcile_ends_its_run(tmp_path: Path) -> None:
    """kill -9 of the `launch --workers 2` process alone: its workers notice and stop (they do
    not run the study on, re-parented), and `tuner reconcile` ends the dead launch's run."""
    # ~30 s of trials per worker (24 trials of 60-80 epochs): far more than the exit bound, so a
    # worker that runs on is seen running, not mistaken for one that stopped because it was done.
    slow = SPACE.replace("low = 8, high = 12", "low = 60, high = 80")
    spec = _study(tmp_path, "sequential", name="orphans", space=slow, n_trials=24)
    # In a session of its own: whatever the test leaves behind is killed by its group at the end.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner", "launch", str(spec.source), "--no-progress", "--workers", "2"],
        cwd=tmp_path, env=tuner_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (store_state(_db(spec)).get("RUNNING_WITH_RUN", 0) > 0 and len(workers) == 2):
            assert proc.poll() is None, f"the launch ended (exit {proc.returncode}) before its workers ran a trial"
            assert time.monotonic() < deadline, f"no worker trial within 120s; workers seen {workers}"
            workers = _children(proc.pid)
            time.sleep(0.05)
        proc.kill()  # the launch process only, as `kill -9 PID` does
        proc.wait(timeout=30)

        bound = 15.0
        gone_by = time.monotonic() + bound
        while any(_alive(w) for w in workers) and time.monotonic() < gone_by:
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        seen = store_state(_db(spec))
        assert left == [], f"workers {left} of the killed launch {proc.pid} still run {bound:.0f}s later; store {seen}"
        assert finished(seen) < 24, f"the workers finished the study before the bound: the test shows nothing; {seen}"

        r = run_tuner("reconcile", str(spec.source), cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        launches = [x.info.status for x in mlflow_runs(spec) if x.data.tags.get("tuner.role") == "launch"]
        assert launches and "RUNNING" not in launches, f"launch runs after reconcile: {launches}; {r.stdout}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launch's group: its workers, if they ran on
        except ProcessLookupError:
            pass
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.wait(timeout=30)


# -- F3 on the other paths: Ctrl-C / SIGTERM of a fused launch and of a launch with workers ----


@pytest.mark.slow
@pytest.mark.parametrize(
    ("execution", "workers", "sig"),
    # Sequential in one process is test_faults.py's F3; sequential workers run the same session.
    [("fused", None, signal.SIGINT), ("fused", "2", signal.SIGTERM)],
    ids=["fused-SIGINT", "fused-workers-SIGTERM"],
)
def test_f3_an_interrupted_launch_fails_its_trials_in_flight_kills_their_runs_and_resumes(
    tmp_path: Path, execution: str, workers: str | None, sig: int
) -> None:
    spec = _study(tmp_path, execution, "f3", n_trials=4)  # fused: still 2 in flight (width >= 2)
    argv = ["launch", str(spec.source), "--no-progress"] + (["--workers", workers] if workers else [])
    pid = fork_cli(argv, tmp_path / "interrupted.log")
    db = tmp_path / "f3.db"
    try:
        deadline = time.monotonic() + 120
        while not MOMENTS["early"](store_state(db)):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), (tmp_path / "interrupted.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no running trial with its run within 120 s"
            time.sleep(0.02)
        os.kill(pid, sig)
        code = exit_code(pid, timeout=60)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
        raise
    assert code == 130, (tmp_path / "interrupted.log").read_text()[-2000:]
    trials = load_trials(spec)
    assert "RUNNING" not in states(trials), states(trials)  # nothing left for the heartbeat to find
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("interrupted" in t.user_attrs.get("fail_reason", "") for t in failed)
    runs = {r.info.run_id: r for r in mlflow_runs(spec)}
    assert all(runs[t.user_attrs["mlflow_run_id"]].info.status == "KILLED" for t in failed)
    assert [r.info.status for r in runs.values() if r.data.tags["tuner.role"] == "launch"] == ["KILLED"]

    r = run_tuner("launch", str(spec.source), "--no-progress", "--no-report", cwd=tmp_path, timeout=RELAUNCH_TIMEOUT)

    assert r.returncode == 0, r.stderr[-2000:]
    trials, _ = check_consistent(spec)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4
    assert champion(spec) is not None
