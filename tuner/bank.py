"""The batched model behind ``train_many``: K trials of one shape family as stacked tensors.

A ``Bank`` keeps each trial's weights, optimizer state, learning rate and schedule, hidden size
and depth (padded; a missing layer is skipped per slot), activation, batch size and shuffled
order in one slot (``Slot``, trained from a ``Job``), and runs one forward/backward (written out
in ``bankmath.py``) and one batched optimizer step for all of them; the epoch shuffles come from
``shuffle.py``. A step is two halves (``begin_step``: the forward, which also carries extra
rows such as the validation rows of the slots whose epoch just ended; ``end_step``: backward and
update), so a trial's epoch can be reported and stopped between them. Reporting, stopping and
freezing a trial into a ``TabularNet`` live in ``fused.py``.

Torch and numpy only (no Optuna, no MLflow), like ``train.py``'s torch only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tuner.bankmath import LayerMask, Tape, activation_runs, backward, forward, layer_mask, loss_and_grad, step_scalars, update
from tuner.data import Prepared
from tuner.model import ModelConfig, initial_weights
from tuner.shuffle import MAX_ROWS, Streams
from tuner.train import TrainParams

__all__ = ["Bank", "Job", "Slot"]



@dataclass(frozen=True)
class Job:
    """One trial for ``train_many``: its params, the seed ``train()`` would get, which of the
    prepared splits it trains on (a cross-validation fold), and whether its model is wanted
    (a fold of a cross-validated trial only reports metrics)."""

    params: TrainParams
    seed: int = 0
    data: int = 0
    keep_model: bool = True


@dataclass
class Slot:
    """Host-side state of one trial in a bank."""

    index: int
    job: Job
    config: ModelConfig
    data: Prepared
    generator: torch.Generator | None  # None: shuffled by the bank's Streams
    batch_size: int
    steps_per_epoch: int
    epoch: int = 0  # the epoch it trains (when it ends, and which ended: Bank.host's "end_t", "ended")
    start: float = 0.0
    history: list[dict[str, float]] | None = None


class Bank:
    """K trials of one shape family (MLP or linear; Adam-like or SGD) as stacked tensors.

    Parameters live in one flat ``(K, P)`` leaf: per-layer weights are views of it, so the
    backward pass fills one gradient tensor and the optimizer update is a handful of ops.
    """

    # Epoch shuffles through shuffle.Streams (True) or one torch generator per slot (False);
    # None: Streams on a device other than the CPU. Same permutations either way. On the CPU
    # an epoch event ends a few slots at a time, and there a randperm per slot (~5 us) is
    # cheaper than Streams' ~25 vectorised numpy rounds (~0.6 ms at 8-64 slots, 26 rows);
    # Streams pays off where each randperm would be a host-to-device copy.
    vector_shuffles: bool | None = None

    def __init__(
        self, datasets: list[Prepared], device: torch.device, *, linear: bool, sgd: bool, width: int
    ) -> None:
        data = datasets[0]
        self.datasets, self.device, self.linear, self.sgd = datasets, device, linear, sgd
        self.n_in, self.n_out = data.n_features, data.n_outputs
        self.task = data.task
        self.K, self.H, self.L = 0, 0, 0
        self.slots: list[Slot | None] = []
        self.t = 0
        self.next_event = -1
        self._half: tuple[Tape, torch.Tensor, torch.Tensor] | None = None  # begin_step's, for end_step
        self.grad = torch.zeros(0, device=device)  # the used slots' gradient block (see _cache_views)
        # Every split's training rows in one table (a slot reads its own at an offset).
        sizes = [len(d.x_train) for d in datasets]
        self.n = max(sizes)
        self.sizes = torch.tensor(sizes, device=device)
        self.offsets = torch.tensor(np.cumsum([0, *sizes[:-1]]), device=device)
        self.x_all = torch.cat([d.x_train for d in datasets]) if len(datasets) > 1 else data.x_train
        self.y_all = torch.cat([d.y_train for d in datasets]) if len(datasets) > 1 else data.y_train
        # Per split, the cross-entropy class weights (class_weight = "balanced"), or None.
        self.class_weight = (
            torch.tensor([d.class_weight_ for d in datasets], dtype=torch.float32, device=device)
            if data.class_weight_ else None
        )
        self.tensors: dict[str, torch.Tensor] = {}
        self.act_key: tuple[str | None, ...] = ()
        self.runs: list[tuple[str, int]] = [("relu", 1)]  # activation, its run of slots
        self.layer_on: list[LayerMask | None] = []  # per layer: which slots have it, None: all
        self.any_wd_l2 = self.any_wd_dec = self.mask_grad = False
        # Per-slot scalars the host knows (schedule, step counts): computed in numpy, one copy per step.
        self.host: dict[str, np.ndarray] = {}
        self.arange = torch.arange(self.n, device=device)
        # Every slot's epoch shuffles, vectorised on the host (see shuffle.py) for a device other
        # than the CPU; on the CPU, and for longer splits, one torch generator per slot.
        vector = self.vector_shuffles if self.vector_shuffles is not None else device.type != "cpu"
        self.streams = Streams(self.n) if vector and self.n <= MAX_ROWS else None
        self.b_max = 1
        self._resize(1, 0 if linear else width, 0 if linear else 1)

    # -- layout ---------------------------------------------------------------------------

    def _layout(self, H: int, L: int) -> list[tuple[str, int, int]]:
        shapes: list[tuple[str, int, int]] = []
        width = self.n_in
        for layer in range(L):
            shapes += [(f"w{layer}", width, H), (f"b{layer}", 1, H)]
            width = H
        return shapes + [("wout", width, self.n_out), ("bout", 1, self.n_out)]

    def views(self, flat: torch.Tensor, H: int | None = None, L: int | None = None) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, rows, cols in self._layout(self.H if H is None else H, self.L if L is None else L):
            views[name] = flat[:, offset : offset + rows * cols].view(flat.shape[0], rows, cols)
            offset += rows * cols
        return views

    def _resize(self, K: int, H: int, L: int, keep: list[int] | None = None) -> None:
        """Re-lay the bank out as K slots of width H and depth L, keeping every slot's weights and
        optimizer state: all slots in place (growing), or the slots ``keep`` moved to the front
        (shrinking: H and L must still fit them)."""
        P = sum(r * c for _, r, c in self._layout(H, L))
        dev = self.device
        new: dict[str, torch.Tensor] = {
            # per slot
            "flat": torch.zeros(K, P, device=dev),
            "m": torch.zeros(K, P, device=dev),
            "v": torch.zeros(K, P, device=dev),
            "pmask": torch.zeros(K, P, device=dev),
            "wd_l2": torch.zeros(K, 1, device=dev),
            "bs": torch.ones(K, 1, dtype=torch.long, device=dev),
            "n": torch.ones(K, 1, dtype=torch.long, device=dev),  # training rows of the slot's split
            "off": torch.zeros(K, 1, dtype=torch.long, device=dev),  # where they start in x_all
            "ds": torch.zeros(K, dtype=torch.long, device=dev),  # the slot's split
            "s": torch.zeros(K, 1, dtype=torch.long, device=dev),
            "live": torch.zeros(K, dtype=torch.bool, device=dev),
            "perm": torch.zeros(K, self.n, dtype=torch.long, device=dev),
            "loss_sum": torch.zeros(K, device=dev),
            "ended_loss": torch.zeros(K, device=dev),  # mean train loss of the epoch awaiting validation
            "layer_on": torch.zeros(max(L, 1), K, 1, 1, dtype=torch.bool, device=dev),
        }
        host = {"lr": np.zeros(K), "total": np.ones(K), "cosine": np.zeros(K, bool), "step": np.zeros(K),
                "wd_dec": np.zeros(K), "live": np.zeros(K, bool),
                # the step count at which the slot's epoch ends; the epoch that ended and awaits validation
                # (in the next forward). -1: none. Arrays, not Slot fields: no Python scan of K slots a step.
                "end_t": np.full(K, -1, np.int64), "ended": np.full(K, -1, np.int64)}
        order = list(range(self.K)) if keep is None else keep
        k = len(order)
        for key, array in self.host.items():
            host[key][:k] = array[order]
        self.host = host
        if self.streams is not None:
            self.streams.resize(K, order)
        if self.K:
            index = torch.tensor(order, dtype=torch.long, device=dev)
            depth = min(L, self.L)
            for key in ("flat", "m", "v", "pmask"):
                old_views = self.views(self.tensors[key])
                new_views = self.views(new[key], H, L)
                for name, view in new_views.items():
                    if name in old_views:
                        old = old_views[name].index_select(0, index)
                        rows, cols = min(view.shape[1], old.shape[1]), min(view.shape[2], old.shape[2])
                        view[:k, :rows, :cols] = old[:, :rows, :cols]
            for key, value in self.tensors.items():
                if key in ("flat", "m", "v", "pmask"):
                    continue
                if key == "layer_on":
                    new[key][: max(depth, 1), :k] = value.index_select(1, index)[: max(depth, 1)]
                else:
                    new[key][:k] = value.index_select(0, index)
            self.slots = [self.slots[i] for i in order] + [None] * (K - k)
        self.tensors = new
        self.K, self.H, self.L = K, H, L
        self.slots += [None] * (K - len(self.slots))
        self._cache_views()
        self.act_key = ()  # slots moved: regroup the activations

    def _shrink(self) -> None:
        """After trials ended: when at most half the slots are live, or the widest live trial is
        at most half the bank's width, or no live trial uses the deepest layer, lay the bank out
        again for the live trials only. The last trials of a study (stragglers) would otherwise
        keep paying for the widest, deepest and most numerous group that was ever in flight."""
        live = [k for k, s in enumerate(self.slots) if s is not None]
        if not live:
            return
        params = [self.slots[k].job.params for k in live]  # type: ignore[union-attr]
        H = self.H if self.linear else max(p.hidden_size for p in params)
        L = self.L if self.linear else max(p.n_layers for p in params)
        if len(live) <= self.K // 2 or H <= self.H // 2 or L < self.L:
            self._resize(len(live), H, L, keep=live)

    def _permute(self, order: list[int]) -> None:
        """Move slot ``order[i]`` to position i, with all its state."""
        index = torch.tensor(order, device=self.device)
        self.tensors = {
            key: value.index_select(1 if key == "layer_on" else 0, index) for key, value in self.tensors.items()
        }
        self.host = {key: array[order] for key, array in self.host.items()}
        if self.streams is not None:
            self.streams.resize(self.K, order)
        self.slots = [self.slots[k] for k in order]
        self._cache_views()

    def _cache_views(self) -> None:
        """The slots a step computes (``n_used``: up to the last slot in use) and views of their
        rows of every per-slot tensor (``used``), per-layer views of their weights and their
        gradient block, made once per layout."""
        self.n_used = next((k + 1 for k in range(len(self.slots) - 1, -1, -1) if self.slots[k] is not None), 0)
        n = self.n_used
        self.used = {key: value[:n] for key, value in self.tensors.items() if key != "layer_on"}
        if self.grad.shape != self.used["flat"].shape:
            self.grad = torch.zeros_like(self.used["flat"])  # written whole by every backward
        self.w = self.views(self.used["flat"])

    # -- slots ----------------------------------------------------------------------------

    def add(self, index: int, job: Job, config: ModelConfig, *, refresh: bool = True) -> Slot:
        """Put one trial in a free slot; see ``add_many``."""
        return self.add_many([(index, job, config)], refresh=refresh)[0]

    def add_many(self, items: list[tuple[int, Job, ModelConfig]], *, refresh: bool = True) -> list[Slot]:
        """Put trials ``(index, job, config)`` in free slots (growing the bank if needed), each
        with ``train()``'s initial weights for its seed, in a few batched writes (one per tensor,
        not per trial: a refill at large K, or any start on a GPU, would otherwise be thousands
        of tiny copies). ``refresh=False`` when more are added at once (then call ``refresh``)."""
        if not items:
            return []
        free = [i for i, s in enumerate(self.slots) if s is None][: len(items)]
        free += list(range(self.K, self.K + len(items) - len(free)))
        params = [job.params for _, job, _ in items]
        H = self.H if self.linear else max(self.H, *(p.hidden_size for p in params))
        L = self.L if self.linear else max(self.L, *(p.n_layers for p in params))
        if free[-1] >= self.K or H > self.H or L > self.L:
            self._resize(max(self.K * 2, free[-1] + 1) if free[-1] >= self.K else self.K, H, L)
        T, h = self.tensors, self.host
        P = T["flat"].shape[1]
        # Weights and masks of the new slots, built on the host and copied over once.
        flat, pmask = torch.zeros(len(items), P), torch.zeros(len(items), P)
        views, masks = self.views(flat), self.views(pmask)
        n_rows, batch, steps = [], [], []
        for row, (_, job, config) in enumerate(items):
            layers = initial_weights(config, job.seed)
            names = [f"w{i}" for i in range(len(layers) - 1)] + ["wout"]
            for name, (weight, bias) in zip(names, layers):
                b_name = "bout" if name == "wout" else "b" + name[1:]
                cols, rows = weight.shape
                views[name][row, :rows, :cols] = weight.T
                views[b_name][row, 0, :cols] = bias
                masks[name][row, :rows, :cols] = 1
                masks[b_name][row, 0, :cols] = 1
            n = len(self.datasets[job.data].x_train)
            n_rows.append(n)
            batch.append(min(job.params.batch_size, n))
            steps.append(math.ceil(n / batch[-1]))
        dev = self.device
        index = torch.tensor(free, device=dev)

        def column(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        with torch.no_grad():
            T["flat"][index] = flat.to(dev)
            T["pmask"][index] = pmask.to(dev)
            T["m"][index] = 0
            T["v"][index] = 0
            T["wd_l2"][index] = column([[p.weight_decay if p.optimizer in ("adam", "sgd") else 0.0] for p in params],
                                       torch.float32)
            T["bs"][index] = column([[b] for b in batch], torch.long)
            T["n"][index] = column([[n] for n in n_rows], torch.long)
            T["ds"][index] = column([job.data for _, job, _ in items], torch.long)
            T["off"][index] = self.offsets[T["ds"][index]][:, None]
            T["live"][index] = True
            if not self.linear:
                depth = column([p.n_layers for p in params], torch.long)
                T["layer_on"][:, index] = (torch.arange(self.L, device=dev)[:, None] < depth[None, :])[..., None, None]
        for k, p, s in zip(free, params, steps):
            h["lr"][k], h["total"][k], h["cosine"][k] = p.lr, p.epochs * s, p.schedule == "cosine"
            h["step"][k], h["live"][k], h["ended"][k] = 0, True, -1
            h["wd_dec"][k] = p.weight_decay if p.optimizer == "adamw" else 0.0
        slots = []
        start = time.perf_counter()
        for k, (index_, job, config), b, s in zip(free, items, batch, steps):
            generator = torch.Generator().manual_seed(job.seed) if self.streams is None else None
            slot = Slot(index=index_, job=job, config=config, data=self.datasets[job.data], generator=generator,
                        batch_size=b, steps_per_epoch=s, start=start, history=[])
            self.slots[k] = slot
            slots.append(slot)
        if self.streams is not None:
            self.streams.seed(free, [job.seed for _, job, _ in items])
        self.start_epochs(free)
        if refresh:
            self.refresh()
        return slots

    def start_epochs(self, ks: list[int]) -> None:
        """Start the next epoch of slots ``ks``: each its own shuffled order, as ``train()``
        (``data.batches()`` is ``randperm(n).split(batch_size)``), row 0 of it, no loss yet."""
        T = self.tensors
        slots = [self.slots[k] for k in ks]
        self.host["end_t"][ks] = [self.t + s.steps_per_epoch for s in slots]  # type: ignore[union-attr]
        index = torch.tensor(ks, device=self.device)
        if self.streams is not None:
            perms = self.streams.permutations(ks, [len(s.data.x_train) for s in slots], self.n)  # type: ignore[union-attr]
            T["perm"][index] = torch.from_numpy(perms).to(self.device, non_blocking=True)
        else:
            drawn = [torch.randperm(len(s.data.x_train), generator=s.generator) for s in slots]  # type: ignore[union-attr]
            if all(len(p) == self.n for p in drawn):
                block = torch.stack(drawn)
            else:
                block = torch.zeros(len(drawn), self.n, dtype=torch.long)
                for row, perm in enumerate(drawn):
                    block[row, : len(perm)] = perm
            T["perm"][index] = block.to(self.device)
        T["s"][index] = 0
        T["loss_sum"][index] = 0

    def end_epochs(self) -> list[int]:
        """After a step: the slots whose epoch ended with it keep its mean train loss and await
        validation (``host["ended"]``); each starts its next epoch, or, after its last, stops
        training. Returns the slots awaiting validation."""
        h = self.host
        if self.t == self.next_event:
            ending = np.flatnonzero(h["end_t"] == self.t).tolist()
            T = self.tensors
            index = torch.tensor(ending, device=self.device)
            T["ended_loss"][index] = T["loss_sum"][index] / T["n"][index, 0]
            going_on, last = [], []
            for k in ending:
                slot = self.slots[k]
                assert slot is not None
                h["ended"][k] = slot.epoch
                if slot.epoch + 1 < slot.job.params.epochs:
                    slot.epoch += 1
                    going_on.append(k)
                else:
                    last.append(k)
            if going_on:
                self.start_epochs(going_on)
            self.stop(last)
            self.refresh(slots_changed=False)
        return self.awaiting()

    def awaiting(self) -> list[int]:
        """The slots whose epoch ended and awaits validation in the next step's forward."""
        return np.flatnonzero(self.host["ended"] >= 0).tolist()

    def _next_event(self) -> int:
        """The next step count at which some slot's epoch ends, or -1 (a slot past its last epoch's is not ahead)."""
        ahead = self.host["end_t"][self.host["end_t"] > self.t]
        return int(ahead.min()) if ahead.size else -1

    def refresh(self, slots_changed: bool = True) -> None:
        """Host-side caches after slots changed: next epoch end, widest batch, activations in use,
        which layers some slot skips. ``slots_changed=False`` (only epochs went on): the next
        epoch end only."""
        if not slots_changed:
            self.next_event = self._next_event()
            return
        self._shrink()
        live = [s for s in self.slots if s is not None]
        self.next_event = self._next_event()
        self.b_max = max((s.batch_size for s in live), default=1)
        # Used slots first, so every step computes only the prefix of slots in use (free slots
        # stay free until a refill, a third of the slots on the cars space at K=64), and sorted
        # by activation, so each activation runs on one contiguous run of slots (a split and a
        # cat; gathering scattered slots cost a full-size zero fill per group in the backward).
        names = tuple(s.job.params.activation if s is not None else None for s in self.slots)
        if names != self.act_key:
            used = sorted({n for n in names if n is not None})
            several = not self.linear and len(used) > 1
            n = len(live)
            first = [name for name in names[:n] if name is not None]
            if len(first) < n or (several and len(activation_runs(first)) > len(used)):
                self._permute(sorted(range(self.K), key=lambda k: (names[k] is None, (names[k] or "") if several else "")))
                names = tuple(s.job.params.activation if s is not None else None for s in self.slots)
                first = [name for name in names[:n] if name is not None]
            self.runs = activation_runs(first) if several else [(used[0] if used else "relu", n)]
        self._cache_views()
        self.act_key = names
        depths = [s.job.params.n_layers for s in live]
        self.layer_on = [
            None if all(d > layer for d in depths) else layer_mask(self.tensors["layer_on"][layer][: self.n_used])
            for layer in range(self.L)
        ]
        # A padded unit of a sigmoid layer is 0.5, not 0: its outgoing (padded) weights then get a
        # gradient, which the update must not apply. Every other activation is 0 at 0.
        self.mask_grad = any(n == "sigmoid" for n in names)
        self.any_wd_l2 = bool(self.tensors["wd_l2"].any())
        self.any_wd_dec = bool(self.host["wd_dec"].any())

    @property
    def n_live(self) -> int:
        return len(self.slots) - self.slots.count(None)

    # -- compute --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """Every used slot's network on its rows ``x`` (``(n_used, B, n_in)``): outputs ``(n_used, B)``
        (regression) or ``(n_used, B, classes)``."""
        out = forward(self.w, x, self.L, self.runs, self.layer_on, tape)
        return out.squeeze(-1) if self.task == "regression" else out

    def step(self) -> None:
        """One optimizer step of every live slot on its next batch."""
        self.begin_step()
        self.end_step()

    def begin_step(self, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward half of a step: each live slot's loss on its next batch and the gradient
        of its outputs, and, in the same forward, every slot's outputs on the rows ``extra``
        (``(K, e, n_in)``, e.g. its validation rows) with the weights it has before this step,
        which are returned. ``stop`` may then keep slots out of the update; ``end_step`` ends it.
        Only the slots up to the last one in use are computed (``n_used``; ``extra`` has as many)."""
        T = self.used
        b = self.b_max
        cols = self.arange[:b]
        pos = T["s"] * T["bs"] + cols  # (K, b_max): this step's rows of each slot's permutation
        rows = (cols < T["bs"]) & (pos < T["n"]) & T["live"][:, None]
        idx = torch.gather(T["perm"], 1, pos.clamp_max(self.n - 1))
        if len(self.datasets) > 1:
            idx = idx + T["off"]
        xb, yb = self.x_all[idx], self.y_all[idx]
        tape = Tape()
        out = self.forward(xb if extra is None else torch.cat([xb, extra], 1), tape)
        out_extra = None
        if extra is not None:
            # The backward sees the batch rows only (views; the extra rows get no gradient).
            out, out_extra = out[:, :b], out[:, b:]
            tape.inputs = [t[:, :b] for t in tape.inputs]
            tape.z = [t[:, :b] for t in tape.z]
            tape.a = [t[:, :b] for t in tape.a]
            tape.last = tape.last[:, :b] if tape.last is not None else None
        weight = None
        if self.task != "regression" and self.class_weight is not None:
            weight = torch.where(rows, self.class_weight[T["ds"][:, None], yb], 0)
        loss, d_out = loss_and_grad(out, yb, rows, self.task, weight)
        self._half = (tape, d_out, loss * rows.sum(1))
        return out_extra

    def free(self, k: int) -> None:
        """Free slot k once its trial is frozen: weights, optimizer state and loss zeroed, out of every update."""
        for key in ("flat", "m", "v", "pmask", "loss_sum"):
            self.tensors[key][k] = 0
        self.stop([k])
        self.host["end_t"][k] = -1  # a trial stopped mid-epoch: that epoch's end must not come round
        self.slots[k] = None

    def stop(self, ks: list[int]) -> None:
        """Keep slots ``ks`` out of every update from now on (their weights stay as they are,
        this step's included when called between ``begin_step`` and ``end_step``)."""
        if ks:
            self.tensors["live"][torch.tensor(ks, device=self.device)] = False
            self.host["live"][ks] = False

    def end_step(self) -> None:
        """The backward and the update of the step ``begin_step`` began."""
        assert self._half is not None, "end_step without begin_step"
        tape, d_out, loss = self._half
        self._half = None
        T = self.used
        if self.host["live"].any():
            backward(tape, self.w, self.grad, d_out, self.runs, self.layer_on)
            T["loss_sum"] += loss
            self._update()
            T["s"] += T["live"][:, None]
        self.t += 1

    def _update(self) -> None:
        """torch's Adam / AdamW / SGD(momentum) update, per slot (its own lr, schedule and step
        count), on the whole ``(K, P)`` block: a padded entry has no gradient, so it stays zero."""
        T, h = self.used, self.host
        factor = np.where(h["cosine"], 0.5 * (1 + np.cos(math.pi * h["step"] / h["total"])), 1.0)
        lr = np.where(h["live"], h["lr"] * factor, 0.0)  # a frozen or free slot does not move
        h["step"] += h["live"]
        n = self.n_used
        scalars = torch.from_numpy(step_scalars(lr[:n], h["step"][:n], h["wd_dec"][:n])).to(self.device, non_blocking=True)
        if self.mask_grad:
            self.grad.mul_(T["pmask"])
        if self.any_wd_l2:
            self.grad.addcmul_(T["wd_l2"], T["flat"])
        update(T["flat"], self.grad, T["m"], T["v"], scalars, sgd=self.sgd, decoupled=self.any_wd_dec)

