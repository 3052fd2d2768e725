"""The registered champion on an untouched test part, beside scikit-learn on the same rows.

    python -m benchmarks.quality                                   # every table, 3 seeds, 30 trials
    python -m benchmarks.quality --tables cars --seeds 1 --n-trials 4       # a smoke run (< 1 min)
    python -m benchmarks.quality --arm 'new:[validation]\\nfolds = 5' --arm 'new+ensemble:...'

For each table and seed, a seeded 20% test part (stratified for classification) is held back;
the other 80% (the dev part) is written to a temporary CSV with a study file, and a real
``tuner launch`` (a subprocess, fresh SQLite stores) tunes and registers a champion on it. The
test part then goes through ``tuner predict`` on the registered champion, and its metric (RMSE or
accuracy) sits beside Ridge / LogisticRegression and HistGradientBoosting fitted on the same dev
part (``benchmarks.tables_quality.sklearn_scores``: median imputation + indicators, one-hot).

Arms are TOML snippets added to every study file (top-level keys, then tables): by default
``single`` (nothing added: the single best trial) and ``ensemble`` (``ensemble = { size = 5 }``,
tuner.ensemble). ``--arm NAME:TOML`` replaces them, e.g. to compare new defaults against old ones
set explicitly. The study files' own ``[validation]`` is dropped so each arm meets tuner's default
scheme unless the arm sets one.

Tables: cars (mpg and am, data/cars.csv, the spaces of studies/cars_mlp.toml and cars_am.toml),
penguins species and body mass (data/penguins.csv, the space of studies/penguins.toml), and
scikit-learn's bundled diabetes, breast_cancer and wine (no download; penguins.toml's space).
Goal (issue 15): the champion's mean test metric at least as good as the better baseline, RMSE
within 3%, accuracy within 0.01.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.tables_quality import sklearn_scores

ROOT = Path(__file__).resolve().parents[1]
TEST_FRACTION = 0.2
DEFAULT_ARMS = {"single": "", "ensemble": "ensemble = { size = 5 }"}


@dataclass(frozen=True)
class Table:
    """One benchmark problem: where its rows come from and which study file's space it uses."""

    name: str
    target: str
    task: str  # "regression" or "classification"
    base: str  # study file under studies/ whose space, sampler and pruner are used
    exclude: tuple[str, ...] = ()

    @property
    def metric(self) -> str:
        return "rmse" if self.task == "regression" else "accuracy"

    def frame(self) -> Any:
        import pandas as pd

        if self.name.startswith("cars"):
            frame = pd.read_csv(ROOT / "data" / "cars.csv")
        elif self.name.startswith("penguins"):
            frame = pd.read_csv(ROOT / "data" / "penguins.csv")
        else:
            from sklearn import datasets

            frame = getattr(datasets, f"load_{self.name}")(as_frame=True).frame
        return frame[frame[self.target].notna()].reset_index(drop=True)


TABLES = {t.name: t for t in [
    Table("cars", "mpg", "regression", "cars_mlp.toml", exclude=("model",)),
    Table("cars_am", "am", "classification", "cars_am.toml", exclude=("model",)),
    Table("penguins_species", "species", "classification", "penguins.toml"),
    Table("penguins_body_mass", "body_mass_g", "regression", "penguins.toml"),
    Table("diabetes", "target", "regression", "penguins.toml"),
    Table("breast_cancer", "target", "classification", "penguins.toml"),
    Table("wine", "target", "classification", "penguins.toml"),
]}


