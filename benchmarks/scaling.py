"""Trials per second with 1, 2 and 4 workers on SQLite and on PostgreSQL, sequential and fused, side by side.

    python benchmarks/scaling.py                # 40 trials per configuration
    python benchmarks/scaling.py --n-trials 48 --workers 1 2 4 8
    python benchmarks/scaling.py --n-trials 8 --epochs 5 --workers 1 2 --backends sqlite   # smoke

Each configuration runs `tuner launch STUDY --workers N` on a fresh storage (a SQLite file, or a
fresh database on the PostgreSQL server at 127.0.0.1:5432) and a fresh SQLite MLflow store, on
the cars data with the MLP study's space but a fixed amount of work per trial (epochs and batch
size fixed, no pruning), so every trial costs the same and only the number of workers changes.

Throughput is the steady state, from the trials' own timestamps: the trials started after every
worker finished its first trial, over the time from then to the last completion. Process start-up
(a few seconds each: torch, mlflow) and each process's first, slower trial are not counted; the
wall time of the whole launch is shown beside it. Parallel efficiency =
throughput(n) / (n x throughput(1)) against the 1-worker run on the same backend and execution
(the baseline). Each configuration runs once per execution mode (``--execution``: the study file's
``execution``); every worker fuses its own K trials in fused mode (N workers x K slots), and the
``fused trials`` column counts the trials whose provenance records that they ran fused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"

STUDY = """\
name = "bench"
data = "{data}"
target = "mpg"
n_trials = {n_trials}
seed = 0
execution = "{execution}"
[pruner]
name = "none"
[space]
lr = {{ type = "float", low = 1e-3, high = 3e-1, log = true }}
epochs = {{ type = "fixed", value = {epochs} }}
batch_size = {{ type = "fixed", value = 8 }}
hidden_size = {{ type = "int", low = 2, high = 64, log = true }}
activation = {{ type = "categorical", choices = ["relu", "tanh", "gelu"] }}
weight_decay = {{ type = "float", low = 1e-6, high = 1e-1, log = true }}
"""


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(sql)


def run_one(backend: str, n_workers: int, n_trials: int, epochs: int, execution: str = "sequential") -> dict[str, float | int | str]:
    import optuna

    with tempfile.TemporaryDirectory(prefix="tuner-bench-") as tmp:
        folder = Path(tmp)
        study = folder / "bench.toml"
        study.write_text(STUDY.format(data=(ROOT / "data" / "cars.csv").as_posix(), n_trials=n_trials, epochs=epochs,
                                      execution=execution))
        db = None
        if backend == "postgres":
            db = f"tuner_bench_{uuid.uuid4().hex[:8]}"
            _pg_admin(f"CREATE DATABASE {db}")
            storage = f"{PG}/{db}"
        else:
            storage = f"sqlite:///{folder / 'optuna.db'}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [sys.executable, "-m", "tuner", "launch", str(study), "--workers", str(n_workers), "--no-progress"]
        cmd += ["--storage", storage, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        try:
            started = time.perf_counter()
            subprocess.run(cmd, cwd=folder, env=env, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - started
            trials = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
        finally:
            if db:
                _pg_admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    # Steady state: from the moment every worker has finished its first trial (the first trial of a
    # process pays one-off costs: lazy imports in torch's optimizers, MLflow's first requests).
    ended = [(t, t.datetime_start, t.datetime_complete) for t in trials if t.datetime_start and t.datetime_complete]
    firsts: dict[str, datetime] = {}
    for t, _, c in sorted(ended, key=lambda e: e[2]):
        firsts.setdefault(_provenance(t).get("worker", "?"), c)
    start = max(firsts.values())
    steady = [(s, c) for _, s, c in ended if s >= start]
    if len(steady) < 2:  # every trial started in the first refill (few trials per worker): count them all
        steady = [(s, c) for _, s, c in ended]
        start = min(s for s, _ in steady)
    span = (max(c for _, c in steady) - start).total_seconds()
    return {
        "backend": backend,
        "execution": execution,
        "fused_trials": sum(_provenance(t).get("execution") == "fused" for t in trials),
        "workers": n_workers,
        "trials": done,
        "steady_trials": len(steady),
        "seconds": span,
        "wall": wall,
        "trials_per_s": len(steady) / span,
    }


def _provenance(trial: object) -> dict:
    return getattr(trial, "user_attrs", {}).get("provenance") or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40, help="fixed epochs per trial (the work per trial)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--execution", nargs="+", choices=["sequential", "fused"], default=["sequential", "fused"])
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for backend in args.backends:
        for execution in args.execution:
            for n in args.workers:
                row = run_one(backend, n, args.n_trials, args.epochs, execution)
                rows.append(row)
                print(f"  {backend:<9} {execution:<10} {n} workers: {row['trials_per_s']:.2f} trials/s", file=sys.stderr,
                      flush=True)
    base = {(r["backend"], r["execution"]): r["trials_per_s"] for r in rows if r["workers"] == 1}
    print(f"\n{os.cpu_count()} CPUs, {args.n_trials} trials of {args.epochs} epochs per run\n")
    print(
        "| storage | execution | workers | trials/s | speed-up vs 1 worker | parallel efficiency | steady trials "
        "| fused trials | span (s) | wall incl. start-up (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["backend"], r["execution"]))
        speedup = r["trials_per_s"] / b if b else float("nan")
        print(
            f"| {r['backend']} | {r['execution']} | {r['workers']} | {r['trials_per_s']:.2f} | {speedup:.2f}x | "
            f"{speedup / int(r['workers']):.0%} | {r['steady_trials']} | {r['fused_trials']}/{r['trials']} | "
            f"{r['seconds']:.1f} | {r['wall']:.1f} |"
        )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
