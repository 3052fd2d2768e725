"""Host work of fused trials at large K: the ceiling it puts on a GPU, measured on the CPU.

    python -m benchmarks.host_work                      # K = 1024 4096, 20 epochs (~1 min)
    python -m benchmarks.host_work --arms uniform --k 4096 16384 --epochs 100   # gpu_check's epochs

On a GPU a bank step is a fixed sequence of kernels whose cost hardly grows with K, while the
host work around it (starting a trial, closing its epochs, freezing it) is Python per trial or per
trial-epoch and does not get faster on any device. So at large K the host work bounds the fused
rows of ``benchmarks/gpu_check.py``. This measures it where it can be measured without a GPU: the
process CPU of ``train_many`` outside its bank steps (``benchmarks.fused.bank_step_probe``), per
trial and per trial-epoch, and the ceiling it sets: model-steps per second of host work, as a
ratio to the naive DataLoader loop measured in the same run (the baseline of the fused rows; on a
GPU the naive loop is no faster than on a CPU for these tiny models, so the ratio is if anything
an overestimate of what a GPU can reach). Arms: K trials of one shape (hidden 4, batch 8: the
cheapest bank step, all epochs ending together every 4 steps) and 4K cars-space trials through
K slots (refilled as trials end), both without hooks as in gpu_check. Training is tiny so the
run stays short; the host work does not depend on it. The epoch shuffles are drawn as on a GPU
(``Bank.vector_shuffles = True``: ``shuffle.Streams``, vectorised), not by the CPU's randperm per
slot.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.fused import bank_step_probe, cars, mixed_jobs, naive_loop, uniform_jobs
from tuner.bank import Bank
from tuner.fused import Job, train_many
from tuner.train import TrainParams


def host_rows(k_values: list[int], epochs: int, arms: tuple[str, ...] = ("uniform", "mixed")) -> list[dict[str, Any]]:
    """One row per arm and K, measured on one thread (process CPU time counts every intra-op
    thread: on a many-core GPU host the naive loop and the bank steps would read too slow)."""
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rows(k_values, epochs, arms, device)
    finally:
        torch.set_num_threads(threads)


def _rows(k_values: list[int], epochs: int, arms: tuple[str, ...], device: torch.device) -> list[dict[str, Any]]:
    data = cars()
    probe = uniform_jobs(2, 20)
    naive_loop(data, probe[0].params, 0, device)  # warm-up
    start = time.process_time()
    naive_steps = sum(naive_loop(data, j.params, j.seed, device) for j in probe)
    naive = naive_steps / (time.process_time() - start)
    rows = []
    before, Bank.vector_shuffles = Bank.vector_shuffles, True  # as on a GPU
    try:
        for kind in arms:
            for k in k_values:
                if kind == "uniform":
                    jobs = [Job(TrainParams(lr=j.params.lr, epochs=epochs, batch_size=8, hidden_size=4), j.seed)
                            for j in uniform_jobs(k, epochs)]
                else:
                    jobs = mixed_jobs(4 * k, epochs)
                train_many(uniform_jobs(4, 1), data, device=device, width=4)  # warm-up
                with bank_step_probe(device, lambda: "") as cells:
                    start = time.process_time()
                    results = train_many(jobs, data, device=device, width=k)
                    total = time.process_time() - start
                steps = sum(c[1] for c in cells.values())
                host = total - sum(c[2] for c in cells.values())
                trial_epochs = sum(len(r.history) for r in results)
                rows.append({"kind": kind, "K": k, "trials": len(jobs), "total_s": total, "host_s": host,
                             "host_share": host / total, "us_per_trial": host / len(jobs) * 1e6,
                             "us_per_trial_epoch": host / trial_epochs * 1e6, "model_steps": steps,
                             "ceiling": steps / host / naive, "naive": naive})
    finally:
        Bank.vector_shuffles = before
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--arms", nargs="+", choices=["uniform", "mixed"], default=["uniform", "mixed"])
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, CPU, process CPU time, {args.epochs} epochs per trial")
    rows = host_rows(args.k, args.epochs, tuple(args.arms))
    print(f"naive DataLoader loop (baseline): {rows[0]['naive']:.0f} steps/s")
    print(f"{'arm':<9}{'K':>7}{'trials':>8}{'total s':>9}{'host s':>8}{'host %':>8}{'us/trial':>10}"
          f"{'us/trial-epoch':>16}{'ceiling vs naive':>18}")
    for r in rows:
        print(f"{r['kind']:<9}{r['K']:>7}{r['trials']:>8}{r['total_s']:>9.2f}{r['host_s']:>8.2f}{r['host_share']:>8.0%}"
              f"{r['us_per_trial']:>10.0f}{r['us_per_trial_epoch']:>16.1f}{r['ceiling']:>17.0f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
