"""How a bank lays its K slots out: per-slot tensors on the device, per-slot arrays on the host.

``BankLayout`` is the part of ``bank.Bank`` that places slots: the flat ``(K, P)`` parameter
block and its per-layer views at a width H and depth L, growing it, shrinking it to the live
trials, and moving slots (every tensor, host array and shuffle stream follows a slot). What a
slot is and how it trains is ``bank.py``.

Every per-slot scalar the host needs each step (schedule, epoch counters, batch size,
activation, depth, history) is a numpy array indexed by slot, not a field scanned in Python:
at large K (thousands of slots on a GPU) a Python pass over the slots each step would cost more
than the step.

Torch and numpy only.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from tuner.bankmath import ACT_FORWARD

__all__ = ["ACTIVATIONS", "BankLayout", "HISTORY_COLUMNS", "layer_blocks", "layer_shapes", "layer_views", "real_entries",
           "upload"]

# An activation's code in the host array "act" (-1: a free slot); sorted, so ordering slots by
# code groups them as ordering by name would.
ACTIVATIONS: tuple[str, ...] = tuple(sorted(ACT_FORWARD))
# A history row: the three validation metrics, then the train column (see train.epoch_record).
HISTORY_COLUMNS = 4


def upload(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (slot indices, a column, a block) as a tensor on ``device``, without making
    the host wait for the device. A copy from pageable memory (``tensor.to("cuda")``,
    ``torch.tensor(..., device="cuda")``) returns only once the kernels queued before it have run,
    i.e. after the whole step at every epoch event; staged in pinned memory it is queued like a
    kernel, and torch's caching host allocator keeps the pinned copy alive until it has run."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Host arrays per slot: (dtype, value of a free slot).
_HOST: dict[str, tuple[Any, Any]] = {
    "lr": (np.float64, 0.0), "total": (np.float64, 1.0), "cosine": (np.bool_, False), "step": (np.float64, 0.0),
    "wd_dec": (np.float64, 0.0), "wd_l2": (np.float64, 0.0), "live": (np.bool_, False),
    # the step count at which the slot's epoch ends; the epoch that ended and awaits validation in
    # the next forward (-1: none); the epoch it trains, and how many it has
    "end_t": (np.int64, -1), "ended": (np.int64, -1), "epoch": (np.int64, 0), "epochs": (np.int64, 1),
    "spe": (np.int64, 1), "rows": (np.int64, 1), "bs": (np.int64, 1),  # steps per epoch, training rows, batch
    "act": (np.int64, -1), "depth": (np.int64, 0), "hidden": (np.int64, 0),
    "job": (np.int64, -1), "ds": (np.int64, 0), "n_hist": (np.int64, 0),  # job index, split, history rows kept
}


def layer_shapes(n_in: int, n_out: int, H: int, L: int) -> list[tuple[str, int, int]]:
    """The blocks of one slot's flat parameters: ``(name, rows, cols)``, weights as ``(in, out)``."""
    shapes: list[tuple[str, int, int]] = []
    width = n_in
    for layer in range(L):
        shapes += [(f"w{layer}", width, H), (f"b{layer}", 1, H)]
        width = H
    return shapes + [("wout", width, n_out), ("bout", 1, n_out)]


def layer_blocks(n_in: int, n_out: int, H: int, L: int) -> dict[str, tuple[int, int, int]]:
    """Each block of ``layer_shapes`` as ``name -> (offset, rows, cols)`` in a slot's flat row."""
    blocks, offset = {}, 0
    for name, rows, cols in layer_shapes(n_in, n_out, H, L):
        blocks[name] = (offset, rows, cols)
        offset += rows * cols
    return blocks


def layer_views(flat: torch.Tensor, n_in: int, n_out: int, H: int, L: int) -> dict[str, torch.Tensor]:
    """Per-layer views ``(K, rows, cols)`` of flat parameters ``(K, P)`` laid out at width H, depth L."""
    return {name: flat[:, offset : offset + rows * cols].view(flat.shape[0], rows, cols)
            for name, (offset, rows, cols) in layer_blocks(n_in, n_out, H, L).items()}


@functools.lru_cache(maxsize=1024)
def real_entries(n_in: int, n_out: int, H: int, L: int, depth: int, hidden: int) -> np.ndarray:
    """Where a trial of ``depth`` hidden layers of width ``hidden`` has its parameters in a flat
    row laid out at width H, depth L, in ``model.initial_draws``' order (per layer the weight
    ``(out, in)`` row-major, stored transposed here, then the bias)."""
    blocks = layer_blocks(n_in, n_out, H, L)
    found, width = [], n_in
    for name, out in [(f"w{i}", hidden) for i in range(depth)] + [("wout", n_out)]:
        start, _, cols = blocks[name]
        found.append(start + (np.arange(out)[:, None] + np.arange(width)[None, :] * cols).ravel())
        found.append(blocks["bout" if name == "wout" else "b" + name[1:]][0] + np.arange(out))
        width = out
    return np.concatenate(found)


