from __future__ import annotations

import io

import optuna
import pytest

from tuner.progress import Progress, Snapshot, format_duration

optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _objective(clock: FakeClock):  # type: ignore[no-untyped-def]
    def objective(trial: optuna.Trial) -> float:
        clock.now += 2.0  # every trial "takes" two seconds
        trial.suggest_float("x", 0, 10)
        if trial.number == 1:
            raise optuna.TrialPruned("pruned on purpose")
        if trial.number == 2:
            raise RuntimeError("boom")
        return 10.0 - trial.number  # trial 3 is best (7.0)

    return objective


def _run(progress: Progress, clock: FakeClock) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective(clock), n_trials=4, callbacks=[progress], catch=(RuntimeError,))
    progress.close()
    return study


def test_format_duration() -> None:
    assert format_duration(12.34) == "12.3s"
    assert format_duration(75.2) == "1m15s"
    assert format_duration(3725) == "1h02m"


def test_snapshot_eta_uses_this_launchs_pace() -> None:
    s = Snapshot(
        n_done=6,
        n_trials=10,
        n_running=1,
        n_pruned=2,
        n_failed=1,
        best_value=2.5,
        best_trial=4,
        elapsed=30.0,
        n_done_here=3,
    )
    assert s.eta == pytest.approx(40.0)  # 4 left at 10 s each
    assert s.line() == "[6/10] running 1, pruned 2, failed 1 | best 2.5 (trial 4) | elapsed 30.0s, ETA 40.0s"
    first = Snapshot(
        n_done=0,
        n_trials=5,
        n_running=1,
        n_pruned=0,
        n_failed=0,
        best_value=None,
        best_trial=None,
        elapsed=1.0,
        n_done_here=0,
    )
    assert first.eta is None
    assert first.line().endswith("| best - | elapsed 1.0s, ETA ?")


def test_non_tty_prints_one_full_line_per_finished_trial() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(4, stream=out, clock=clock)
    assert progress.tty is False
    _run(progress, clock)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] running 0, pruned 0, failed 0 | best 10 (trial 0) | elapsed 2.0s, ETA 6.0s")
    assert "| trial 0 COMPLETE value 10 in " in lines[0]
    assert lines[1].startswith("[2/4] running 0, pruned 1, failed 0 | best 10 (trial 0)")
    assert "| trial 1 PRUNED" in lines[1]
    assert lines[2].startswith("[2/4] running 0, pruned 1, failed 1 |")
    assert "| trial 2 FAIL" in lines[2]
    assert lines[3].startswith("[3/4] running 0, pruned 1, failed 1 | best 7 (trial 3) | elapsed 8.0s, ETA ")


def test_tty_redraws_one_line_and_is_quiet_per_trial() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(4, stream=out, tty=True, refresh=0, clock=clock)
    _run(progress, clock)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # the one line ends when the launch ends
    assert text.count("\r") == 4
    assert "trial 0 COMPLETE" not in text
    assert text.rstrip().rsplit("\r", 1)[1].startswith("[3/4] running 0, pruned 1, failed 1 | best 7 (trial 3)")


def test_tty_verbose_prints_trial_lines_above_the_live_line() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(4, stream=out, tty=True, verbose=True, refresh=0, clock=clock)
    _run(progress, clock)
    text = out.getvalue()
    for expected in ("trial 0 COMPLETE value 10", "trial 1 PRUNED", "trial 2 FAIL", "trial 3 COMPLETE value 7"):
        assert expected in text
    assert text.count("\n") == 5  # 4 trial lines + the final live line


def test_tty_ticker_redraws_elapsed_between_trials() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(10, stream=out, tty=True, refresh=0.01, clock=clock)
    progress.update(Snapshot(1, 10, 1, 0, 0, 1.0, 0, 2.0, 1))  # ETA 18 s: 9 trials at 2 s each
    clock.now += 65
    import time

    deadline = time.monotonic() + 5
    while "elapsed 1m05s" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.close()
    assert "elapsed 1m05s, ETA 0.0s" in out.getvalue()  # counts down from 18 s, never grows


def test_eta_counts_down_between_trials() -> None:
    s = Snapshot(n_done=2, n_trials=4, n_running=1, n_pruned=0, n_failed=0, best_value=1.0, best_trial=0,
                 elapsed=25.0, n_done_here=2, counted_at=20.0)
    assert s.eta == pytest.approx(15.0)  # 20 s left when counted, 5 s ago
