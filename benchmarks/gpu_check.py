"""The GPU check: tuner's ``train()`` and fused ``train_many`` vs the tutorial DataLoader loop (< 3 min).

    python -m benchmarks.gpu_check            # needs CUDA; exits 0 with a note where there is none
    python -m benchmarks.gpu_check --cpu      # the same script on the CPU (a dry run of it)
    python -m benchmarks.gpu_check --part fused

Part "m3": one model at a time on 1M rows: the data live on the GPU once (tuner's in-memory path);
the baseline fetches per-sample batches from host tensors through a DataLoader and calls
``loss.item()`` every step, as the tutorials do.

Part "fused" (issue 8): model-steps/s of K small MLPs on the cars data, the naive DataLoader loop
(one model at a time; the baseline) vs ``train_many`` at K = 64 ... 16384, synchronised wall time;
the rows of ``benchmarks/fused.py --part steps`` (uniform shapes, and cars-space shapes with 4K
jobs through K slots). Goal: >= 1000x vs the naive loop on an H100 at large K.

Part "host": the host work of those fused rows on this machine's CPU (``benchmarks.host_work``,
uniform arm at K = 4096 and 16384): the ceiling it puts on the fused rows, to read beside them
(a row near its ceiling is bound by the host, not the GPU).

Part "study": the cars MLP study (``studies/cars_mlp.toml``, 5-fold CV) launched sequentially and
fused on the device, fresh SQLite stores, as ``benchmarks/fused.py --part study``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any


def _naive_rate(params: dict[str, Any], data: Any, device: Any, steps: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from tuner.model import ModelConfig, TabularNet

    torch.manual_seed(0)
    model = TabularNet(ModelConfig(feature_names=data.feature_names, target=data.target,
                                   hidden_size=params["hidden_size"], activation="relu")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=params["lr"])
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=params["batch_size"], shuffle=True)
    done = 0
    start = time.perf_counter()
    while done < steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = F.mse_loss(model.core_output(xb), yb)
            loss.backward()
            opt.step()
            loss.item()
            done += 1
            if done >= steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU needed)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--part", choices=["m3", "fused", "host", "study", "all"], default="all")
    ap.add_argument("--fused-k", type=int, nargs="+", default=None,
                    help="K values of the fused rows (default 64 1024 4096 16384 on CUDA, 16 64 256 with --cpu)")
    ap.add_argument("--fused-epochs", type=int, default=100, help="epochs per trial in the fused rows")
    ap.add_argument("--study-trials", type=int, default=50, help="trials of the cars study in part study")
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from tuner.data import prepare
    from tuner.train import train

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (use --cpu for a dry run on the CPU)")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, 10))
    y = x @ rng.standard_normal(10) + 0.1 * rng.standard_normal(args.rows)
    data = prepare(x, y, feature_names=[f"x{i}" for i in range(10)], target="y", fraction=0.2, seed=0)
    on_device = data.to(device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (1 thread)"
    if args.part in ("fused", "all"):
        fused_rows(device, name, args.fused_k or ([16, 64, 256] if args.cpu else [64, 1024, 4096, 16384]),
                   args.fused_epochs)
    if args.part in ("host", "all"):
        host_rows_here([256] if args.cpu else [4096, 16384], args.fused_epochs)
    if args.part in ("m3", "all"):  # before the study, the longest part: a run cut off by a time limit keeps it
        print(f"device: {name}; {args.rows:,} rows x 10 features; {args.steps} steps per configuration")
        print(f"{'hidden':>7}{'batch':>7}{'tuner steps/s':>15}{'naive steps/s':>15}{'ratio':>8}")
        for hidden, batch in ((64, 256), (64, 1024), (256, 4096)):
            per_epoch = math.ceil(len(data.x_train) / batch)
            epochs = max(1, math.ceil(args.steps / per_epoch))
            params = {"lr": 1e-3, "epochs": epochs, "batch_size": batch, "hidden_size": hidden, "activation": "relu"}
            train({**params, "epochs": 1}, on_device, device=device, seed=0)  # warm-up (CUDA context, kernels)
            r = train(params, on_device, device=device, seed=0)
            tuner_rate = r.n_steps / r.seconds
            naive = _naive_rate(params, data, device, min(args.steps, 200))
            print(f"{hidden:>7}{batch:>7}{tuner_rate:>15.0f}{naive:>15.0f}{tuner_rate / naive:>7.1f}x", flush=True)
    if args.part in ("study", "all"):
        study_rows("cpu" if args.cpu else "cuda", name, args.study_trials)
    return 0


def fused_rows(device: Any, name: str, k_values: list[int], epochs: int) -> None:
    """Print the fused rows: naive loop, train() and train_many at each K (see benchmarks/fused.py)."""
    from benchmarks.fused import cars, steps_per_second

    print(f"fused trials on {name}: cars data, {epochs} epochs per trial, model-steps/s (ratio to the naive loop)")
    for row in steps_per_second(cars(), device, k_values, epochs=epochs, n_sequential=2):
        vs = f"  {row['vs_train']:7.1f}x vs train()" if "vs_train" in row else ""
        print(f"  {row['arm']:<38} K={row['K']:<6} {row['steps_s']:>12.0f} steps/s  {row['ratio']:8.1f}x{vs}", flush=True)


def host_rows_here(k_values: list[int], epochs: int) -> None:
    """Print the host work of the uniform fused rows on this machine's CPU and its ceiling."""
    from benchmarks.host_work import host_rows

    rows = host_rows(k_values, epochs, ("uniform",))  # on one thread, whatever the process runs on
    print(f"host work of the uniform fused rows, this machine's CPU, {epochs} epochs (naive loop on the CPU: "
          f"{rows[0]['naive']:.0f} steps/s):")
    for r in rows:
        print(f"  K={r['K']:<6} {r['us_per_trial']:8.0f} us per trial  {r['host_share']:5.0%} of the CPU run  "
              f"ceiling {r['ceiling']:7.0f}x the naive loop ({r['ceiling'] * r['naive']:.0f} model-steps/s)", flush=True)


def study_rows(device: str, name: str, n_trials: int) -> None:
    """Print the cars study launched sequentially and fused on ``device`` (wall and process CPU)."""
    import tempfile
    from pathlib import Path

    from benchmarks.fused import run_study

    print(f"cars MLP study on {name}: {n_trials} trials, 5-fold CV, fresh SQLite stores")
    runs = {}
    for execution in ("sequential", "fused"):
        with tempfile.TemporaryDirectory() as tmp:
            r = run_study(execution, n_trials, Path(tmp), device=device)
        runs[execution] = r
        print(f"  {execution:<10} loop {r['loop_s']:7.1f}s  launch {r['launch_s']:7.1f}s  cpu {r['cpu_s']:7.1f}s  "
              f"best rmse {r['best']:.3f}", flush=True)
    seq, fused = runs["sequential"], runs["fused"]
    print(f"  fused / sequential: loop {seq['loop_s'] / fused['loop_s']:.1f}x, launch "
          f"{seq['launch_s'] / fused['launch_s']:.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
