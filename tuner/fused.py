"""Fused trials: ``train_many()`` trains K small models at once as one batched model on one device.

A tiny MLP step is almost all Python and kernel-launch overhead, so the trials are trained as
stacked tensors (a ``Bank``, see ``bank.py``: per-trial learning rate, optimizer state, hidden
size, depth, activation, batch size, epoch count and shuffled order). With the same params and
seed a trial sees the same initial weights, batches and schedule as in ``train()``, so its
per-epoch validation metrics are the same to float32 rounding, and the same ``on_epoch_end``
decision stops it at the same epoch.

This module holds the jobs (``Job``, ``fusable``), the loop that feeds the banks, and the epoch
events: validate, report, stop or go on, and freeze a finished trial into a ``TabularNet``. A
finished or stopped trial's slot is refilled from the next job, pulled lazily from
``params_list`` (a study's ask), so the batch stays full. A slot's validation rows ride in the
bank's next training forward, which runs on the weights its epoch left; its epoch is reported
between that forward and the update, and a trial that ends there is kept out of the update (an
epoch ends every step or few on small tables, and a forward of the whole bank per event was a
third of the time).

Like ``train.py`` this module imports torch only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from tuner.bank import Bank, Job
from tuner.banklayout import ACTIVATIONS, layer_views, upload
from tuner.data import Prepared
from tuner.model import ModelConfig, TabularNet, make_activation
from tuner.train import Deferred, TrainParams, TrainResult, epoch_record, history_keys, model_config, output_metrics, resolve_device

__all__ = ["Job", "train_many", "ManyEpochHook", "TrialEndHook", "fusable", "group_floor", "width_group"]


# Called after each epoch of each trial with (job index, epoch, metrics); True stops that trial.
ManyEpochHook = Callable[[int, int, dict[str, float]], bool]
# Called once per trial, as soon as it finished or stopped, with (job index, result).
TrialEndHook = Callable[[int, TrainResult], None]


def fusable(params: TrainParams) -> str | None:
    """Why ``train_many`` cannot reproduce ``train()`` for these params, or None if it can."""
    if params.dropout > 0:
        return f"dropout={params.dropout:g} (dropout masks cannot follow train()'s random stream)"
    return None


def _as_job(item: Job | TrainParams | Mapping[str, Any]) -> Job:
    if isinstance(item, Job):
        job = item
    elif isinstance(item, TrainParams):
        job = Job(item)
    else:
        job = Job(TrainParams.from_mapping(item))
    reason = fusable(job.params)
    if reason:
        raise ValueError(f"train_many cannot fuse a trial with {reason}; train it with train()")
    return job


@dataclass(frozen=True)
class _Validation:
    """Every split's validation rows padded to the longest split (padded rows are masked out of
    the metrics), and the target scaling the metrics are reported in."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    padded: bool
    y_mean: torch.Tensor
    y_std: torch.Tensor

    @classmethod
    def of(cls, datasets: list[Prepared], device: torch.device) -> _Validation:
        data = datasets[0]
        v_max = max(len(d.x_val) for d in datasets)
        x = torch.zeros(len(datasets), v_max, data.n_features, device=device)
        y = torch.zeros(len(datasets), v_max, dtype=data.y_val_raw.dtype, device=device)
        mask = torch.zeros(len(datasets), v_max, dtype=torch.bool, device=device)
        for i, d in enumerate(datasets):
            x[i, : len(d.x_val)] = d.x_val
            y[i, : len(d.x_val)] = d.y_val_raw
            mask[i, : len(d.x_val)] = True
        y_mean = torch.tensor([d.y_mean_ for d in datasets], dtype=torch.float32, device=device)
        y_std = torch.tensor([d.y_std_ for d in datasets], dtype=torch.float32, device=device)
        return cls(x, y, mask, not bool(mask.all()), y_mean, y_std)


def _validation_rows(bank: Bank, val: _Validation) -> torch.Tensor:
    """Every used slot's validation inputs ``(n_used, v, n_in)`` (row i of slot k: row i of its split's
    ``x_val``, padded past its split's length), to ride in the bank's next training forward."""
    if len(bank.datasets) == 1:
        return val.x.expand(bank.n_used, *val.x.shape[1:])
    return val.x.index_select(0, bank.used["ds"])


