"""The process pool of ``tuner launch --workers N``: spawn N ``tuner worker`` processes, watch them.

Everything a worker does is the one launch session (``tuner.session.launch`` with
``role="worker"``): the same gate, heartbeat, reporter and rules as a one-process launch, fused
where the study fuses. The launch that owns the pool creates the study and its launch run first,
promotes once the workers are done, and ends the run; workers end themselves when that launch
process is gone (``TUNER_LAUNCH_PID``), even after a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from tuner.config import StudySpec
from tuner.errors import TunerError
from tuner.selection import best_trial
from tuner.study import finished_count, storage_errors

if TYPE_CHECKING:
    import optuna

__all__ = ["run_pool", "parse_gpus", "STORAGE_ENV", "PARENT_RUN_ENV", "WORKER_INDEX_ENV", "LAUNCH_PID_ENV", "N_WORKERS_ENV"]

# Environment a pool passes to its workers (and what a container may set by hand).
STORAGE_ENV = "TUNER_STORAGE"  # Optuna storage URL (keeps a password off the command line)
PARENT_RUN_ENV = "TUNER_PARENT_RUN_ID"  # the launch run a worker's trial runs nest under
WORKER_INDEX_ENV = "TUNER_WORKER_INDEX"  # 0..N-1: the worker's sampler seed offset
N_WORKERS_ENV = "TUNER_N_WORKERS"  # N: the workers sharing the study (each fuses a share of its trials)
LAUNCH_PID_ENV = "TUNER_LAUNCH_PID"  # a pool worker ends when this process is gone


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; each is a CUDA device index or UUID for CUDA_VISIBLE_DEVICES."""
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",")]
    if not gpus or any(not g for g in gpus):
        raise TunerError(f"--gpus {text!r}: give comma-separated GPU indices, e.g. --gpus 0,1")
    return gpus


def _counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {s.name: sum(t.state == s for t in trials) for s in TrialState}


class _CombinedProgress:
    """One line for all workers: finished/total, best value, states, workers alive."""

    def __init__(self, total: int, n_workers: int, stream: TextIO, verbose: bool) -> None:
        self.total, self.n_workers, self.stream, self.verbose = total, n_workers, stream, verbose
        self.tty = stream.isatty() and not verbose
        self.start = time.perf_counter()
        self.last = ""

    def update(self, study: optuna.Study, alive: int) -> None:
        c = _counts(study)
        top = best_trial(study)
        best = f"best {top.value:.4g} (trial {top.number})" if top is not None else "no complete trial yet"
        line = (
            f"[{c['COMPLETE'] + c['PRUNED']}/{self.total}] {best} | pruned {c['PRUNED']} failed {c['FAIL']} "
            f"running {c['RUNNING']} | workers {alive}/{self.n_workers}"
        )
        if line == self.last:
            return
        self.last = line
        elapsed = f" | {time.perf_counter() - self.start:.1f}s"
        self.stream.write("\r" + (line + elapsed).ljust(110) if self.tty else line + elapsed + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _worker_env(index: int, n_workers: int, parent: str | None, url: str, tracking: str, gpu: str | None) -> dict[str, str]:
    import tuner

    env = dict(os.environ)
    env[LAUNCH_PID_ENV] = str(os.getpid())  # the worker ends when this process is gone
    # Workers import the same tuner as this process, wherever it comes from.
    env["PYTHONPATH"] = str(Path(tuner.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env[STORAGE_ENV] = url  # in the environment, not argv: argv is visible to every user in `ps`
    env["MLFLOW_TRACKING_URI"] = tracking
    env[WORKER_INDEX_ENV] = str(index)
    env[N_WORKERS_ENV] = str(n_workers)
    env.setdefault("OMP_NUM_THREADS", "1")
    if parent:
        env[PARENT_RUN_ENV] = parent
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def run_pool(
    spec: StudySpec,
    study: optuna.Study,
    *,
    n_workers: int,
    gpus: Sequence[str],
    total: int,
    url: str,
    tracking: str,
    parent_run_id: str | None,
    device: str,
    progress: bool = True,
    verbose: bool = False,
    stream: TextIO = sys.stderr,
) -> None:
    """Run ``n_workers`` ``tuner worker`` processes on the study (one per GPU with ``gpus``) until
    they end, with one progress line.

    Raises:
        TunerError: workers failed before the study reached ``total``; their log lines are in the message.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the workers are stopped (their trials FAIL).
    """
    worker_device = device
    if gpus:
        worker_device = "cuda" if device in ("auto", "cuda") else device
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    log_dir = Path(tempfile.mkdtemp(prefix=f"tuner-{spec.name}-workers-"))
    cmd = [sys.executable, "-m", "tuner", "worker", str(spec.source), "--n-trials", str(total), "--no-promote",
           "--no-progress", "--device", worker_device, "--seed", str(spec.seed)]  # launch --seed/--timeout reach the workers
    if spec.timeout is not None:
        cmd += ["--timeout", str(spec.timeout)]
    bar = _CombinedProgress(total, n_workers, stream, verbose) if progress else None
    try:
        for i in range(n_workers):
            log = log_dir / f"worker-{i}.log"
            logs.append(log)
            with open(log, "w") as out:
                env = _worker_env(i, n_workers, parent_run_id, url, tracking, gpus[i % len(gpus)] if gpus else None)
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        while any(p.poll() is None for p in procs):
            if bar:
                with contextlib.suppress(*storage_errors()):  # a database restart: workers reconnect
                    bar.update(study, sum(p.poll() is None for p in procs))
            time.sleep(0.5)
        if bar:
            bar.update(study, 0)
    except BaseException:
        _stop(procs)
        raise
    finally:
        if bar:
            bar.close()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        detail = "; ".join(f"worker {i} exit {rc}: {_tail(logs[i])}" for i, rc in failed)
        n_finished = finished_count(study)
        if n_finished < total:
            raise TunerError(
                f"{len(failed)} of {n_workers} workers failed and the study has {n_finished}/{total} finished trials: "
                f"{detail} (logs in {log_dir})"
            )
        print(f"warning: {len(failed)} of {n_workers} workers failed: {detail} (logs in {log_dir})", file=sys.stderr)
        return
    for log in logs:
        log.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        log_dir.rmdir()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM every worker (their running trial ends FAIL), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, end - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


def _tail(log: Path, n: int = 2) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(lines[-n:])[-400:] or "(no output)"
