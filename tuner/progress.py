"""Progress of a launch: one live line on a terminal, one line per finished trial in logs.

The line shows trials done/total, running, pruned and failed trials, the best value and its
trial, elapsed time and an ETA taken from this launch's own pace. On a TTY the line is redrawn
in place (and re-timed every second by a small thread that reads no storage); ``verbose`` adds
one line per finished trial above it. When the stream is not a TTY (CI, log files) nothing is
redrawn: every finished trial prints one complete line.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:
    import optuna

__all__ = ["Progress", "Snapshot", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m``; under a minute -> ``12.3s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass(frozen=True)
class Snapshot:
    """Trial counts of the study at one moment, and this launch's pace."""

    n_done: int  # COMPLETE + PRUNED, the study's whole history
    n_trials: int  # the total the launch runs to
    n_running: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_trial: int | None
    elapsed: float  # seconds since this launch started
    n_done_here: int  # finished by this launch (the pace of the ETA)
    # Elapsed seconds when the counts were taken; set when the line is only re-timed, so the ETA
    # counts down between trials instead of growing with a stale count.
    counted_at: float | None = None

    @property
    def eta(self) -> float | None:
        """Seconds left at this launch's pace; None before its first finished trial."""
        if self.n_done_here <= 0:
            return None
        counted_at = self.elapsed if self.counted_at is None else self.counted_at
        left = max(self.n_trials - self.n_done, 0) * counted_at / self.n_done_here
        return max(left - (self.elapsed - counted_at), 0.0)

    def line(self) -> str:
        best = f"best {self.best_value:.4g} (trial {self.best_trial})" if self.best_value is not None else "best -"
        eta = format_duration(self.eta) if self.eta is not None else "?"
        return (
            f"[{self.n_done}/{self.n_trials}] running {self.n_running}, pruned {self.n_pruned}, "
            f"failed {self.n_failed} | {best} | elapsed {format_duration(self.elapsed)}, ETA {eta}"
        )


class Progress:
    """An Optuna callback (``study.optimize(callbacks=[progress])``) that reports the launch.

    Args:
        n_trials: the finished-trial total the launch runs to.
        n_done_before: finished trials the study held when the launch started (for the ETA).
        stream: where to write (stderr by default, so stdout stays the command's result).
        verbose: also one line per finished trial on a TTY.
        tty: override ``stream.isatty()``.
        refresh: seconds between redraws of the live line on a TTY (0: only after trials).
    """

    def __init__(
        self,
        n_trials: int,
        *,
        n_done_before: int = 0,
        stream: TextIO | None = None,
        verbose: bool = False,
        tty: bool | None = None,
        refresh: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.n_trials, self.n_done_before, self.verbose = n_trials, n_done_before, verbose
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.start = clock()
        self.snapshot: Snapshot | None = None
        self._width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.tty and refresh > 0:
            self._ticker = threading.Thread(target=self._tick, args=(refresh,), name="tuner-progress", daemon=True)
            self._ticker.start()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from optuna.trial import TrialState

        from tuner.selection import ranked_trials, study_metric

        trials = study.get_trials(deepcopy=False)
        counts = {s: 0 for s in TrialState}
        for t in trials:
            counts[t.state] += 1
        ranked = ranked_trials(trials, study.direction.name.lower(), study_metric(study))  # the one selection rule
        best = ranked[0] if ranked else None
        n_done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        self.update(
            Snapshot(
                n_done=n_done,
                n_trials=self.n_trials,
                n_running=counts[TrialState.RUNNING],
                n_pruned=counts[TrialState.PRUNED],
                n_failed=counts[TrialState.FAIL],
                best_value=None if best is None else float(best.value),  # type: ignore[arg-type]
                best_trial=None if best is None else best.number,
                elapsed=self.clock() - self.start,
                n_done_here=max(n_done - self.n_done_before, 0),
            ),
            trial_line=_trial_line(trial),
        )

    def update(self, snapshot: Snapshot, trial_line: str | None = None) -> None:
        """Show a new snapshot; ``trial_line`` describes the trial that just finished."""
        with self._lock:
            self.snapshot = snapshot
            if not self.tty:
                suffix = f" | {trial_line}" if trial_line else ""
                self.stream.write(snapshot.line() + suffix + "\n")
            else:
                if self.verbose and trial_line:
                    self._clear()
                    self.stream.write(trial_line + "\n")
                self._draw(snapshot.line())
            self.stream.flush()

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(self._width))
        self._width = max(self._width, len(line))

    def _clear(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.snapshot is None:
                    continue
                from dataclasses import replace

                counted_at = self.snapshot.elapsed if self.snapshot.counted_at is None else self.snapshot.counted_at
                self._draw(replace(self.snapshot, elapsed=self.clock() - self.start, counted_at=counted_at).line())
                self.stream.flush()

    def close(self) -> None:
        """Stop the redraw thread and end the live line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            if self.tty and self._width:
                self.stream.write("\n")
                self.stream.flush()


def _trial_line(trial: optuna.trial.FrozenTrial) -> str:
    value = f" value {trial.value:.6g}" if trial.value is not None else ""
    reason = trial.user_attrs.get("stop_reason")
    why = f" ({reason})" if reason and trial.state.name == "PRUNED" else ""
    took = ""
    if trial.datetime_start and trial.datetime_complete:
        took = f" in {(trial.datetime_complete - trial.datetime_start).total_seconds():.2f}s"
    return f"trial {trial.number} {trial.state.name}{value}{took}{why}"
