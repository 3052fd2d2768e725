"""Per-trial orchestration overhead: tuner vs the tutorial-style baseline (issue 2, "Speed").

    python -m benchmarks.overhead                      # tuner 30 trials, baseline 10 trials
    python -m benchmarks.overhead --baseline-trials 30 # the same count on both sides (~6 min)
    python -m benchmarks.overhead --storage --trials 8 # SQL statements and storage ms per trial,
                                                       # sequential and fused, no baseline
    python -m benchmarks.overhead --storage --execution fused --methods  # and per storage method

Both run the mtcars MLP study (studies/cars_mlp.toml) in fresh SQLite stores, one after the
other in this process. Overhead of a trial = its share of the wall time minus the time inside
the training function (see ``benchmarks._arms.overhead``). Printed: median overhead per trial
(wall, and this process's CPU time: on a machine shared with other jobs the wall time also
counts waiting for a core), the mean (wall minus training over trials: start-up and the final
registration included), start-up, for both arms, and the ratio of the medians.

``--storage`` measures the storage side of the trial loop instead (``benchmarks._arms.
storage_probe``): SQL statements per trial on the Optuna storage and on the MLflow store (counted
by SQLAlchemy's ``before_cursor_execute``: deterministic for a seed, the main evidence), and the
milliseconds spent inside their calls (indicative on a shared machine), for sequential and fused
execution (``--execution``), the study's own cross-validation with ``--cv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks._arms import CARS_MLP, overhead, run_tuner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30, help="tuner trials (default 30)")
    ap.add_argument("--baseline-trials", type=int, default=10, help="baseline trials (default 10: ~12 s each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", action="store_true", help="count SQL statements and storage ms per trial instead")
    ap.add_argument("--execution", choices=["sequential", "fused", "both"], default="both", help="with --storage")
    ap.add_argument("--cv", action="store_true", help="with --storage: the study's 5 folds instead of one split")
    ap.add_argument("--methods", action="store_true", help="with --storage: also the cost of each storage method")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.filterwarnings("ignore")
    import mlflow.pytorch  # noqa: F401  (warm imports: neither arm pays for them)
    import optuna

    import tuner.study  # noqa: F401
    import tuner.tracking  # noqa: F401
    from benchmarks.baselines import plain_optuna_mlflow as plain

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.storage:
        return storage_main(args)
    with tempfile.TemporaryDirectory(prefix="tuner-overhead-") as tmp:
        t = run_tuner(CARS_MLP, n_trials=args.trials, seed=args.seed, workdir=Path(tmp) / "tuner")
        b = plain.run(CARS_MLP, n_trials=args.baseline_trials, seed=args.seed, workdir=Path(tmp) / "plain")
    to, bo = overhead(t), overhead(b)
    print(f"{'arm':<22}{'trials':>7}{'wall s':>9}{'train s':>9}{'median ms':>11}{'CPU ms':>8}{'mean ms':>10}"
          f"{'start-up s':>12}{'best rmse':>11}")
    for name, r, o in (("tuner", t, to), ("plain_optuna_mlflow", b, bo)):
        print(f"{name:<22}{o['n_trials']:>7}{o['wall_s']:>9.1f}{o['train_s']:>9.1f}{o['median_ms']:>11.0f}"
              f"{o['median_cpu_ms']:>8.0f}{o['mean_ms']:>10.0f}{o['startup_s']:>12.1f}{r['best_value']:>11.3f}")
    print(f"overhead ratio (median per trial, baseline/tuner): {bo['median_ms'] / to['median_ms']:.0f}x "
          "(goal: tuner <= 50 ms, >= 50x less than the baseline)")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


def storage_main(args: argparse.Namespace) -> int:
    """SQL statements and storage milliseconds per trial of the trial loop, per execution mode.

    Besides wall time: the main thread's CPU time inside the storage calls (equal to the wall time
    when nothing waits: no lock, no disk), the time inside the database driver, statements of the
    heartbeat thread and statements slower than 5 ms (a wait on SQLite's write lock shows there).
    """
    from benchmarks._arms import per_method, per_trial, storage_probe

    modes = ["sequential", "fused"] if args.execution == "both" else [args.execution]
    print(f"{'execution':<12}{'trials':>7}{'optuna SQL':>12}{'mlflow SQL':>12}{'optuna ms':>11}{'mlflow ms':>11}"
          f"{'storage ms':>12}{'CPU ms':>8}{'driver ms':>11}{'ms/stmt':>9}{'beat SQL':>10}{'slow SQL':>10}"
          "   (per trial told, trial loop only)")
    for mode in modes:
        overrides: dict = {"execution": mode}
        if args.cv:
            overrides["validation"] = {"folds": 5}
        with tempfile.TemporaryDirectory(prefix="tuner-storage-") as tmp, storage_probe() as counts:
            run_tuner(CARS_MLP, n_trials=args.trials, seed=args.seed, workdir=Path(tmp), overrides=overrides, promote=False)
        p = per_trial(counts)
        print(f"{mode:<12}{p['trials']:>7}{p['optuna_sql']:>12.1f}{p['mlflow_sql']:>12.1f}{p['optuna_ms']:>11.1f}"
              f"{p['mlflow_ms']:>11.1f}{p['storage_ms']:>12.1f}{p['storage_cpu_ms']:>8.1f}{p['sql_driver_ms']:>11.1f}"
              f"{p['ms_per_statement']:>9.2f}{p['heartbeat_sql']:>10}{p['slow_sql']:>10}")
        if args.methods:
            for name, calls, ms, cpu, sql in per_method(counts):
                print(f"    {name:<42}{calls:>6.2f} calls{ms:>8.1f} ms{cpu:>8.1f} CPU ms{sql:>7.1f} SQL  (per trial)")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
