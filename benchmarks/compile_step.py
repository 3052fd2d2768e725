"""One fused bank step, eager against ``torch.compile``, on the CPU (issue 16's untried lever).

    python -m benchmarks.compile_step                      # four bank shapes, ~2 min on 2 cores
    python -m benchmarks.compile_step --shapes 64,16,1,uniform
    python -m benchmarks.compile_step --eager-only --batch 26 --shapes 56,32,3,mixed 56,16,3,mixed

A step is what ``Bank.end_step`` computes once the batch is gathered: ``bankmath.forward``
(recording the tape), the regression loss and its gradient, ``bankmath.backward`` and the Adam
update of the whole ``(K, P)`` block, on a real ``Bank`` of K cars trials (its layout, activation
runs and layer masks; one batch of 8 training rows per slot, ``--batch`` to change it). "mixed" spreads the K trials over
five activations (five runs per layer, as the cars space does). Process CPU time per step after
a warm-up; the first compiled call is timed apart (a cold compile unless ``--warm-cache``).
What it does not measure: the bank's host work around the step (batch gather, epoch events,
starting and freezing trials), and recompiles: ``runs``, the slots in use and the widest batch
change at nearly every refill of a mixed-shape bank, and each new combination compiles again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.fused import cars
from tuner import bankmath as bm
from tuner.bank import Bank, Job
from tuner.train import TrainParams, model_config

ACTIVATIONS = ["gelu", "leaky_relu", "relu", "sigmoid", "tanh"]
BATCH = 8


def _step(k: int, hidden: int, layers: int, kind: str, batch: int = BATCH) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """One bank step of K cars trials as a function of its tensors, and those tensors."""
    data = cars()
    jobs = [Job(TrainParams(lr=1e-2, epochs=1, batch_size=batch, hidden_size=hidden, n_layers=layers,
                            activation=ACTIVATIONS[i % 5] if kind == "mixed" else "relu"), i) for i in range(k)]
    bank = Bank([data], torch.device("cpu"), linear=False, sgd=False, width=hidden)
    bank.add_many([(i, job, model_config(job.params, data)) for i, job in enumerate(jobs)])
    runs, layer_on = bank.runs, bank.layer_on
    gen = torch.Generator().manual_seed(0)
    rows_of = torch.stack([torch.randperm(len(data.x_train), generator=gen)[:batch] for _ in range(k)])
    T = bank.used
    tensors = (T["flat"], bank.grad, T["m"], T["v"], data.x_train[rows_of], data.y_train[rows_of],
               torch.ones(k, batch, dtype=torch.bool), torch.tensor([[1e-2, 1e-2, 0.03, 1.0]]).repeat(k, 1))

    def step(flat: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor, rows: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        w = bank.views(flat)
        tape = bm.Tape()
        out = bm.forward(w, x, layers, runs, layer_on, tape).squeeze(-1)
        loss, d_out = bm.loss_and_grad(out, y, rows, "regression")
        bm.backward(tape, w, grad, d_out, runs, layer_on)
        bm.update(flat, grad, m, v, scalars, sgd=False, decoupled=False)
        return loss

    return step, tensors


def _us_per_step(step: Any, tensors: tuple[torch.Tensor, ...], n: int) -> float:
    for _ in range(20):
        step(*tensors)
    start = time.process_time()
    for _ in range(n):
        step(*tensors)
    return (time.process_time() - start) / n * 1e6


def measure(k: int, hidden: int, layers: int, kind: str, n: int = 400, batch: int = BATCH,
            with_compile: bool = True) -> dict[str, Any]:
    step, tensors = _step(k, hidden, layers, kind, batch)
    eager = _us_per_step(step, tensors, n)
    if not with_compile:
        return {"shape": f"K={k}, hidden {hidden}, {layers} layer(s), {kind}, batch {batch}", "eager_us": eager}
    compiled = torch.compile(step, dynamic=False)
    start = time.perf_counter()
    compiled(*tensors)
    first = time.perf_counter() - start
    return {"shape": f"K={k}, hidden {hidden}, {layers} layer(s), {kind}", "eager_us": eager,
            "compiled_us": _us_per_step(compiled, tensors, n), "first_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64,16,1,uniform", "64,32,2,mixed", "64,64,3,mixed", "8,32,2,mixed"],
                        help="K,hidden,layers,uniform|mixed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warm-cache", action="store_true",
                        help="use torch's on-disk compile cache (default: a fresh one, so the first call is a cold compile)")
    parser.add_argument("--batch", type=int, default=BATCH, help="training rows per slot in the step")
    parser.add_argument("--eager-only", action="store_true", help="the eager step only (how its cost scales with the shape)")
    args = parser.parse_args()
    if args.eager_only:
        torch.set_num_threads(1)
        print("| bank | eager us/step |\n| --- | --- |")
        for text in args.shapes:
            k, hidden, layers, kind = text.split(",")
            r = measure(int(k), int(hidden), int(layers), kind, args.steps, args.batch, with_compile=False)
            print(f"| {r['shape']} | {r['eager_us']:.0f} |", flush=True)
        return
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tuner-inductor-")
    torch.set_num_threads(1)  # as tuner trains on a CPU
    print("| bank | eager us/step | compiled us/step | compiled / eager | first compiled call |")
    print("| --- | --- | --- | --- | --- |")
    for text in args.shapes:
        k, hidden, layers, kind = text.split(",")
        r = measure(int(k), int(hidden), int(layers), kind, args.steps, args.batch)
        print(f"| {r['shape']} | {r['eager_us']:.0f} | {r['compiled_us']:.0f} | {r['eager_us'] / r['compiled_us']:.2f}x faster "
              f"| {r['first_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
