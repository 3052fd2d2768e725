"""What the end-of-launch extras cost: `tuner launch` with the report and notes (default) against
the same launch with `--no-report` (the named baseline), as CPU seconds of the whole command
(user + sys of the child: steadier than wall time on a shared machine), and the notes alone per trial.

    python benchmarks/bench_report.py [--trials 6] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
[space]
lr = { type = "float", low = 1e-3, high = 1e-1, log = true }
epochs = { type = "int", low = 3, high = 4 }
batch_size = { type = "categorical", choices = [8, 16] }
hidden_size = { type = "int", low = 2, high = 8 }
activation = { type = "categorical", choices = ["relu", "tanh"] }
"""


def _launch(folder: Path, n_trials: int, extra: list[str]) -> tuple[float, float]:
    study = folder / "bench.toml"
    study.write_text(f'name = "bench"\ndata = "{ROOT / "data" / "cars.csv"}"\ntarget = "mpg"\nn_trials = {n_trials}\n{SPACE}')
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuner", "launch", str(study), "--no-progress",
                    "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", *extra],
                   cwd=folder, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def _notes(n_trials: int) -> float:
    import optuna

    from tuner.config import load_spec
    from tuner.lineage import write_notes
    from tuner.study import open_storage
    from tuner.tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "s.toml").write_text(f'name = "notes"\ndata = "{ROOT / "data" / "cars.csv"}"\ntarget = "mpg"\n{SPACE}')
        spec = load_spec(folder / "s.toml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # The launch's own storage: SQLite in WAL mode with a busy timeout.
        study = optuna.create_study(storage=open_storage(f"sqlite:///{folder / 'o.db'}"), study_name="notes")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n_trials)
        tracker = Tracker(f"sqlite:///{folder / 'm.db'}", "notes")
        start = time.perf_counter()
        write_notes(study, study.trials, spec=spec, tracker=tracker)
        return (time.perf_counter() - start) / n_trials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--notes-only", action="store_true", help="skip the launches")
    args = parser.parse_args()
    if args.notes_only:
        print(f"notes: {_notes(50) * 1000:.1f} ms per trial (50 trials, SQLite WAL, one pass)")
        return
    rows: dict[str, list[tuple[float, float]]] = {"baseline --no-report": [], "default (report + notes)": []}
    for _ in range(args.repeat):
        for name, extra in (("baseline --no-report", ["--no-report"]), ("default (report + notes)", [])):
            with tempfile.TemporaryDirectory() as tmp:
                rows[name].append(_launch(Path(tmp), args.trials, extra))
    base_cpu = min(c for c, _ in rows["baseline --no-report"])
    for name, runs in rows.items():
        cpu, wall = min(c for c, _ in runs), min(w for _, w in runs)
        print(f"{name:<26} cpu {cpu:6.2f}s  wall {wall:6.2f}s  cpu ratio {cpu / base_cpu:4.2f}")
    print(f"notes: {_notes(50) * 1000:.1f} ms per trial (50 trials, SQLite WAL, one pass)")


if __name__ == "__main__":
    main()
