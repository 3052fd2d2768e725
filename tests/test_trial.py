"""The objective's end of a trial that raised: its MLflow run KILLED by Ctrl-C, else FAILED."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from conftest import write_study

from tuner import interrupts
from tuner.config import load_spec
from tuner.tracking import Tracker
from tuner.trial import Objective


def test_a_trial_that_raises_after_a_ctrl_c_ends_its_run_killed_whatever_it_raised(tmp_path: Path, tracking_uri: str) -> None:
    spec = load_spec(write_study(tmp_path))
    tracker = Tracker(tracking_uri, spec.name)
    objective = Objective(spec, None, tracker, None, "cpu")  # type: ignore[arg-type]  # abort reads no data
    error = sqlite3.OperationalError("cannot rollback - no transaction is active")

    failed = tracker.start_trial(None, spec.name, 0)
    objective.abort(None, {"lr": 0.01}, failed, error)  # no signal: an error of its own
    assert tracker.run_status(failed) == "FAILED"

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    try:
        interrupts.install()
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # recorded inside, raised on leaving
        # The interrupt surfaced as another error (a driver's, raised while cleaning up after it).
        killed = tracker.start_trial(None, spec.name, 1)
        objective.abort(None, {"lr": 0.01}, killed, error)
        assert tracker.run_status(killed) == "KILLED"
        assert tracker.client.get_run(killed).data.tags["tuner.error"].startswith("OperationalError(")
    finally:
        interrupts.install()  # clears the request: later tests in this process see none
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        sys.unraisablehook = saved[2]
    assert not interrupts.requested()
