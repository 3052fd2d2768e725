"""A launch's fixed cost and the shipped study's cost per trial, each beside its baseline.

    python -m benchmarks.fixed_cost                 # 3 pairs (bare import, 1-trial launch); ~3 min on 2 cores
    python -m benchmarks.fixed_cost --repeats 1 --baseline-trials 2

Side by side, in fresh processes and fresh folders:

- bare import: ``python -c "import torch, optuna, mlflow, pandas"`` (what any launch pays), and
  the same with the garbage collector set as ``tuner`` sets it (``tuner.process.GC_THRESHOLD``), so
  the share of the collector setting in the ratio is visible;
- a 1-trial launch of ``studies/cars_mlp.toml`` on fresh stores (a new Optuna SQLite file and a
  new MLflow store; the migrated empty MLflow store is cached per machine, so the first launch on
  a machine is reported apart);
- the whole 50-trial study, start-up to summary, per trial, against the tutorial loop
  (``benchmarks/baselines/plain_optuna_mlflow.py``, one seeded split, its own start-up included).

Printed as ratios (goal: the 1-trial launch <= 2x the bare import; the study >= 20x faster per
trial than the tutorial loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuner.process import GC_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true", XDG_CACHE_HOME=str(cache))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _project(folder: Path) -> Path:
    """A user's checkout: pyproject.toml, studies/, data/ (so the stores land in it)."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    shutil.copytree(ROOT / "studies", folder / "studies", ignore=shutil.ignore_patterns("*.db*"))
    shutil.copytree(ROOT / "data", folder / "data")
    return folder / "studies" / "cars_mlp.toml"


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-trials", type=int, default=3, help="tutorial-loop trials (~6 s each)")
    ap.add_argument("--n-trials", type=int, default=50, help="trials of the whole study")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="tuner-fixed-") as tmp:
        base, cache = Path(tmp), Path(tmp) / "cache"
        env = _env(cache)
        study = _project(base / "cold")
        cold = _timed([py, "-m", "tuner", "launch", str(study), "--n-trials", "1", "--no-progress"], study.parent, env)
        # Alternating pairs: this VM's speed drifts by a third within minutes, so a bare import and
        # a launch timed back to back see the same machine; the ratio of each pair is reported too.
        bare, bare_gc, one = [], [], []
        imports = "import torch, optuna, mlflow, pandas"
        for i in range(args.repeats):
            bare.append(_timed([py, "-c", imports], base, env))
            bare_gc.append(_timed([py, "-c", f"import gc; gc.set_threshold(*{GC_THRESHOLD}); {imports}"], base, env))
            study = _project(base / f"one-{i}")
            one.append(_timed([py, "-m", "tuner", "launch", str(study), "--n-trials", "1", "--no-progress"], study.parent, env))
        study = _project(base / "whole")
        whole = _timed([py, "-m", "tuner", "launch", str(study), "--n-trials", str(args.n_trials), "--no-progress"],
                       study.parent, env)
        start = time.perf_counter()
        _timed([py, "-m", "benchmarks.baselines.plain_optuna_mlflow", "--n-trials", str(args.baseline_trials),
                "--out", str(base / "plain")], ROOT, env)
        plain = time.perf_counter() - start
    b, bg, o = statistics.median(bare), statistics.median(bare_gc), statistics.median(one)
    per_trial, per_plain = whole / args.n_trials, plain / args.baseline_trials
    print(f"{'what':<52}{'wall s':>10}")
    print(f"{'bare import of torch, optuna, mlflow, pandas (median)':<52}{b:>10.2f}")
    print(f"{'the same, collector set as tuner sets it (median)':<52}{bg:>10.2f}")
    print(f"{'1-trial launch, fresh stores (median)':<52}{o:>10.2f}")
    print(f"{'1-trial launch, first on this machine (cache cold)':<52}{cold:>10.2f}")
    print(f"{f'{args.n_trials}-trial cars study, start-up included, per trial':<52}{per_trial:>10.3f}")
    print(f"{f'tutorial loop, {args.baseline_trials} trials, start-up included, per trial':<52}{per_plain:>10.3f}")
    pairs = sorted(x / y for x, y in zip(one, bare))
    print(f"fixed cost: 1-trial launch / bare import = {o / b:.2f}x (goal <= 2x); "
          f"pair by pair {statistics.median(pairs):.2f}x median, {pairs[0]:.2f}-{pairs[-1]:.2f}x")
    print(f"  against the bare import with tuner's collector setting: {o / bg:.2f}x")
    print(f"per trial: tutorial loop / tuner study = {per_plain / per_trial:.1f}x (goal >= 20x)")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