@torch.no_grad()
def _metrics(bank: Bank, val: _Validation, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Metrics ``(len(index), 3)`` of slots ``index`` from their validation outputs ``out``
    (``(K, v)`` standardised, or ``(K, v, classes)`` logits: ``out[k]`` is slot k's predictions
    of its split's validation rows after the epoch)."""
    out = out.index_select(0, index)
    if len(bank.datasets) == 1:
        return output_metrics(out, val.y[0], bank.task, val.y_mean[0], val.y_std[0])[1]
    ds = bank.tensors["ds"].index_select(0, index)
    mean, std = val.y_mean.index_select(0, ds)[:, None], val.y_std.index_select(0, ds)[:, None]
    if bank.task != "regression":
        mean, std = mean[:, :, None], std[:, :, None]
    mask = val.mask.index_select(0, ds) if val.padded else None
    return output_metrics(out, val.y.index_select(0, ds), bank.task, mean, std, mask)[1]


def _events(
    bank: Bank,
    val: _Validation,
    out: torch.Tensor,
    ending: list[int],
    on_epoch_end: ManyEpochHook | None,
    should_stop: Callable[[int], bool] | None = None,
) -> list[tuple[int, str | None, bool]]:
    """Close the epoch of slots ``ending`` (their epoch ended with the previous step; ``out``:
    every slot's validation outputs from this step's forward, i.e. with the weights that epoch
    left): record, report, and stop or go on. Returns ``(slot, stop reason, diverged)`` of the
    slots whose trial ends here (kept out of this step's update: ``_finish`` them after it).

    The history rows, the divergence check and the last-epoch check are array operations over
    the ending slots (at large K thousands of epochs end per step: no Python per slot-epoch); the
    hooks, when given, run per slot: every ending slot's hook first, then ``should_stop(index)``
    for each of them, so a decision that needs several slots' epochs (the folds of a
    cross-validated trial) stops all of them at this same epoch.
    """
    T, h = bank.tensors, bank.host
    ks = np.asarray(ending)
    index = upload(ks, bank.device, torch.long)
    # The ending slots' train loss and metrics, to the host in one copy (one sync).
    table = torch.cat([T["ended_loss"][index][:, None], _metrics(bank, val, out, index)], 1).cpu().numpy().astype(np.float64)
    loss, metrics = table[:, 0], table[:, 1:]
    epochs, jobs = h["ended"][ks], h["job"][ks]
    ok = np.asarray(np.isfinite(table).all(1))
    with np.errstate(invalid="ignore"):  # train() computes the same: math.sqrt(loss) * y_std
        train_column = np.sqrt(loss) * bank.y_std[h["ds"][ks]] if bank.task == "regression" else loss
    rows = np.column_stack([metrics, train_column])
    bank.record(ks[ok], rows[ok])
    names = history_keys(bank.task)
    reasons: dict[int, str | None] = {}
    for i in np.flatnonzero(~ok).tolist():  # diverged: epoch_record words why
        p = bank.slots[ks[i]].job.params  # type: ignore[union-attr]
        reasons[i] = epoch_record(int(epochs[i]), float(loss[i]), dict(zip(names[:-1], metrics[i].tolist())),
                                  task=bank.task, y_std=1.0, lr=p.lr)[1]
    if on_epoch_end is not None:
        for i in np.flatnonzero(ok).tolist():
            if on_epoch_end(int(jobs[i]), int(epochs[i]), dict(zip(names, rows[i].tolist()))):
                reasons[i] = f"stopped by the epoch hook after epoch {epochs[i]}"
    if should_stop is not None:
        for i in range(len(ks)):
            if i not in reasons and should_stop(int(jobs[i])):
                reasons[i] = f"stopped by the epoch hook after epoch {epochs[i]}"
    last = epochs + 1 == h["epochs"][ks]
    last[list(reasons)] = True
    diverged = ~ok
    ends = [(int(ks[i]), reasons.get(i), bool(diverged[i])) for i in np.flatnonzero(last).tolist()]
    h["ended"][ks] = -1
    bank.stop([k for k, _, _ in ends])
    return ends


def _net_from_row(row: torch.Tensor, layout: tuple[int, int, int, int], config: ModelConfig, data: Prepared) -> TabularNet:
    """A frozen slot's ``TabularNet``: its weights from ``row`` (the slot's flat parameters in a
    bank laid out as ``layout``: inputs, outputs, width, depth), its split's scaling."""
    # Built where the weights are, so the copies stay on the device (not a sync per tensor there
    # and back); on the CPU without the device context, which costs ~60 us.
    with torch.device(row.device) if row.device.type != "cpu" else contextlib.nullcontext():
        net = TabularNet(config)
    views = layer_views(row[None], *layout)
    linears = [m for m in net.core.modules() if isinstance(m, torch.nn.Linear)]
    names = [f"w{i}" for i in range(len(linears) - 1)] + ["wout"]
    with torch.no_grad():
        for name, lin in zip(names, linears):
            bias = "bout" if name == "wout" else "b" + name[1:]
            rows, cols = lin.weight.shape[1], lin.weight.shape[0]
            lin.weight.copy_(views[name][0, :rows, :cols].T)
            lin.bias.copy_(views[bias][0, 0, :cols])
    net.set_scaling(data.x_mean_, data.x_std_, data.y_mean_, data.y_std_)
    return net.eval()


def _history_rows(names: tuple[str, ...], rows: np.ndarray) -> list[dict[str, float]]:
    return [dict(zip(names, row)) for row in rows.tolist()]


def _finish(bank: Bank, ends: list[tuple[int, str | None, bool]]) -> list[tuple[int, TrainResult]]:
    """Freeze slots ``ends`` (slot, stop reason, diverged) into ``(job index, TrainResult)``, and
    free them. A result's model (when its job keeps one) and history are built on first access
    (``Deferred``) from copies of its slot's rows taken here: the weights of all of them in one
    copy on the device, the history rows in one on the host."""
    ks = [k for k, _, _ in ends]
    slots = [bank.slots[k] for k in ks]
    h = bank.host
    keep = [k for k, s in zip(ks, slots) if s.job.keep_model]  # type: ignore[union-attr]
    weights: Iterator[torch.Tensor] = iter(bank.tensors["flat"].index_select(0, upload(keep, bank.device, torch.long)) if keep else [])
    layout = (bank.n_in, bank.n_out, bank.H, bank.L)
    history, n_hist, n_steps = h["hist"][ks], h["n_hist"][ks].tolist(), h["step"][ks].tolist()
    names = history_keys(bank.task)
    now = time.perf_counter()
    finished = []
    for i, (slot, (_, reason, diverged)) in enumerate(zip(slots, ends)):
        assert slot is not None
        rows = history[i, : n_hist[i]]
        model = Deferred(partial(_net_from_row, next(weights), layout, slot.config, slot.data)) if slot.job.keep_model else None
        result = TrainResult(
            model=model,  # type: ignore[arg-type]
            history=Deferred(partial(_history_rows, names, rows)),  # type: ignore[arg-type]
            metrics=dict(zip(names, rows[-1].tolist())) if len(rows) else {},
            stop_reason=reason,
            diverged=diverged,
            n_steps=int(n_steps[i]),
            seconds=now - slot.start,
        )
        finished.append((slot.index, result))
    bank.free(ks)
    return finished


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks of a few MB instead of handing them back to the OS.

    Every CPU step allocates and frees activations and gradients of ~1 MB; past glibc's mmap
    threshold each one is a fresh mmap whose pages fault in on first touch, which measured ~30% of
    a fused step (``benchmarks/fused.py --part steps``). The same effect as running under jemalloc
    or with ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``, set once per process; a no-op
    elsewhere (macOS, musl, Windows).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD: keep up to 256 MB of freed heap
    except (OSError, AttributeError):
        pass


def width_group(hidden_size: int, floor: int = 32) -> int:
    """The width of the group a hidden size trains in: the next power of two, so padding never
    wastes more than half of a layer's units (weights and optimizer state scale with it), and
    all sizes up to ``floor`` in one group (below it a bank step's fixed cost outweighs the
    padded arithmetic; see ``group_floor``)."""
    return max(floor, 1 << max(hidden_size - 1, 0).bit_length()) if hidden_size > 0 else 0


def group_floor(width: int) -> int:
    """The narrowest width group for ``width`` slots on a CPU: 16 from 256 slots, else 32.

    Each bank step costs ~0.7 ms fixed plus its padded arithmetic, and a slot pays for the
    widest trial of its bank: more groups pay off only with enough slots per bank. Measured on
    the cars space (docs/performance.md, "Fused trials"): at K=64 a floor of 32 ran 1.05-1.1x
    the model-steps/s of 16, 1.3x that of 8 and 1.15-1.3x that of one bank padded to 64; at
    K=128 the two were even; at K=256 16 ran 1.09x (10 epochs) and 1.24x (100 epochs) the
    model-steps/s of 32, at K=512 1.16x (and 1.10x that of 8)."""
    return 16 if width >= 256 else 32


def train_many(
    params_list: Iterable[Job | TrainParams | Mapping[str, Any]],
    prepared: Prepared | Sequence[Prepared],
    *,
    device: torch.device | str = "auto",
    on_epoch_end: ManyEpochHook | None = None,
    on_trial_end: TrialEndHook | None = None,
    should_stop: Callable[[int], bool] | None = None,
    width: int = 32,
    group_widths: bool | None = None,
) -> list[TrainResult]:
    """Train many trials as batched models, ``width`` at a time, each as ``train()`` would.

    Args:
        params_list: jobs (params with a seed), params, or mappings of params (seed 0). Pulled
            lazily: a slot that frees up takes the next one, so an iterator may ask a study for
            the next trial only when there is room for it.
        prepared: the prepared split, or several (the folds of a cross-validation: a job trains
            on ``prepared[job.data]``; same features and task); moved to ``device`` once.
        device: ``auto``, ``cpu``, ``cuda[:i]`` or ``mps``.
        on_epoch_end: called with ``(index, epoch, metrics)`` after each epoch of each trial
            (``index`` counts the jobs from 0); returning True stops that trial.
        on_trial_end: called with ``(index, result)`` as soon as a trial finished or stopped,
            before its slot is refilled.
        should_stop: asked with ``index`` after the hooks of all the trials whose epoch ends
            at the same step ran; True stops that trial there too (see ``_events``).
        width: how many trials train at once.
        group_widths: train hidden sizes in power-of-two width groups from 32 up, or from 16
            with 256 slots or more (``group_floor``; one bank per group: padding wastes at most
            half a layer) instead of one bank padded to the widest. ``None``: group on a CPU
            from width 32 up, where the padded arithmetic is most of a step (measured on the
            cars space, 100 epochs: K=64 1.1x, K=256 1.3x faster grouped; K=16 1.2x slower, a
            few slots per bank step); never on a GPU, where the arithmetic is cheap and each
            bank step costs kernel launches.

    Returns:
        One TrainResult per job, in job order, as ``train()`` returns it.

    Raises:
        ValueError: a job that cannot be fused (see ``fusable``) or a bad parameter.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1 (got {width})")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    datasets = [d.to(dev) for d in ([prepared] if isinstance(prepared, Prepared) else prepared)]
    if dev.type == "cpu":
        _keep_freed_memory()
    if group_widths is None:
        group_widths = dev.type == "cpu" and width >= 32
    floor = group_floor(width)
    jobs = iter(params_list)
    banks: dict[tuple[bool, bool, int], tuple[Bank, _Validation]] = {}  # each bank, its validation rows
    results: dict[int, TrainResult] = {}
    in_flight = 0
    n_jobs = 0

    def fill() -> None:
        """Pull jobs until ``width`` are in flight; start them in one batch per bank."""
        nonlocal in_flight, n_jobs
        pending: dict[tuple[bool, bool, int], list[tuple[int, Job, ModelConfig]]] = {}
        while in_flight < width:
            item = next(jobs, None)
            if item is None:
                break
            job = _as_job(item)
            p = job.params
            if not 0 <= job.data < len(datasets):
                raise ValueError(f"job {n_jobs} trains on split {job.data}, but {len(datasets)} split(s) were given")
            config = model_config(p, datasets[job.data])
            if p.activation not in ACTIVATIONS:
                make_activation(p.activation)  # an unknown activation fails here, as in train()
            group = width_group(p.hidden_size, floor) if group_widths else int(p.hidden_size > 0)
            key = (p.hidden_size == 0, p.optimizer == "sgd", group)
            pending.setdefault(key, []).append((n_jobs, job, config))
            n_jobs += 1
            in_flight += 1
        for key, items in pending.items():
            if key not in banks:
                banks[key] = (Bank(datasets, dev, linear=key[0], sgd=key[1], width=key[2]), _Validation.of(datasets, dev))
            banks[key][0].add_many(items)

    fill()
    while in_flight:
        for bank, val in list(banks.values()):
            if not bank.n_live:
                continue
            # A slot whose epoch ended with the previous step is validated in this step's forward
            # (its validation rows ride with the batch, before the update) and reported before
            # the update, which leaves the slots whose trial ends there as they are.
            ending = bank.awaiting()
            out = bank.begin_step(_validation_rows(bank, val) if ending else None)
            ends = _events(bank, val, out, ending, on_epoch_end, should_stop) if out is not None else []
            bank.end_step()
            finished = _finish(bank, ends) if ends else []
            bank.end_epochs()
            if not finished:
                continue
            bank.refresh()
            for index, result in finished:
                results[index] = result
                in_flight -= 1
                if on_trial_end is not None:
                    on_trial_end(index, result)
            fill()
    return [results[i] for i in range(n_jobs)]
