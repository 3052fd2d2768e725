"""M3 on CUDA: tuner's ``train()`` vs the tutorial DataLoader loop, steps per second (< 2 min).

    python -m benchmarks.gpu_check            # needs CUDA; exits 0 with a note where there is none
    python -m benchmarks.gpu_check --cpu      # the same script on the CPU (a dry run of it)

The data live on the GPU once (tuner's in-memory path); the baseline fetches per-sample batches
from host tensors through a DataLoader and calls ``loss.item()`` every step, as the tutorials do.
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