class BankLayout:
    """Slot placement of a bank (see ``bank.Bank``, which sets these attributes up)."""

    device: torch.device
    linear: bool
    n_in: int
    n_out: int
    n: int  # the longest split's training rows
    K: int
    H: int
    L: int
    slots: list[Any]
    tensors: dict[str, torch.Tensor]
    host: dict[str, np.ndarray]
    streams: Any
    grad: torch.Tensor
    act_key: bytes

    def views(self, flat: torch.Tensor, H: int | None = None, L: int | None = None) -> dict[str, torch.Tensor]:
        return layer_views(flat, self.n_in, self.n_out, self.H if H is None else H, self.L if L is None else L)

    def _resize(self, K: int, H: int, L: int, keep: list[int] | None = None) -> None:
        """Re-lay the bank out as K slots of width H and depth L, keeping every slot's weights and
        optimizer state: all slots in place (growing), or the slots ``keep`` moved to the front
        (shrinking: H and L must still fit them)."""
        P = sum(r * c for _, r, c in layer_shapes(self.n_in, self.n_out, H, L))
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
        host = {key: np.full(K, fill, dtype) for key, (dtype, fill) in _HOST.items()}
        # Each slot's history rows so far, (K, epochs, HISTORY_COLUMNS); grown by _grow_history.
        host["hist"] = np.zeros((K, *(self.host["hist"].shape[1:] if self.host else (1, HISTORY_COLUMNS))))
        order = list(range(self.K)) if keep is None else keep
        k = len(order)
        for key, array in self.host.items():
            host[key][:k] = array[order]
        self.host = host
        if self.streams is not None:
            self.streams.resize(K, order)
        if self.K:
            index = upload(order, dev, torch.long)
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
        self.act_key = b""  # slots moved: regroup the activations

    def _grow_history(self, epochs: int) -> None:
        """Room for ``epochs`` history rows per slot."""
        hist = self.host["hist"]
        if hist.shape[1] < epochs:
            grown = np.zeros((hist.shape[0], max(epochs, 2 * hist.shape[1]), hist.shape[2]))
            grown[:, : hist.shape[1]] = hist
            self.host["hist"] = grown

    def _shrink(self) -> None:
        """After trials ended: when at most half the slots are live, or the widest live trial is
        at most half the bank's width, or no live trial uses the deepest layer, lay the bank out
        again for the live trials only. The last trials of a study (stragglers) would otherwise
        keep paying for the widest, deepest and most numerous group that was ever in flight."""
        live = np.flatnonzero(self.host["act"] >= 0)
        if not len(live):
            return
        H = self.H if self.linear else int(self.host["hidden"][live].max())
        L = self.L if self.linear else int(self.host["depth"][live].max())
        if len(live) <= self.K // 2 or H <= self.H // 2 or L < self.L:
            self._resize(len(live), H, L, keep=live.tolist())

    def _regroup(self, several: bool) -> None:
        """Move slots so that the live ones come first and, when ``several`` activations train
        here, each activation's slots form one run, moving as few slots as there are out of
        place: runs keep the order of their slots' median positions and grow or shrink at their
        edges, so a refill moves about the slots it filled, not the bank (a whole-bank permute
        was half of a refill at 4,096 slots on the CPU, and on a GPU copies every tensor)."""
        h = self.host
        cur = h["act"] if several else np.where(h["act"] >= 0, 0, -1)
        live = np.flatnonzero(cur >= 0)
        codes = np.unique(cur[live])
        codes = codes[np.argsort([np.median(live[cur[live] == c]) for c in codes], kind="stable")]
        target = np.full(self.K, -1)
        target[: len(live)] = np.repeat(codes, [np.count_nonzero(cur == c) for c in codes])
        order = np.arange(self.K)  # order[i]: the slot that moves to position i
        for c in codes:
            order[np.flatnonzero((target == c) & (cur != c))] = np.flatnonzero((cur == c) & (target != c))
        order[np.flatnonzero((target < 0) & (cur >= 0))] = np.flatnonzero((cur < 0) & (target >= 0))
        moved = np.flatnonzero(order != np.arange(self.K))
        src = order[moved]
        to, fro = upload(moved, self.device, torch.long), upload(src, self.device, torch.long)
        for key, value in self.tensors.items():
            if key == "layer_on":
                value[:, to] = value[:, fro]
            else:
                value[to] = value[fro]
        for array in h.values():
            array[moved] = array[src]
        if self.streams is not None:
            self.streams.move(moved, src)
        slots = [self.slots[k] for k in src.tolist()]
        for k, slot in zip(moved.tolist(), slots):
            self.slots[k] = slot
        self._cache_views()

    def _cache_views(self) -> None:
        """The slots a step computes (``n_used``: up to the last slot in use) and views of their
        rows of every per-slot tensor (``used``), per-layer views of their weights and their
        gradient block, made once per layout."""
        in_use = np.flatnonzero(self.host["act"] >= 0)
        self.n_used = int(in_use[-1]) + 1 if len(in_use) else 0
        n = self.n_used
        self.used = {key: value[:n] for key, value in self.tensors.items() if key != "layer_on"}
        if self.grad.shape != self.used["flat"].shape:
            self.grad = torch.zeros_like(self.used["flat"])  # written whole by every backward
        self.w = self.views(self.used["flat"])
