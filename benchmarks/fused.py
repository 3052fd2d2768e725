"""Fused trials vs one trial at a time, side by side, reported as ratios.

    python benchmarks/fused.py                  # both parts, the cars MLP study with 50 trials
    python benchmarks/fused.py --seeds 3        # three study seeds (each also changes the folds)
    python benchmarks/fused.py --part steps     # model-steps/s only (~1 min)
    python benchmarks/fused.py --part steps --k 64 --bank-steps   # and where the mixed arm's time goes
    python benchmarks/fused.py --part study --storage   # and the study's storage per trial, per arm

Part "study": the cars MLP study (studies/cars_mlp.toml: 5-fold cross-validation, median pruner,
report_every 10), same trial budget and seeds, launched once with execution = "sequential"
(baseline) and once with execution = "fused", each on fresh SQLite stores (Optuna + MLflow).
trials/s is taken over the trial loop (first trial start to last trial end, from Optuna's
timestamps) and over the whole launch, and process CPU time is reported beside them (the ratio to
trust on a shared machine), and with ``--beyond 2`` (the default) the process CPU per trial
beyond a 2-trial launch of the same arm and seed, so start-up and registration cancel out.
Quality guard: the fused study's best validation RMSE must be within 10% of the sequential one's
(or better).

Part "steps": model-steps/s of K small MLPs on the cars data: the naive loop (one model at a
time, torch DataLoader over a TensorDataset, nn.Module + Adam, hidden 16, batch 8; the baseline),
tuner's train() (one model at a time, in-memory batches), and train_many (K at once) on the same
uniform shape, and on shapes drawn from the cars space (also against train() on such shapes), at
10 and 100 epochs per trial (the cars space draws 20-200). Per-process CPU time is used, so the
ratio holds on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tuner.data import Prepared  # noqa: E402
from tuner.fused import Job, train_many  # noqa: E402
from tuner.train import TrainParams, train  # noqa: E402


def cars() -> Prepared:
    from tuner.config import load_spec
    from tuner.inputs import load_data

    return load_data(load_spec(ROOT / "studies" / "cars_mlp.toml"))[0]


# -- part "steps" -------------------------------------------------------------------------


def naive_loop(data: Prepared, params: TrainParams, seed: int, device: torch.device) -> int:
    """The textbook loop: DataLoader(TensorDataset, shuffle=True), nn.Sequential, Adam. Returns steps."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    n_in = data.n_features
    model = nn.Sequential(nn.Linear(n_in, params.hidden_size), nn.ReLU(), nn.Linear(params.hidden_size, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=params.batch_size, shuffle=True)
    steps = 0
    for _ in range(params.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = nn.functional.mse_loss(model(xb).squeeze(-1), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


def uniform_jobs(k: int, epochs: int) -> list[Job]:
    """K trials of one shape (hidden 16, relu, batch 8) with their own lr and seed."""
    return [Job(TrainParams(lr=10 ** (-3 + 2 * i / max(k - 1, 1)), epochs=epochs, batch_size=8, hidden_size=16), i)
            for i in range(k)]


def mixed_jobs(k: int, epochs: int, seed: int = 0) -> list[Job]:
    """K trials drawn from the cars MLP space (widths 2-64, depths 1-3, five activations)."""
    rng = random.Random(seed)
    return [
        Job(
            TrainParams(
                lr=10 ** rng.uniform(-3, -0.5),
                epochs=epochs,
                batch_size=rng.choice([4, 8, 16, 32]),
                hidden_size=int(round(2 ** rng.uniform(1, 6))),
                activation=rng.choice(["relu", "tanh", "sigmoid", "gelu", "leaky_relu"]),
                n_layers=rng.randint(1, 3),
                weight_decay=10 ** rng.uniform(-6, -1),
            ),
            i,
        )
        for i in range(k)
    ]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()  # the GPU works while the process waits: wall time
    return time.process_time()


def steps_per_second(
    data: Prepared, device: torch.device, k_values: list[int], epochs: int = 10, n_sequential: int = 4
) -> list[dict[str, Any]]:
    """Rows of (arm, K, model-steps/s, ratio to the naive loop).

    The naive loop is measured again right before and after each train_many arm, and that arm's
    ratio is to the mean of those two: on a shared machine the load drifts within a run.
    """
    host, data = data, data.to(device)  # the naive loop batches host tensors, as the tutorials do
    rows: list[dict[str, Any]] = []
    jobs = uniform_jobs(n_sequential, epochs)
    naive_loop(host, jobs[0].params, 0, device)  # warm-up

    def naive_rate() -> float:
        start = _clock(device)
        steps = sum(naive_loop(host, j.params, j.seed, device) for j in jobs)
        return steps / (_clock(device) - start)

    naive = naive_rate()
    rows.append({"arm": "naive DataLoader loop (baseline)", "K": 1, "steps_s": naive, "naive": naive})
    start = _clock(device)
    steps = sum(train(j.params, data, device=device, seed=j.seed).n_steps for j in jobs)
    rows.append({"arm": "train(), one at a time", "K": 1, "steps_s": steps / (_clock(device) - start)})
    same = {"uniform": rows[-1]["steps_s"]}
    mixed = mixed_jobs(2 * n_sequential, epochs, seed=1)
    start = _clock(device)
    steps = sum(train(j.params, data, device=device, seed=j.seed).n_steps for j in mixed)
    same["mixed"] = steps / (_clock(device) - start)
    rows.append({"arm": "train(), one at a time, mixed shapes", "K": 1, "steps_s": same["mixed"]})
    for kind, make in (("uniform", uniform_jobs), ("mixed", mixed_jobs)):
        for k in k_values:
            # Mixed: 4K jobs through K slots, refilled as trials end (as in a study); without
            # refill the slots of short trials would idle until the longest one ends.
            jobs_k = make(k if kind == "uniform" else 4 * k, epochs)
            train_many(make(min(k, 4), 1), data, device=device, width=k)  # warm-up
            before = naive_rate()
            start = _clock(device)
            results = train_many(jobs_k, data, device=device, width=k)
            elapsed = _clock(device) - start
            beside = (before + naive_rate()) / 2
            arm = f"train_many, {kind} shapes" + (", refill" if kind == "mixed" else "")
            steps_s = sum(r.n_steps for r in results) / elapsed
            rows.append({"arm": arm, "K": k, "steps_s": steps_s, "vs_train": steps_s / same[kind], "naive": beside})
    for row in rows:
        row["ratio"] = row["steps_s"] / row.get("naive", naive)
    return rows


@contextmanager
def bank_step_probe(device: torch.device, phase: Callable[[], str]) -> Iterator[dict[tuple[str, int], list[float]]]:
    """Time every bank step while the context is open: ``{(phase(), bank's group): [bank steps,
    model-steps, process CPU seconds]}``, the group being train_many's key (the width group, or
    1: one bank for all widths). Bank.__init__, begin_step and end_step are wrapped meanwhile (no
    tuner code changes)."""
    from collections import defaultdict

    from tuner.bank import Bank

    cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    init, begin, end = Bank.__init__, Bank.begin_step, Bank.end_step

    def labelled_init(bank: Bank, *args: Any, width: int, **kwargs: Any) -> None:
        init(bank, *args, width=width, **kwargs)
        bank._bench_group = width  # type: ignore[attr-defined]

    def timed_begin(bank: Bank, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        bank._bench_t0 = _clock(device)  # type: ignore[attr-defined]
        return begin(bank, extra)

    def timed_end(bank: Bank) -> None:
        n = int(bank.host["live"].sum())
        end(bank)
        cell = cells[(phase(), bank._bench_group)]  # type: ignore[attr-defined]
        cell[0] += 1
        cell[1] += n
        cell[2] += _clock(device) - bank._bench_t0  # type: ignore[attr-defined]

    Bank.__init__, Bank.begin_step, Bank.end_step = labelled_init, timed_begin, timed_end  # type: ignore[method-assign, assignment]
    try:
        yield cells
    finally:
        Bank.__init__, Bank.begin_step, Bank.end_step = init, begin, end  # type: ignore[method-assign, assignment]


def bank_rows(cells: dict[tuple[str, int], list[float]], total: float) -> list[dict[str, Any]]:
    """``bank_step_probe``'s cells as rows with their shares of the model-steps and of ``total``
    seconds, and a last row for the time outside the bank steps."""
    model_steps = max(sum(c[1] for c in cells.values()), 1)
    rows = [{"phase": phase, "width": width, "steps": c[0], "model_steps": c[1], "share_ms": c[1] / model_steps,
             "seconds": c[2], "share_time": c[2] / total, "us_per_step": c[2] / c[0] * 1e6}
            for (phase, width), c in sorted(cells.items(), key=lambda kv: (kv[0][0] != "jobs arriving", kv[0][1]))]
    rest = total - sum(c[2] for c in cells.values())
    rows.append({"phase": "outside bank steps", "width": 0, "steps": 0, "model_steps": 0, "share_ms": 0.0,
                 "seconds": rest, "share_time": rest / total, "us_per_step": 0.0})
    return rows


def print_bank_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if not row["steps"]:
            print(f"    {row['phase']:<42} {row['seconds']:6.2f}s ({row['share_time']:4.0%} of the time)")
            continue
        bank = f"bank of widths <= {row['width']:<3}" if row["width"] > 1 else "one bank, all widths"
        print(f"    {row['phase']:<19} {bank:<22} {row['steps']:>6} bank steps "
              f"{row['model_steps']:>7} model-steps ({row['share_ms']:4.0%})  {row['seconds']:6.2f}s "
              f"({row['share_time']:4.0%} of the time)  {row['us_per_step']:6.0f} us/bank step", flush=True)


def bank_steps(data: Prepared, device: torch.device, k: int, epochs: int) -> list[dict[str, Any]]:
    """Where the mixed arm's time goes: its bank steps by width bank and by phase (while jobs
    still arrive, and after the last one, when the slots drain), with their model-steps and
    process CPU time; the rest of the arm is starting, validating and freezing trials."""
    data = data.to(device)
    drained = [False]

    def stream() -> Iterator[Job]:
        yield from mixed_jobs(4 * k, epochs)
        drained[0] = True

    train_many(mixed_jobs(min(k, 4), 1), data, device=device, width=k)  # warm-up
    with bank_step_probe(device, lambda: "after the last job" if drained[0] else "jobs arriving") as cells:
        start = _clock(device)
        train_many(stream(), data, device=device, width=k)
        total = _clock(device) - start
    return bank_rows(cells, total)


# -- part "study" -------------------------------------------------------------------------


def run_study(execution: str, n_trials: int, folder: Path, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    import io
    from contextlib import redirect_stderr

    from tuner.config import load_spec
    from tuner.session import launch
    from tuner.study import open_study

    spec = load_spec(
        ROOT / "studies" / "cars_mlp.toml",
        n_trials=n_trials,
        execution=execution,
        seed=seed,
        device=device,
        storage=f"sqlite:///{folder / 'optuna.db'}",
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
    )
    cpu = time.process_time()
    err = io.StringIO()
    with redirect_stderr(err):
        summary = launch(spec, progress=False, promote=False)
    cpu = time.process_time() - cpu
    trials = open_study(spec, create=False).trials
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    loop = (max(ends) - min(starts)).total_seconds()
    states = [t.state.name for t in trials]
    values = sorted(t.value for t in trials if t.state.name == "COMPLETE" and t.value is not None)
    return {
        "execution": execution,
        "seed": seed,
        "top5": sum(values[:5]) / max(len(values[:5]), 1),
        "chosen": next((line for line in err.getvalue().splitlines() if line.startswith("execution:")), ""),
        "trials": len(trials),
        "pruned": states.count("PRUNED"),
        "loop_s": loop,
        "launch_s": summary.wall_seconds,
        "cpu_s": cpu,
        "best": summary.best_metrics.get("rmse", math.nan),
        "best_trial": summary.best_number,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["study", "steps", "both"], default="both")
    ap.add_argument("--n-trials", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=1, help="study seeds 0..N-1 (each also changes the split)")
    ap.add_argument("--beyond", type=int, default=2,
                    help="part study: also launch this many trials per arm and seed, and report the process CPU "
                         "per trial beyond that launch (start-up and registration cancel out); 0: skip")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 256], help="K values of part steps")
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 100],
                    help="epochs per trial in part steps (the cars space draws 20-200)")
    ap.add_argument("--storage", action="store_true",
                    help="part study: also launch each arm and seed once more with the storage probe "
                         "(benchmarks._arms.storage_probe) and print its statements and ms per trial")
    ap.add_argument("--bank-steps", action="store_true",
                    help="break the mixed arm (part steps) and a fused launch (part study) down by width bank "
                         "(and phase): where the time goes")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as launch() does for tiny models on CPU
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s)")
    for epochs in args.epochs if args.part in ("steps", "both") else []:
        print(f"\nmodel-steps/s (per-process CPU time), cars data, {epochs} epochs per trial:")
        for row in steps_per_second(cars(), device, args.k, epochs=epochs):
            vs = f"  {row['vs_train']:5.1f}x vs train() on the same shapes" if "vs_train" in row else ""
            print(f"  {row['arm']:<36} K={row['K']:<4} {row['steps_s']:>10.0f} steps/s  {row['ratio']:6.1f}x{vs}"
                  + (f"  (naive beside it: {row['naive']:.0f} steps/s)" if "naive" in row else ""), flush=True)
        for k in args.k if args.bank_steps else []:
            print(f"  where the mixed arm's time goes, K={k} ({4 * k} jobs), per-process CPU time:")
            print_bank_rows(bank_steps(cars(), device, k, epochs))
    if args.part in ("study", "both"):
        print(f"\ncars MLP study, {args.n_trials} trials, seeds 0-{args.seeds - 1}, fresh SQLite stores per run:")
        runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "fused": []}
        for execution in runs:  # warm-up: the first launch in a process pays for lazy imports
            with tempfile.TemporaryDirectory() as tmp:
                run_study(execution, 1, Path(tmp), 0)
        for seed in range(args.seeds):
            for execution in ("sequential", "fused"):
                with tempfile.TemporaryDirectory() as tmp:
                    r = run_study(execution, args.n_trials, Path(tmp), seed)
                if 0 < args.beyond < args.n_trials:
                    with tempfile.TemporaryDirectory() as tmp:
                        short = run_study(execution, args.beyond, Path(tmp), seed)
                    r["per_trial_beyond"] = (r["cpu_s"] - short["cpu_s"]) / (args.n_trials - args.beyond)
                if args.bank_steps and execution == "fused":  # a launch of its own, as the storage probe's
                    with tempfile.TemporaryDirectory() as tmp, bank_step_probe(device, lambda: "the study") as cells:
                        probed = run_study(execution, args.n_trials, Path(tmp), seed)
                    r["bank_rows"] = bank_rows(cells, probed["cpu_s"])
                if args.storage:  # a launch of its own: the probe's wrappers cost CPU time
                    from benchmarks._arms import per_method, per_trial, storage_probe

                    with tempfile.TemporaryDirectory() as tmp, storage_probe() as counts:
                        run_study(execution, args.n_trials, Path(tmp), seed)
                    r["storage"], r["methods"] = per_trial(counts), per_method(counts)
                runs[execution].append(r)
                print(
                    f"  seed {seed} {r['execution']:<10} loop {r['loop_s']:6.1f}s "
                    f"({r['trials'] / r['loop_s']:.2f} trials/s)  launch {r['launch_s']:6.1f}s  cpu {r['cpu_s']:6.1f}s  "
                    f"pruned {r['pruned']:>2}  best rmse {r['best']:.3f} (trial {r['best_trial']})  "
                    f"mean of 5 best {r['top5']:.3f}",
                    flush=True,
                )
                if "per_trial_beyond" in r:
                    print(f"    process CPU per trial beyond a {args.beyond}-trial launch: {r['per_trial_beyond'] * 1000:.0f} ms")
                if "bank_rows" in r:
                    print("    where a fused launch's time goes (a probed launch; per-process CPU time):")
                    print_bank_rows(r["bank_rows"])
                if "storage" in r:
                    st = r["storage"]
                    print(f"    storage per trial (a probed launch): {st['optuna_sql']:.1f} Optuna + {st['mlflow_sql']:.1f} "
                          f"MLflow statements, {st['storage_ms']:.1f} ms ({st['storage_cpu_ms']:.1f} ms CPU); "
                          + ", ".join(f"{name} {calls:.2f} calls {ms:.1f} ms" for name, calls, ms, _, _ in r["methods"][:4]))
                if r["chosen"]:
                    print(f"    {r['chosen']}")

        def total(execution: str, key: str) -> float:
            return sum(r[key] for r in runs[execution])

        n = args.n_trials * args.seeds
        ratio = (n / total("fused", "loop_s")) / (n / total("sequential", "loop_s"))
        print(f"  fused / sequential trials/s over the trial loops: {ratio:.1f}x; launch wall "
              f"{total('sequential', 'launch_s') / total('fused', 'launch_s'):.1f}x; "
              f"process CPU {total('sequential', 'cpu_s') / total('fused', 'cpu_s'):.1f}x")
        if 0 < args.beyond < args.n_trials:
            ratios = [s["per_trial_beyond"] / f["per_trial_beyond"] for s, f in zip(runs["sequential"], runs["fused"])]
            print(f"  process CPU per trial beyond a {args.beyond}-trial launch, sequential / fused: "
                  + ", ".join(f"{x:.1f}x (seed {i})" for i, x in enumerate(ratios))
                  + f"; over all seeds {total('sequential', 'per_trial_beyond') / total('fused', 'per_trial_beyond'):.1f}x")
        seq_best, fused_best = total("sequential", "best") / args.seeds, total("fused", "best") / args.seeds
        guard = fused_best <= seq_best * 1.10
        print(f"  quality guard: mean best rmse fused {fused_best:.3f} vs sequential {seq_best:.3f} "
              f"(must be within 10%): {'PASS' if guard else 'FAIL'}; mean of 5 best: "
              f"{total('fused', 'top5') / args.seeds:.3f} vs {total('sequential', 'top5') / args.seeds:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
