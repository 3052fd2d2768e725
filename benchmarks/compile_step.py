"""One fused bank step, eager against ``torch.compile``, on the CPU (issue 16's untried lever).

    python -m benchmarks.compile_step                      # four bank shapes, ~2 min on 2 cores
    python -m benchmarks.compile_step --shapes 64,16,1,uniform

A step is what ``Bank.end_step`` computes once the batch is gathered: ``bankmath.forward``
(recording the tape), the regression loss and its gradient, ``bankmath.backward`` and the Adam
update of the whole ``(K, P)`` block, on synthetic data of the cars shape (8 rows per batch, 10
features). "mixed" spreads the K slots over five activations (five runs per layer, as the cars
space does). Process CPU time per step after a warm-up; the first compiled call is timed apart.
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

from tuner import bankmath as bm

ACTIVATIONS = ["gelu", "leaky_relu", "relu", "sigmoid", "tanh"]


def _bank(k: int, hidden: int, layers: int, kind: str, n_in: int = 10, batch: int = 8) -> dict[str, Any]:
    runs = [("relu", k)]
    if kind == "mixed":
        runs = [(a, k // 5 + (i < k % 5)) for i, a in enumerate(ACTIVATIONS) if k // 5 + (i < k % 5)]
    shapes = [("w0", (n_in, hidden)), ("b0", (1, hidden))]
    shapes += [(f"{p}{i}", s) for i in range(1, layers) for p, s in (("w", (hidden, hidden)), ("b", (1, hidden)))]
    shapes += [("wout", (hidden, 1)), ("bout", (1, 1))]
    n_params = sum(a * b for _, (a, b) in shapes)
    gen = torch.Generator().manual_seed(0)
    return {
        "runs": runs, "shapes": shapes, "layers": layers,
        "tensors": (torch.randn(k, n_params, generator=gen) * 0.1, torch.zeros(k, n_params), torch.zeros(k, n_params),
                    torch.zeros(k, n_params), torch.randn(k, batch, n_in, generator=gen), torch.randn(k, batch, generator=gen),
                    torch.ones(k, batch, dtype=torch.bool), torch.tensor([[1e-2, 1e-2, 0.03, 1.0]]).repeat(k, 1)),
    }


def _step_function(bank: dict[str, Any]) -> Any:
    runs, shapes, layers = bank["runs"], bank["shapes"], bank["layers"]

    def step(flat: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor, rows: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        w, offset = {}, 0
        for name, (a, b) in shapes:
            w[name] = flat[:, offset:offset + a * b].view(-1, a, b)
            offset += a * b
        tape = bm.Tape()
        out = bm.forward(w, x, layers, runs, [None] * layers, tape).squeeze(-1)
        loss, d_out = bm.loss_and_grad(out, y, rows, "regression")
        bm.backward(tape, w, grad, d_out, runs, [None] * layers)
        bm.update(flat, grad, m, v, scalars, sgd=False, decoupled=False)
        return loss

    return step


def _us_per_step(step: Any, tensors: tuple[torch.Tensor, ...], n: int) -> float:
    for _ in range(20):
        step(*tensors)
    start = time.process_time()
    for _ in range(n):
        step(*tensors)
    return (time.process_time() - start) / n * 1e6


def measure(k: int, hidden: int, layers: int, kind: str, n: int = 400) -> dict[str, Any]:
    bank = _bank(k, hidden, layers, kind)
    eager = _us_per_step(_step_function(bank), bank["tensors"], n)
    compiled = torch.compile(_step_function(bank), dynamic=False)
    start = time.perf_counter()
    compiled(*bank["tensors"])
    first = time.perf_counter() - start
    return {"shape": f"K={k}, hidden {hidden}, {layers} layer(s), {kind}", "eager_us": eager,
            "compiled_us": _us_per_step(compiled, bank["tensors"], n), "first_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64,16,1,uniform", "64,32,2,mixed", "64,64,3,mixed", "8,32,2,mixed"],
                        help="K,hidden,layers,uniform|mixed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warm-cache", action="store_true",
                        help="use torch's on-disk compile cache (default: a fresh one, so the first call is a cold compile)")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tuner-inductor-")
    torch.set_num_threads(1)  # as tuner trains on a CPU
    print("| bank | eager us/step | compiled us/step | compiled / eager | first compiled call |")
    print("| --- | --- | --- | --- | --- |")
    for text in args.shapes:
        k, hidden, layers, kind = text.split(",")
        r = measure(int(k), int(hidden), int(layers), kind, args.steps)
        print(f"| {r['shape']} | {r['eager_us']:.0f} | {r['compiled_us']:.0f} | {r['eager_us'] / r['compiled_us']:.2f}x faster "
              f"| {r['first_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
