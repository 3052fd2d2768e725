"""The tutorial-style baseline: how an Optuna + MLflow tuning loop is usually written.

Optuna TPE on SQLite, the training loop written inside the objective over a ``DataLoader`` of a
``TensorDataset`` (per-sample indexing and collate), ``loss.item()`` every step, ``trial.report``
and ``should_prune`` every epoch, ``mlflow.log_metric`` per epoch, and a full
``mlflow.pytorch.log_model`` per trial. It gets what mlflow 3.17 needs for that and nothing
more: the default ``pt2`` format requires an ``input_example``; pip requirements are left to
MLflow's inference, as the tutorials do (FACTS.md: that is ~95% of the ~5 s of each call).

It trains the same network class on the same split (``tuner.data.prepare`` with the study's
seed) over the same search space, so speed ratios compare like with like. Timing: for each trial
it records when the trial's training started/ended and the seconds inside the training code
(epoch steps + validation), excluding the report/log calls between epochs.

    python -m benchmarks.baselines.plain_optuna_mlflow --n-trials 5 --out /tmp/plain
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
CARS_MLP = ROOT / "studies" / "cars_mlp.toml"


def _suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, p in space.items():
        if p.type == "float":
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        elif p.type == "int":
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        elif p.type == "categorical":
            params[name] = trial.suggest_categorical(name, p.choices)
        else:
            params[name] = p.value
    return params


def fit(
    params: dict[str, Any],
    data: Any,
    *,
    seed: int,
    on_epoch: Callable[[int, float, float], bool] | None = None,
    max_steps: int | None = None,
) -> tuple[Any, float, float, bool]:
    """The tutorial training loop on a ``tuner.data.Prepared`` split.

    Returns:
        ``(model, last validation rmse, seconds inside training, stopped by on_epoch)``;
        ``on_epoch(epoch, train_loss, rmse)`` runs between epochs and is not counted.
        With ``max_steps`` it stops after that many optimizer steps (throughput runs).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from tuner.model import ModelConfig, TabularNet

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    config = ModelConfig(feature_names=data.feature_names, target=data.target, hidden_size=params["hidden_size"],
                         n_layers=params.get("n_layers", 1), activation=params["activation"])
    model = TabularNet(config)
    model.set_scaling(data.x_mean_, data.x_std_, data.y_mean_, data.y_std_)
    opt = torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=params.get("weight_decay", 0.0))
    train_set = TensorDataset(data.x_train, data.y_train)
    loader = DataLoader(train_set, batch_size=params["batch_size"], shuffle=True)
    inside = time.perf_counter() - t0
    rmse, steps = math.inf, 0
    for epoch in range(params["epochs"]):
        t = time.perf_counter()
        model.train()
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.mse_loss(model.core_output(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)  # the per-step host sync of the tutorials
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        model.eval()
        with torch.no_grad():
            pred = model.core_output(data.x_val) * data.y_std_ + data.y_mean_
            rmse = torch.sqrt(F.mse_loss(pred, data.y_val_raw)).item()
        inside += time.perf_counter() - t
        if max_steps is not None and steps >= max_steps:
            break
        if not math.isfinite(rmse):
            break
        if on_epoch is not None and on_epoch(epoch, total / len(train_set), rmse):
            return model, rmse, inside, True
    model.steps_ = steps  # type: ignore[assignment]
    return model, rmse, inside, False


def run(
    study_file: str | Path = CARS_MLP,
    *,
    n_trials: int = 30,
    seed: int = 0,
    workdir: str | Path | None = None,
    space_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the baseline study; returns wall seconds, per-trial timings and the best value.

    ``space_overrides`` replaces search-space entries (e.g. fewer epochs for a smoke run);
    apply the same overrides to the tuner arm.
    """
    import mlflow
    import mlflow.pytorch
    import optuna
    import torch

    from tuner.config import load_spec
    from tuner.data import load_table, prepare, select_columns

    workdir = Path(workdir or tempfile.mkdtemp(prefix="plain-optuna-mlflow-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = load_spec(study_file, seed=seed, validation={"fraction": 0.2})  # one split, as tuner's arm
    space = dict(spec.space)
    if space_overrides:
        space.update(space_overrides)
    torch.set_num_threads(1)  # same as tuner on CPU, so the ratio is not about threads
    started, started_cpu = time.perf_counter(), time.process_time()

    frame = load_table(spec.data)
    x, y, names = select_columns(frame, spec.target, spec.features)
    data = prepare(x, y, feature_names=names, target=spec.target, fraction=spec.validation.fraction,
                   seed=spec.validation_seed)
    example = data.x_val[:5].numpy()

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = mlflow.set_experiment(f"plain-{spec.name}-{seed}")
    del experiment
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, **spec.sampler.options),
        pruner=optuna.pruners.MedianPruner(**spec.pruner.options),
        load_if_exists=True,
    )
    timings: list[dict[str, float]] = []

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, space)
        with mlflow.start_run(run_name=f"trial-{trial.number}"):
            mlflow.log_params(params)
            t0, c0 = time.perf_counter(), time.process_time()
            hook_cpu = 0.0

            def on_epoch(epoch: int, train_loss: float, rmse: float) -> bool:
                nonlocal hook_cpu
                c = time.process_time()
                mlflow.log_metric("train_loss", train_loss, step=epoch)
                mlflow.log_metric("val_rmse", rmse, step=epoch)
                trial.report(rmse, epoch)
                stop = trial.should_prune()
                hook_cpu += time.process_time() - c
                return stop

            model, rmse, inside, stopped = fit(params, data, seed=seed + trial.number, on_epoch=on_epoch)
            c1 = time.process_time()
            timings.append({"number": trial.number, "start": t0, "end": time.perf_counter(), "train": inside,
                            "end_cpu": c1, "train_cpu": c1 - c0 - hook_cpu})
            if stopped:
                raise optuna.TrialPruned()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # pt2 (the default format) requires an input example; requirements are inferred.
                mlflow.pytorch.log_model(model, name="model", input_example=example)
        if not math.isfinite(rmse):
            raise optuna.TrialPruned()
        return rmse

    study.optimize(objective, n_trials=n_trials)
    wall = time.perf_counter() - started
    best = min((t.value for t in study.trials if t.value is not None), default=math.nan)
    return {
        "arm": "plain_optuna_mlflow",
        "seed": seed,
        "n_trials": n_trials,
        "wall_s": wall,
        "started": started,
        "started_cpu": started_cpu,
        "cpu_s": time.process_time() - started_cpu,
        "trials": timings,
        "best_value": best,
        "n_pruned": sum(t.state.name == "PRUNED" for t in study.trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(CARS_MLP))
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="work folder (default: a temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    r = run(args.study, n_trials=args.n_trials, seed=args.seed, workdir=args.out)
    print(f"{r['n_trials']} trials in {r['wall_s']:.1f}s, best rmse {r['best_value']:.4f}, pruned {r['n_pruned']}")


if __name__ == "__main__":
    main()
