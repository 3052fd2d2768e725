"""Helpers of the reliability tests: fork a `tuner` command to kill it at a chosen point, wait
for a state in the stores, and check that Optuna and MLflow agree (no zombie, nothing lost)."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

HEARTBEAT = "[heartbeat]\ninterval = 1\ngrace_period = 2\n"
# Fused F4: trials of ~2-3 s (50-70 epochs at batch 4), 2 in flight per process, so the study
# outlasts the seconds by which one of two processes started together starts after the other.
FUSED_F4_SPACE = (
    'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
    'epochs = { type = "int", low = 50, high = 70 }\n'
    'batch_size = { type = "categorical", choices = [4] }\n'
    'hidden_size = { type = "int", low = 2, high = 8 }\n'
    'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
)
GRACE = 2.0


def fork_cli(argv: Sequence[str], log: Path, setup: Callable[[], None] | None = None) -> int:
    """Run ``tuner ARGV`` in a forked child (torch, optuna, mlflow already imported: no start-up
    cost) after ``setup()`` patched it; stdout and stderr go to ``log``. Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        out = open(log, "w", buffering=1)
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # The child inherits the test process's MLflow globals: start from a clean slate, as a
        # fresh `tuner` process would.
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            os.environ.pop(key, None)
        if "mlflow" in sys.modules:
            import mlflow

            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
            mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        if setup is not None:
            setup()
        from tuner.cli import main

        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def exit_code(pid: int, timeout: float = 120) -> int:
    """Reap a forked child (so it is not a zombie) and return its exit code (-N: killed by N)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"child {pid} did not end within {timeout}s")


def wait_for(condition: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def running_trial_with_run(db: Path) -> bool:
    """True once a trial is RUNNING, has its MLflow run and its first heartbeat (read with sqlite3:
    no caches). Optuna's heartbeat thread writes that row concurrently with the objective; a trial
    killed before it exists is never judged stale (Optuna skips RUNNING trials without one)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            (n,) = conn.execute(
                "SELECT count(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
            ).fetchone()
    except sqlite3.Error:
        return False
    return n > 0


def wait_stale(spec: Any, timeout: float = 60, n: int = 1) -> list[int]:
    """Wait until Optuna's own rule judges at least ``n`` RUNNING trials of ``spec``'s study stale;
    return the stale trial numbers. (Two trials killed together may turn stale a second apart:
    their heartbeats are stamped in whole seconds.)

    Not a fixed ``sleep(grace + margin)``: on SQLite, Optuna stores the heartbeat and reads "now"
    as ``CURRENT_TIMESTAMP``, which has whole-second resolution, and calls a trial stale when
    ``now - heartbeat > grace_period``. A heartbeat written at 12:00:52.18 and checked at
    12:00:54.97 (2.8 s later) reads as 2 s old: not stale. So a relaunch 2.5 s after the kill
    judged the dead trial live in its up-front reconcile whenever its start-up took under ~0.5 s
    (warm imports, i.e. after other in-process launches in the same pytest run), and only a later
    trial-slot claim failed it, after the launch had reconciled its runs.
    """
    from tuner.study import open_storage

    storage = open_storage(spec.storage_url, spec)
    try:
        study_id = storage.get_study_id_from_name(spec.name)

        def stale() -> list[int] | None:
            found = storage._get_stale_trial_ids(study_id)
            return found if len(found) >= n else None

        ids = wait_for(stale, timeout, what=f"{n} stale trial(s)")
        return sorted(storage.get_trial_number_from_id(i) for i in ids)
    finally:
        storage.engine.dispose()


def slow_first_trial(seconds: float = 120) -> Callable[[], None]:
    """A child set-up: the first trial waits ``seconds`` in train() (heartbeat alive) before training."""

    def setup() -> None:
        import tuner.train
        from tuner import interrupts

        original, calls = tuner.train.train, []

        def slow(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                end = time.monotonic() + seconds
                while time.monotonic() < end:  # "epochs" of 20 ms that honour Ctrl-C/SIGTERM
                    time.sleep(0.02)
                    interrupts.check()
            return original(*args, **kwargs)

        tuner.train.train = slow

    return setup


def load_trials(spec: Any) -> list[Any]:
    import optuna

    storage = optuna.storages.RDBStorage(spec.storage_url)
    try:
        return optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def mlflow_runs(spec: Any) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(spec.tracking)
    experiment = client.get_experiment_by_name(spec.name)
    return client.search_runs([experiment.experiment_id], max_results=10000) if experiment else []


def champion(spec: Any) -> Any | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(spec.tracking, registry_uri=spec.tracking).get_model_version_by_alias(spec.model_name, "champion")
    except MlflowException:
        return None


def check_consistent(spec: Any) -> tuple[list[Any], list[Any]]:
    """Assert the F5 invariants and return (trials, runs):

    no RUNNING trial or run; every COMPLETE trial has a FINISHED run; every FINISHED trial run
    belongs to a COMPLETE trial; the champion (if any) is a COMPLETE trial's version.
    """
    trials = load_trials(spec)
    runs = mlflow_runs(spec)
    by_number = {t.number: t for t in trials}
    by_run = {r.info.run_id: r for r in runs}
    assert [t.number for t in trials if t.state.name == "RUNNING"] == []
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    for t in trials:
        if t.state.name == "COMPLETE":
            assert by_run[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED", f"trial {t.number}"
    for r in runs:
        if r.data.tags.get("tuner.role") == "trial" and r.info.status == "FINISHED":
            assert by_number[int(r.data.tags["tuner.trial"])].state.name == "COMPLETE", r.data.tags
    version = champion(spec)
    if version is not None:
        assert by_number[int(version.tags["tuner.trial"])].state.name == "COMPLETE"
    return trials, runs


def states(trials: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def launch_together(spec: Any, cwd: Path, *extra: str, n: int = 2, timeout: float = 300) -> list[tuple[int, str]]:
    """Start ``n`` `tuner launch` processes on one study at the same moment; wait (bounded) for all.
    Returns (exit code, stdout+stderr) per process; all are killed if one outlives ``timeout``."""
    import subprocess

    from conftest import tuner_env

    cmd = [sys.executable, "-m", "tuner", "launch", str(spec.source), "--no-progress", "--no-report", "-v", *extra]
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=tuner_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(n)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]
