"""The batched model behind ``train_many``: K trials of one shape family as stacked tensors.

A ``Bank`` keeps each trial's weights, optimizer state, learning rate and schedule, hidden size
and depth (padded; a missing layer is skipped per slot), activation, batch size, shuffled order
and history rows in one slot (``Slot``, trained from a ``Job``; how slots are laid out and moved
is ``banklayout.py``), and runs one forward/backward (written out in ``bankmath.py``) and one
batched optimizer step for all of them; the epoch shuffles come from ``shuffle.py``. A step is two
halves (``begin_step``: the forward, which also carries extra rows such as the validation rows of
the slots whose epoch just ended; ``end_step``: backward and update), so a trial's epoch can be
reported and stopped between them. Reporting, stopping and freezing a trial live in ``fused.py``.

Torch and numpy only (no Optuna, no MLflow), like ``train.py``'s torch only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from tuner.banklayout import ACTIVATIONS, BankLayout, real_entries, upload
from tuner.bankmath import LayerMask, Tape, backward, forward, layer_mask, loss_and_grad, step_scalars, update
from tuner.data import Prepared
from tuner.model import ModelConfig, initial_draws, layer_widths
from tuner.shuffle import MAX_ROWS, Streams
from tuner.train import TrainParams

__all__ = ["Bank", "Job", "Slot"]

_SIGMOID = ACTIVATIONS.index("sigmoid")


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
    """Host-side objects of one trial in a bank; its per-step numbers are ``Bank.host`` arrays."""

    index: int
    job: Job
    config: ModelConfig
    data: Prepared
    generator: torch.Generator | None  # None: shuffled by the bank's Streams
    start: float = 0.0


class Bank(BankLayout):
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
        self.y_std = np.array([float(d.y_std_) for d in datasets])  # per split, for the train RMSE
        self.tensors: dict[str, torch.Tensor] = {}
        self.act_key = b""
        self.runs: list[tuple[str, int]] = [("relu", 1)]  # activation, its run of slots
        self.layer_on: list[LayerMask | None] = []  # per layer: which slots have it, None: all
        self.any_wd_l2 = self.any_wd_dec = self.mask_grad = False
        # Per-slot numbers the host knows (schedule, step and epoch counts, shape, history; see
        # banklayout): numpy arrays, one copy to the device per step.
        self.host: dict[str, np.ndarray] = {}
        self.arange = torch.arange(self.n, device=device)
        # Every slot's epoch shuffles, vectorised on the host (see shuffle.py) for a device other
        # than the CPU; on the CPU, and for longer splits, one torch generator per slot.
        vector = self.vector_shuffles if self.vector_shuffles is not None else device.type != "cpu"
        self.streams = Streams(self.n) if vector and self.n <= MAX_ROWS else None
        self.b_max = 1
        self._resize(1, 0 if linear else width, 0 if linear else 1)

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
        free = np.flatnonzero(self.host["act"] < 0)[: len(items)].tolist()
        free += list(range(self.K, self.K + len(items) - len(free)))
        params = [job.params for _, job, _ in items]
        H = self.H if self.linear else max(self.H, *(p.hidden_size for p in params))
        L = self.L if self.linear else max(self.L, *(p.n_layers for p in params))
        if free[-1] >= self.K or H > self.H or L > self.L:
            self._resize(max(self.K * 2, free[-1] + 1) if free[-1] >= self.K else self.K, H, L)
        self._grow_history(max(p.epochs for p in params))
        T, h = self.tensors, self.host
        flat, pmask = self._initial_rows(items, T["flat"].shape[1])
        ks = np.asarray(free)
        n_rows = np.array([len(self.datasets[job.data].x_train) for _, job, _ in items])
        batch = np.minimum([p.batch_size for p in params], n_rows)
        steps = -(-n_rows // batch)
        epochs = np.array([p.epochs for p in params])
        wd_l2 = np.array([p.weight_decay if p.optimizer in ("adam", "sgd") else 0.0 for p in params])  # L2 in the gradient
        split = np.array([job.data for _, job, _ in items])
        depth = np.array([p.n_layers if p.hidden_size else 0 for p in params])
        dev = self.device
        index = upload(free, dev, torch.long)
        with torch.no_grad():
            T["flat"][index] = upload(flat, dev)
            T["pmask"][index] = upload(pmask, dev)
            T["m"][index] = 0
            T["v"][index] = 0
            T["wd_l2"][index] = upload(wd_l2[:, None], dev, torch.float32)
            T["bs"][index] = upload(batch[:, None], dev, torch.long)
            T["n"][index] = upload(n_rows[:, None], dev, torch.long)
            T["ds"][index] = upload(split, dev, torch.long)
            T["off"][index] = self.offsets[T["ds"][index]][:, None]
            T["live"][index] = True
            if not self.linear:
                on = torch.arange(self.L, device=dev)[:, None] < upload(depth, dev, torch.long)[None, :]
                T["layer_on"][:, index] = on[..., None, None]
        h["lr"][ks] = [p.lr for p in params]
        h["total"][ks] = epochs * steps
        h["cosine"][ks] = [p.schedule == "cosine" for p in params]
        h["wd_dec"][ks] = [p.weight_decay if p.optimizer == "adamw" else 0.0 for p in params]
        h["wd_l2"][ks] = wd_l2
        h["step"][ks], h["live"][ks], h["ended"][ks], h["epoch"][ks], h["n_hist"][ks] = 0, True, -1, 0, 0
        h["epochs"][ks], h["spe"][ks], h["rows"][ks], h["bs"][ks] = epochs, steps, n_rows, batch
        h["act"][ks] = [ACTIVATIONS.index(p.activation) for p in params]
        h["depth"][ks] = depth
        h["hidden"][ks] = [p.hidden_size for p in params]
        h["job"][ks] = [index_ for index_, _, _ in items]
        h["ds"][ks] = split
        slots = []
        start = time.perf_counter()
        for k, (index_, job, config) in zip(free, items):
            generator = torch.Generator().manual_seed(job.seed) if self.streams is None else None
            slot = Slot(index=index_, job=job, config=config, data=self.datasets[job.data], generator=generator,
                        start=start)
            self.slots[k] = slot
            slots.append(slot)
        if self.streams is not None:
            self.streams.seed(free, [job.seed for _, job, _ in items])
        self.start_epochs(ks)
        if refresh:
            self.refresh()
        return slots

    def _initial_rows(self, items: list[tuple[int, Job, ModelConfig]], P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The new slots' flat parameters ``(len(items), P)`` on the host, ``train()``'s initial
        weights for each seed (``model.initial_draws``, vectorised over the trials), and their
        masks (1: a real entry), all placed with one scatter."""
        widths = [layer_widths(config) for _, _, config in items]
        values = torch.from_numpy(initial_draws(widths, [job.seed for _, job, _ in items]))
        layout = (self.n_in, self.n_out, self.H, self.L)
        index = torch.from_numpy(np.concatenate([row * P + real_entries(*layout, len(w) - 2, w[1] if len(w) > 2 else 0)
                                                 for row, w in enumerate(widths)]))
        flat, pmask = torch.zeros(len(items) * P), torch.zeros(len(items) * P)
        flat[index] = values
        pmask[index] = 1
        return flat.view(len(items), P), pmask.view(len(items), P)

    def start_epochs(self, ks: np.ndarray) -> None:
        """Start the next epoch of slots ``ks``: each its own shuffled order, as ``train()``
        (``data.batches()`` is ``randperm(n).split(batch_size)``), row 0 of it, no loss yet."""
        T, h = self.tensors, self.host
        h["end_t"][ks] = self.t + h["spe"][ks]
        index = upload(ks, self.device, torch.long)
        if self.streams is not None:
            T["perm"][index] = upload(self.streams.permutations(ks, h["rows"][ks], self.n), self.device)
        else:
            drawn = [torch.randperm(int(n), generator=self.slots[k].generator)  # type: ignore[union-attr]
                     for k, n in zip(ks.tolist(), h["rows"][ks].tolist())]
            if all(len(p) == self.n for p in drawn):
                block = torch.stack(drawn)
            else:
                block = torch.zeros(len(drawn), self.n, dtype=torch.long)
                for row, perm in enumerate(drawn):
                    block[row, : len(perm)] = perm
            T["perm"][index] = upload(block, self.device)
        T["s"][index] = 0
        T["loss_sum"][index] = 0

    def end_epochs(self) -> list[int]:
        """After a step: the slots whose epoch ended with it keep its mean train loss and await
        validation (``host["ended"]``); each starts its next epoch, or, after its last, stops
        training. Returns the slots awaiting validation."""
        h = self.host
        if self.t == self.next_event:
            ending = np.flatnonzero(h["end_t"] == self.t)
            T = self.tensors
            index = upload(ending, self.device, torch.long)
            T["ended_loss"][index] = T["loss_sum"][index] / T["n"][index, 0]
            epoch = h["epoch"][ending]
            h["ended"][ending] = epoch
            going_on = epoch + 1 < h["epochs"][ending]
            h["epoch"][ending[going_on]] += 1
            if going_on.any():
                self.start_epochs(ending[going_on])
            self.stop(ending[~going_on].tolist())
            self.refresh(slots_changed=False)
        return self.awaiting()

    def awaiting(self) -> list[int]:
        """The slots whose epoch ended and awaits validation in the next step's forward."""
        return np.flatnonzero(self.host["ended"] >= 0).tolist()

    def _next_event(self) -> int:
        """The next step count at which some slot's epoch ends, or -1 (a slot past its last epoch's is not ahead)."""
        ahead = self.host["end_t"][self.host["end_t"] > self.t]
        return int(ahead.min()) if ahead.size else -1

    def record(self, ks: np.ndarray, rows: np.ndarray) -> None:
        """Append history rows ``rows`` (``(len(ks), HISTORY_COLUMNS)``) to slots ``ks``."""
        h = self.host
        h["hist"][ks, h["n_hist"][ks]] = rows
        h["n_hist"][ks] += 1

    def refresh(self, slots_changed: bool = True) -> None:
        """Host-side caches after slots changed: next epoch end, widest batch, activations in use,
        which layers some slot skips. ``slots_changed=False`` (only epochs went on): the next
        epoch end only."""
        if not slots_changed:
            self.next_event = self._next_event()
            return
        self._shrink()
        h = self.host
        self.next_event = self._next_event()
        live = np.flatnonzero(h["act"] >= 0)
        self.b_max = int(h["bs"][live].max()) if len(live) else 1
        # Used slots first, so every step computes only the prefix of slots in use (free slots
        # stay free until a refill, a third of the slots on the cars space at K=64), and sorted
        # by activation, so each activation runs on one contiguous run of slots (a split and a
        # cat; gathering scattered slots cost a full-size zero fill per group in the backward).
        if h["act"].tobytes() != self.act_key:
            used = np.unique(h["act"][live])
            several = not self.linear and len(used) > 1
            n = len(live)
            first = h["act"][:n]
            if (first < 0).any() or (several and np.count_nonzero(np.diff(first)) + 1 > len(used)):
                self._regroup(several)
                first = self.host["act"][:n]
            if several:
                cuts = np.flatnonzero(np.diff(first)) + 1
                bounds = [0, *cuts.tolist(), n]
                self.runs = [(ACTIVATIONS[first[a]], b - a) for a, b in zip(bounds[:-1], bounds[1:])]
            else:
                self.runs = [(ACTIVATIONS[used[0]] if len(used) else "relu", n)]
        h = self.host
        self._cache_views()
        self.act_key = h["act"].tobytes()
        depths = h["depth"][h["act"] >= 0]
        self.layer_on = [
            None if (depths > layer).all() else layer_mask(self.tensors["layer_on"][layer][: self.n_used])
            for layer in range(self.L)
        ]
        # A padded unit of a sigmoid layer is 0.5, not 0: its outgoing (padded) weights then get a
        # gradient, which the update must not apply. Every other activation is 0 at 0.
        self.mask_grad = bool((h["act"] == _SIGMOID).any())
        self.any_wd_l2 = bool(h["wd_l2"].any())  # the host's copy: no device sync per refresh
        self.any_wd_dec = bool(h["wd_dec"].any())

    @property
    def n_live(self) -> int:
        return int(np.count_nonzero(self.host["act"] >= 0))

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

    def free(self, ks: list[int]) -> None:
        """Free slots ``ks`` once their trials are frozen: weights, optimizer state and loss
        zeroed, out of every update, no epoch ahead (a trial stopped mid-epoch: that epoch's end
        must not come round)."""
        index = upload(ks, self.device, torch.long)
        for key in ("flat", "m", "v", "pmask", "loss_sum"):
            self.tensors[key][index] = 0
        self.stop(ks)
        h = self.host
        h["end_t"][ks], h["act"][ks], h["job"][ks], h["n_hist"][ks] = -1, -1, -1, 0
        for k in ks:
            self.slots[k] = None

    def stop(self, ks: list[int]) -> None:
        """Keep slots ``ks`` out of every update from now on (their weights stay as they are,
        this step's included when called between ``begin_step`` and ``end_step``)."""
        if ks:
            self.tensors["live"][upload(ks, self.device, torch.long)] = False
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
        scalars = upload(step_scalars(lr[:n], h["step"][:n], h["wd_dec"][:n]), self.device)
        if self.mask_grad:
            self.grad.mul_(T["pmask"])
        if self.any_wd_l2:
            self.grad.addcmul_(T["wd_l2"], T["flat"])
        update(T["flat"], self.grad, T["m"], T["v"], scalars, sgd=self.sgd, decoupled=self.any_wd_dec)

