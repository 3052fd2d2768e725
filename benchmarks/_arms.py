"""The tuner arm of the benchmarks and the timing probe shared with the baseline.

The probe wraps ``tuner.train.train`` (the objective imports it at call time) and records, per
trial, when training started and ended and the seconds spent inside it, minus the seconds spent
in the epoch hook (``trial.report`` / ``should_prune`` are orchestration, not training).
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
CARS_MLP = ROOT / "studies" / "cars_mlp.toml"
# Every arm trains on one seeded 20% validation split (what the baseline does), even where the
# study file cross-validates: the benchmarks compare orchestration and training paths, not
# validation schemes.
# Sequential execution: the per-trial numbers below are those of one trial at a time
# (benchmarks/fused.py measures fused execution against it).
ONE_SPLIT = {"validation": {"fraction": 0.2}, "execution": "sequential"}


@contextlib.contextmanager
def train_probe() -> Iterator[list[dict[str, float]]]:
    """Patch ``tuner.train.train`` to time each call; yields the list it appends to."""
    import tuner.train as train_mod

    original = train_mod.train
    records: list[dict[str, float]] = []

    def timed(*args: Any, on_epoch_end: Any = None, **kwargs: Any) -> Any:
        hook_s = hook_cpu = 0.0

        def hook(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal hook_s, hook_cpu
            t, c = time.perf_counter(), time.process_time()
            try:
                return bool(on_epoch_end(epoch, metrics))
            finally:
                hook_s += time.perf_counter() - t
                hook_cpu += time.process_time() - c

        t0, c0 = time.perf_counter(), time.process_time()
        epochs = 0
        try:
            result = original(*args, on_epoch_end=hook if on_epoch_end else None, **kwargs)
            epochs = result.epochs_run
            return result
        finally:
            t1, c1 = time.perf_counter(), time.process_time()
            records.append({"start": t0, "end": t1, "train": t1 - t0 - hook_s, "hook": hook_s, "epochs": epochs,
                            "end_cpu": c1, "train_cpu": c1 - c0 - hook_cpu})

    train_mod.train = timed
    try:
        yield records
    finally:
        train_mod.train = original


def run_tuner(
    study_file: str | Path = CARS_MLP,
    *,
    n_trials: int = 30,
    seed: int = 0,
    workdir: str | Path | None = None,
    space_overrides: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    tracking: bool = True,
    promote: bool = True,
) -> dict[str, Any]:
    """One ``tuner.study.launch`` of the study in fresh SQLite stores; timings as the baseline's."""
    from tuner.config import load_spec
    from tuner.session import launch

    workdir = Path(workdir or tempfile.mkdtemp(prefix="tuner-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = load_spec(study_file, seed=seed, **{**ONE_SPLIT, **(overrides or {})})
    if space_overrides:
        spec = spec.model_copy(update={"space": {**spec.space, **space_overrides}})
    started, started_cpu = time.perf_counter(), time.process_time()
    with train_probe() as records:
        summary = launch(
            spec,
            n_trials=n_trials,
            storage=f"sqlite:///{workdir / 'optuna.db'}",
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            progress=False,
            promote=promote and tracking,
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    best = summary.best_metrics.get(spec.metric, float("nan"))
    return {
        "arm": "tuner",
        "seed": seed,
        "n_trials": n_trials,
        "wall_s": wall,
        "cpu_s": cpu,
        "started": started,
        "started_cpu": started_cpu,
        "trials": records,
        "best_value": best,
        "n_pruned": None,
    }


def overhead(result: dict[str, Any]) -> dict[str, float]:
    """Orchestration overhead of a study run.

    Per trial: the time from the end of one trial's training to the end of the next one's,
    minus the training inside it (ask, sampling, tracking, reports, tell: everything but
    training). The first trial's interval starts at the launch and also carries the start-up
    (data, stores, experiment), so it is reported apart as ``startup_s``; ``median_ms`` is over
    the later trials. ``mean_ms``: wall minus all training, over trials, everything included
    (start-up, final model registration).
    """
    trials = sorted(result["trials"], key=lambda r: r["end"])

    def gaps(start: float, end: str, train: str) -> list[float]:
        """Each trial's interval since the previous one ended, less its training."""
        out, prev = [], start
        for r in trials:
            out.append((r[end] - prev) - r[train])
            prev = r[end]
        return out

    per_trial = gaps(result["started"], "end", "train")
    steady = per_trial[1:] or per_trial
    # The same on this process's CPU time: what the overhead costs on a machine shared with other
    # jobs (wall time there also counts waiting for a core; CPU time does not count fsync waits
    # or the baseline's requirement-inference subprocess, so it flatters the baseline).
    per_trial_cpu = gaps(result["started_cpu"], "end_cpu", "train_cpu")
    steady_cpu = per_trial_cpu[1:] or per_trial_cpu
    train_total = sum(r["train"] for r in trials)
    n = max(len(trials), 1)
    return {
        "median_ms": 1000 * statistics.median(steady) if steady else float("nan"),
        "mean_ms": 1000 * (result["wall_s"] - train_total) / n,
        "median_cpu_ms": 1000 * statistics.median(steady_cpu) if steady_cpu else float("nan"),
        "startup_s": per_trial[0] if per_trial else float("nan"),
        "tail_s": result["started"] + result["wall_s"] - (trials[-1]["end"] if trials else result["started"]),
        "train_s": train_total,
        "wall_s": result["wall_s"],
        "n_trials": len(trials),
    }


SLOW_STATEMENT_S = 0.005  # a statement this slow has waited (SQLite's write lock, a busy disk)


@contextlib.contextmanager
def storage_probe(*, whole: bool = False) -> Iterator[dict[str, Any]]:
    """Count the SQL statements and time the storage calls of the trial loop (``run_trials``).

    Statements: SQLAlchemy's ``before_cursor_execute`` on every engine, split by database (the
    MLflow store's file or database name holds "mlflow"; the rest is the Optuna storage). Time:
    wall time and this thread's CPU time inside the Optuna storage's methods and the MLflow
    client's (and its artifact repository's ``log_artifact``), outermost call only, also per
    method (``methods``: calls, seconds, CPU seconds, statements). Only the main thread counts in
    those: the heartbeat thread beats on a clock, in parallel; statements of other threads are
    counted apart, by thread name (``threads``; the gate's heartbeat thread is "tuner-heartbeat").
    ``slow_sql`` counts statements that took longer than ``SLOW_STATEMENT_S`` inside the driver (a wait on SQLite's write lock shows there).
    Start-up and promotion are outside ``run_trials``, so they do not count (``whole=True``:
    everything while the context is open counts). Yields the counters: ``optuna_sql``,
    ``mlflow_sql``, ``optuna_s``, ``mlflow_s``, ``optuna_cpu_s``, ``mlflow_cpu_s``,
    ``threads``, ``slow_sql``, ``sql_s`` (driver time of the main thread's statements),
    ``trials`` (trials told in the loop), ``methods``.
    """
    import functools
    import threading

    import optuna
    import sqlalchemy
    from mlflow import MlflowClient
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    import tuner.gate as gate_mod
    import tuner.runners as runners_mod

    counts: dict[str, Any] = {
        "optuna_sql": 0, "mlflow_sql": 0, "optuna_s": 0.0, "mlflow_s": 0.0, "optuna_cpu_s": 0.0, "mlflow_cpu_s": 0.0,
        "threads": {}, "slow_sql": 0, "sql_s": 0.0, "trials": 0, "methods": {},
    }
    main = threading.main_thread()
    state: dict[str, Any] = {"on": whole, "depth": 0, "method": None}
    started: dict[int, float] = {}

    def on_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not state["on"]:
            return
        if threading.current_thread() is not main:
            name = threading.current_thread().name
            counts["threads"][name] = counts["threads"].get(name, 0) + 1
            return
        name = str(conn.engine.url.database or "")
        counts["mlflow_sql" if "mlflow" in name else "optuna_sql"] += 1
        if state["method"] is not None:
            state["method"][3] += 1
        started[id(cursor)] = time.perf_counter()

    def on_executed(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        t = started.pop(id(cursor), None)
        if t is not None:
            took = time.perf_counter() - t
            counts["sql_s"] += took
            counts["slow_sql"] += took > SLOW_STATEMENT_S

    def timed(kind: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not state["on"] or state["depth"] or threading.current_thread() is not main:
                return fn(*args, **kwargs)
            state["depth"] += 1
            method = counts["methods"].setdefault(f"{kind}.{fn.__name__}", [0, 0.0, 0.0, 0])
            state["method"] = method
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t, time.thread_time() - c
                counts[f"{kind}_s"] += wall
                counts[f"{kind}_cpu_s"] += cpu
                method[0] += 1
                method[1] += wall
                method[2] += cpu
                state["depth"] -= 1
                state["method"] = None
        return wrapper

    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        patched.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)

    # Optuna wraps an RDBStorage in its (private) _CachedStorage: both are timed, outermost call only.
    for cls in (optuna.storages.RDBStorage, optuna.storages._cached_storage._CachedStorage):
        for name, fn in list(vars(cls).items()):
            if inspect.isfunction(fn) and not name.startswith("__"):
                patch(cls, name, timed("optuna", fn))
    for name, fn in list(vars(MlflowClient).items()):
        if inspect.isfunction(fn) and not name.startswith("_"):
            patch(MlflowClient, name, timed("mlflow", fn))
    patch(LocalArtifactRepository, "log_artifact", timed("mlflow", LocalArtifactRepository.log_artifact))

    tell = gate_mod.TrialGate.tell

    def counted_tell(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["trials"] += 1
        return tell(self, *args, **kwargs)

    patch(gate_mod.TrialGate, "tell", counted_tell)
    run_trials = runners_mod.run_trials

    def probed(*args: Any, **kwargs: Any) -> Any:
        state["on"] = True
        try:
            return run_trials(*args, **kwargs)
        finally:
            state["on"] = whole

    patch(runners_mod, "run_trials", probed)  # session imports it at call time
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", on_executed)
    try:
        yield counts
    finally:
        state["on"] = False
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", on_executed)
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def per_trial(counts: dict[str, Any]) -> dict[str, float]:
    """``storage_probe``'s counters per trial told (statements, milliseconds)."""
    n = max(int(counts["trials"]), 1)
    sql = counts["optuna_sql"] + counts["mlflow_sql"]
    storage_s = counts["optuna_s"] + counts["mlflow_s"]
    return {
        "trials": counts["trials"],
        "optuna_sql": counts["optuna_sql"] / n,
        "mlflow_sql": counts["mlflow_sql"] / n,
        "optuna_ms": 1000 * counts["optuna_s"] / n,
        "mlflow_ms": 1000 * counts["mlflow_s"] / n,
        "storage_ms": 1000 * storage_s / n,
        "storage_cpu_ms": 1000 * (counts["optuna_cpu_s"] + counts["mlflow_cpu_s"]) / n,
        "sql_driver_ms": 1000 * counts["sql_s"] / n,
        "ms_per_statement": 1000 * storage_s / max(sql, 1),
        "heartbeat_sql": counts["threads"].get("tuner-heartbeat", 0),
        "other_thread_sql": sum(v for k, v in counts["threads"].items() if k != "tuner-heartbeat"),
        "slow_sql": counts["slow_sql"],
    }


def per_method(counts: dict[str, Any]) -> list[tuple[str, float, float, float, float]]:
    """``(method, calls, ms, CPU ms, statements)`` per trial told, the costliest first."""
    n = max(int(counts["trials"]), 1)
    rows = [(name, c / n, 1000 * s / n, 1000 * cpu / n, sql / n) for name, (c, s, cpu, sql) in counts["methods"].items()]
    return sorted(rows, key=lambda r: -r[2])
