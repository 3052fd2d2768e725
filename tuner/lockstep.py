"""The folds of one cross-validated trial, in lockstep: each fold's ``train()`` runs in its own
thread, but a baton lets exactly one of them (or the coordinating caller) run at a time, always in
the same order, and each fold takes its own global RNG state (dropout) with it across the
hand-overs (see ``tuner.validation``'s module doc for why).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from tuner.train import EpochHook

__all__ = ["Fold", "lockstep", "rng_state", "set_rng_state"]


class Fold(threading.Thread):
    """One fold's ``train()``, running only while it holds the baton."""

    def __init__(self, index: int, run: Any, back: threading.Semaphore, device: torch.device) -> None:
        super().__init__(name=f"tuner-fold-{index}", daemon=True)
        self.run_fold, self.back, self.device = run, back, device
        self.turn = threading.Semaphore(0)
        self.pending: tuple[int, dict[str, float]] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.stop = False

    def hook(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.pending = (epoch, dict(metrics))
        rng = rng_state(self.device)  # this fold's dropout stream, which the other folds move on
        self.back.release()  # baton to the coordinator
        self.turn.acquire()  # wait for the next turn
        set_rng_state(self.device, rng)
        return self.stop

    def run(self) -> None:
        self.turn.acquire()
        try:
            self.result = self.run_fold(self.hook)
        except BaseException as e:  # handed to the coordinator, re-raised there
            self.error = e
        finally:
            self.done = True
            self.back.release()


def lockstep(
    workers: list[Fold], back: threading.Semaphore, on_epoch_end: EpochHook | None
) -> tuple[list[dict[str, float]], str | None]:
    """Hand the baton round the folds, one epoch per round; report each round's mean."""
    history: list[dict[str, float]] = []
    stop_reason: str | None = None
    stopping = False
    try:
        while not all(w.done for w in workers):
            rows: list[tuple[int, dict[str, float]]] = []
            for w in workers:
                if w.done:
                    continue
                w.pending, w.stop = None, stopping
                w.turn.release()
                back.acquire()  # until this fold reaches its next epoch end, or finishes
                if w.pending is not None:
                    rows.append(w.pending)
                elif w.error is not None or w.result.diverged:  # the others stop at their next epoch end
                    stopping = True
            if stopping or not rows:
                continue
            epoch = rows[0][0]
            mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]}
            history.append(mean)
            if on_epoch_end is not None and on_epoch_end(epoch, mean):
                stopping = True
                stop_reason = f"stopped by the epoch hook after epoch {epoch}"
    finally:
        if not all(w.done for w in workers):  # interrupted: every fold stops at its next epoch end
            for w in workers:
                w.stop = True
                w.turn.release()
    return history, stop_reason


def rng_state(device: torch.device) -> tuple[Any, Any]:
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: tuple[Any, Any]) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