def toml_text(doc: dict[str, Any]) -> str:
    """A study document as TOML: scalars and inline tables first, then one [table] per dict."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)  # str, int, float, bool: TOML spells them as JSON does

    top = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict) or k == "ensemble"]
    tables = [f"\n[{k}]\n" + "\n".join(f"{n} = {value(x)}" for n, x in v.items())
              for k, v in doc.items() if isinstance(v, dict) and k != "ensemble"]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def study_doc(table: Table, csv: Path, folder: Path, *, seed: int, n_trials: int, arm: str) -> dict[str, Any]:
    """The base study file's space, sampler and pruner on the dev CSV, the arm's keys merged in."""
    base = tomllib.loads((ROOT / "studies" / table.base).read_text())
    doc: dict[str, Any] = {
        "name": f"q-{table.name}", "data": str(csv), "target": table.target, "task": table.task,
        "metric": table.metric, "n_trials": n_trials, "seed": seed, "registered_model": f"q-{table.name}",
        "storage": f"sqlite:///{folder / 'optuna.db'}", "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "report_every": base.get("report_every", 1),
    }
    if table.exclude:
        doc["exclude"] = list(table.exclude)
    for key in ("sampler", "pruner", "space"):
        doc[key] = base[key]
    for key, v in tomllib.loads(arm).items():
        doc[key] = {**doc.get(key, {}), **v} if isinstance(v, dict) and key != "ensemble" else v
    return doc


def tuner(*args: str, cwd: Path) -> str:
    """``python -m tuner ARGS`` in a subprocess of this checkout; its stdout (exit 0 required)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tuner {' '.join(args[:2])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def split(frame: Any, table: Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(frame))
    stratify = frame[table.target].to_numpy() if table.task == "classification" else None
    dev, test = train_test_split(rows, test_size=TEST_FRACTION, random_state=seed, stratify=stratify)
    return np.sort(dev), np.sort(test)


def test_metric(table: Table, predicted: np.ndarray, actual: np.ndarray) -> float:
    if table.task == "classification":
        return float(np.mean(predicted.astype(str) == actual.astype(str)))
    return float(np.sqrt(np.mean((predicted.astype(float) - actual.astype(float)) ** 2)))


def run_one(table: Table, seed: int, n_trials: int, arms: dict[str, str]) -> dict[str, Any]:
    """One table at one seed: the baselines and every arm's champion on the same test part."""
    import pandas as pd

    from tuner.browse import best_info
    from tuner.columns import table_inputs
    from tuner.config import load_spec

    frame = table.frame()
    dev, test = split(frame, table, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roles = table_inputs(frame.iloc[dev], table.target, exclude=table.exclude, task=table.task).roles  # type: ignore[arg-type]
    row: dict[str, Any] = {"table": table.name, "seed": seed, "metric": table.metric, "n_dev": len(dev), "n_test": len(test),
                           **sklearn_scores(frame, table.target, table.task, roles.numeric, roles.categorical, dev, test, ridge=True)}
    for arm, snippet in arms.items():
        with tempfile.TemporaryDirectory(prefix=f"tuner-quality-{table.name}-") as tmp:
            folder = Path(tmp)
            csv, test_csv = folder / "dev.csv", folder / "test.csv"
            frame.iloc[dev].to_csv(csv, index=False)
            frame.iloc[test].drop(columns=[table.target]).to_csv(test_csv, index=False)
            study = folder / "study.toml"
            study.write_text(toml_text(study_doc(table, csv, folder, seed=seed, n_trials=n_trials, arm=snippet)))
            tuner("launch", str(study), "--no-progress", "--no-report", cwd=folder)
            info = best_info(load_spec(study))  # what `tuner best --json` prints
            out = folder / "pred.csv"
            tuner("predict", f"q-{table.name}@champion", "--input", str(test_csv), "--output", str(out),
                  "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", cwd=folder)
            predicted = pd.read_csv(out)["prediction"].to_numpy()
        ensemble = info.get("ensemble") or {}
        row[arm] = test_metric(table, predicted, frame[table.target].to_numpy()[test])
        row[f"{arm}_selection"] = float(info["value"])  # the best trial's validation value
        row[f"{arm}_ensemble"] = bool(info.get("champion", {}).get("ensemble"))
        row[f"{arm}_ensemble_oof"] = ensemble.get("value")
        row[f"{arm}_validation"] = info.get("validation")
    return row


def summarise(rows: list[dict[str, Any]], arms: list[str]) -> str:
    """One markdown row per table: means (± sd) over seeds, and whether the goal is met."""
    head = ["table", "metric", "dev/test rows", "seeds", "Ridge/Logistic", "HistGB"]
    for arm in arms:
        head += [f"tuner {arm}", f"{arm}: selection value", f"{arm}: ensembles"]
    head += ["goal (best arm vs better baseline)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.4g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")

    for name in dict.fromkeys(r["table"] for r in rows):
        rs = [r for r in rows if r["table"] == name]
        metric = rs[0]["metric"]
        cells = [name, metric, f"{rs[0]['n_dev']}/{rs[0]['n_test']}", str(len(rs)),
                 ms([r["linear"] for r in rs]), ms([r["hist_gradient_boosting"] for r in rs])]
        means = {}
        for arm in arms:
            means[arm] = statistics.mean(r[arm] for r in rs)
            cells += [ms([r[arm] for r in rs]), ms([r[f"{arm}_selection"] for r in rs]),
                      f"{sum(r[f'{arm}_ensemble'] for r in rs)}/{len(rs)}"]
        lin, hgb = statistics.mean(r["linear"] for r in rs), statistics.mean(r["hist_gradient_boosting"] for r in rs)
        if metric == "rmse":
            bar, best = min(lin, hgb), min(means.values())
            ok = best <= 1.03 * bar
        else:
            bar, best = max(lin, hgb), max(means.values())
            ok = best >= bar - 0.01
        cells.append(f"{'met' if ok else 'not met'} ({best:.4g} vs {bar:.4g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_arms(given: list[str]) -> dict[str, str]:
    if not given:
        return dict(DEFAULT_ARMS)
    arms = {}
    for text in given:
        name, sep, snippet = text.partition(":")
        if not sep or not name:
            raise SystemExit(f"--arm {text!r}: write NAME:TOML, e.g. 'ensemble:ensemble = {{ size = 5 }}'")
        arms[name] = snippet.replace("\\n", "\n")
    return arms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (each: its own test part and study seed)")
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--arm", action="append", default=[], metavar="NAME:TOML",
                        help="a study-file snippet per arm (repeatable; default: single and ensemble = { size = 5 })")
    parser.add_argument("--out", type=Path, help="also write every row as JSON here")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tables.split(",") if t not in TABLES]
    if unknown:
        raise SystemExit(f"unknown table(s) {unknown}; choose from {sorted(TABLES)}")
    arms = parse_arms(args.arm)
    rows = []
    for name in args.tables.split(","):
        for seed in range(args.seeds):
            rows.append(run_one(TABLES[name], seed, args.n_trials, arms))
            print(f"done: {name} seed {seed}", file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"test part {TEST_FRACTION:.0%} held back from tuner; {args.n_trials} trials per study; "
          f"arms: {', '.join(f'{k} = {v!r}' for k, v in arms.items())}")
    print(summarise(rows, list(arms)))


if __name__ == "__main__":
    main()
