"""The one place trials come from, and the one heartbeat of the trials in flight.

``TrialGate.ask`` is how the sequential loop, the fused loop and every worker get a trial:

- under the study-wide lock (``StudyLock``: flock beside SQLite, advisory lock on PostgreSQL),
- the study is read once, and stale trials are failed (``study.fail_stale_trials``: their MLflow
  runs are ended and a retry is queued through the storage's one ``StaleTrials`` callback) when
  the read shows another process's RUNNING trial (this process's own are beaten, never stale),
- finished + running trials are counted against ``n_trials``, so every process together stops at
  exactly ``n_trials`` finished trials (WAITING retries are what ``study.ask`` hands out first),
- the new trial's first heartbeat is recorded before it is handed out: a process killed right
  after has left a trial that the next stale check fails,
- when the free slots are all held by other processes' running trials, it waits for them: they
  finish, or their heartbeat stops and they are failed (or, on a storage without heartbeats, it
  gives up after ``max_wait`` with a message naming them).

``TrialGate.ask_many`` is the same for up to K trials under one hold of the lock and one read (a
fused loop refilling its free slots). ``TrialGate.tell`` is the one way back: the trial leaves the heartbeat, joins the finished view
(``gate.finished``: what the pruner and the budget read), and a trial another process failed as
stale meanwhile has its MLflow run realigned through the same listeners.

Optuna's ``HeartbeatThread`` beats one trial per ``study.optimize`` step; a fused loop holds K
trials at once, so ``Heartbeat`` is one thread beating every trial in flight, and a null object
where the storage keeps no heartbeats (no loop asks whether heartbeat is on).
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

from tuner import interrupts
from tuner.errors import StorageError, TunerError
from tuner.lock import StudyLock
from tuner.pruning import FinishedTrials
from tuner.study import (
    caused_by_storage,
    fail_stale_trials,
    fail_waiting_trials,
    heartbeat_storage,
    storage_alive,
    storage_errors,
    stored_trial,
    tell_trial,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["TrialGate", "Heartbeat", "STORAGE_RETRY_SECONDS"]

# Seconds a process keeps retrying a server storage that went away (a PostgreSQL restart).
STORAGE_RETRY_SECONDS = 60.0


class Heartbeat:
    """Records the heartbeat of every trial this process has in flight, from one thread, every
    ``interval`` seconds of the storage; the first beat of a trial is recorded at once."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = heartbeat_storage(study)
        self._interval = self._storage.get_heartbeat_interval() if self._storage is not None else None
        self._ids: set[int] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        if self._storage is None:
            return
        self._storage.record_heartbeat(trial_id)  # before the trial is handed out
        with self._mutex:
            self._ids.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="tuner-heartbeat", daemon=True)
            self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._mutex:
            self._ids.discard(trial_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat(self) -> None:
        assert self._storage is not None and self._interval is not None
        while not self._stop.wait(self._interval):
            with self._mutex:
                ids = sorted(self._ids)
            for trial_id in ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # storage away: the main thread meets it too, and says so
                    break


class TrialGate:
    """Hands out the trials of one study to one process, exactly ``n_trials`` finished in all.

    Args:
        study: the study (its sampler proposes the params at ``study.ask``).
        n_trials: the study's total of finished (COMPLETE + PRUNED) trials.
        lock: the study-wide lock shared by every process on the study.
        deadline: ``time.monotonic()`` after which ``ask`` hands out nothing more.
        on_lost: called with a trial that this process ran but another one failed (stale) or the
            storage lost; the launch ends its MLflow run there.
        reseed: called once, under the lock, before asking, with the number of trials in the
            study the first time the read shows another process's RUNNING trial
            (``study.reseed_sampler``: two launches with one seed would otherwise draw the same
            params; once is enough, their seeds differ from then on).
    """

    def __init__(
        self,
        study: optuna.Study,
        n_trials: int,
        lock: StudyLock,
        *,
        deadline: float | None = None,
        poll: float = 0.5,
        max_wait: float = 300.0,
        on_lost: Callable[[optuna.trial.FrozenTrial], None] | None = None,
        reseed: Callable[[int], None] | None = None,
    ) -> None:
        self.study, self.n_trials, self.lock = study, n_trials, lock
        self.deadline, self.poll, self.max_wait, self.on_lost = deadline, poll, max_wait, on_lost
        self.reseed = reseed
        self.heartbeat = Heartbeat(study)
        self.in_flight: dict[int, optuna.Trial] = {}
        self.finished = FinishedTrials(study)
        self.n_finished = 0
        self.n_asked = 0  # trials this gate handed out
        self._warned = False

    # -- handing out -----------------------------------------------------------------------

    def ask(self, *, wait: bool = True) -> optuna.Trial | None:
        """The next trial to run, or None: the study holds ``n_trials`` finished trials, the
        deadline passed, or (``wait=False``, or all the running trials are this process's) every
        free slot is held by a running trial.

        Raises:
            TunerError: other processes' trials held the last slots past ``max_wait`` on a storage
                without heartbeats (nothing can tell whether they are alive).
        """
        trials = self.ask_many(1, wait=wait)
        return trials[0] if trials else None

    def ask_many(self, n: int, *, wait: bool = True) -> list[optuna.Trial]:
        """Up to ``n`` trials under one hold of the lock and one read of the study (a fused loop
        refilling its free slots), each asked as ``ask`` asks one; fewer (or none) when the budget
        or the deadline says so. The same rules and errors as ``ask``."""
        from optuna.trial import TrialState

        waited_since: float | None = None
        while True:
            interrupts.check()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return []
            with self.lock:
                trials = self._read()
                self.finished.replace(trials)
                self.n_finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if self.n_finished >= self.n_trials:
                    self._drop_retries([t for t in trials if t.state == TrialState.WAITING])
                    return []
                free = self.n_trials - self.n_finished - len(running)
                if free > 0:
                    if self.reseed is not None and any(t._trial_id not in self.in_flight for t in running):
                        self.reseed(len(trials))  # another process asks too: a stream of its own, once
                        self.reseed = None
                    return [self._ask_one() for _ in range(min(n, free))]
            held = [t.number for t in running if t._trial_id not in self.in_flight]
            if not wait or not held:
                return []  # our own trials hold the slots: they end before we ask again
            waited_since = waited_since or time.monotonic()
            if not self._warned:
                warnings.warn(
                    f"the last trial slots are held by trials {held} of other processes; waiting for them "
                    "(a dead process's trial is failed once its heartbeat is older than the grace period)",
                    stacklevel=2,
                )
                self._warned = True
            if heartbeat_storage(self.study) is None and time.monotonic() - waited_since > self.max_wait:
                raise TunerError(
                    f"gave up after {self.max_wait:.0f}s waiting for trials {held}, RUNNING in other processes on a "
                    "storage without heartbeats; relaunch once they have ended"
                )
            time.sleep(self.poll)

    def _read(self) -> list[optuna.trial.FrozenTrial]:
        """The study's trials, once its stale trials are failed (call under the lock).

        One read of the study. Only another process's RUNNING trial can be stale (this process
        beats its own), so the stale check runs only when the read shows one: a launch that holds
        every running trial itself pays no stale check per ask.
        """
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        foreign = [t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in self.in_flight]
        if foreign and fail_stale_trials(self.study, running=foreign):
            trials = self.study.get_trials(deepcopy=False)  # read again: some trials are FAIL now
        return trials

    def _ask_one(self) -> optuna.Trial:
        """``study.ask`` (a WAITING retry first, if there is one); its first heartbeat recorded."""
        # A signal between the trial's creation and its entry in ``in_flight`` would leave it
        # RUNNING with nobody to fail it: it is held until the trial is in flight.
        with interrupts.deferred(), warnings.catch_warnings():
            # Optuna's note that heartbeats belong to study.optimize: this gate records them.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = self.study.ask()
            self.heartbeat.add(trial._trial_id)
            self.in_flight[trial._trial_id] = trial
            self.n_asked += 1
        return trial

    def _drop_retries(self, waiting: list[optuna.trial.FrozenTrial]) -> None:
        """A retry queued by a stale trial that no slot is left for: FAIL it, so nothing waits on it.
        Trials a user enqueued stay WAITING (a larger ``n_trials`` runs them)."""
        retries = [t._trial_id for t in waiting if "failed_trial" in t.system_attrs]
        if retries:
            fail_waiting_trials(self.study, retries, "not run: the study reached n_trials first")

    # -- the way back ----------------------------------------------------------------------

    def tell(
        self, trial: optuna.Trial, value: float | None = None, state: Any = None
    ) -> optuna.trial.FrozenTrial:
        """Tell the trial's outcome; returns it as stored (FAIL if another process failed it
        meanwhile as stale: its run is then realigned through ``on_lost``)."""
        from optuna.trial import TrialState

        try:
            frozen = tell_trial(self.study, trial, value, state)
        finally:
            self.heartbeat.discard(trial._trial_id)
            self.in_flight.pop(trial._trial_id, None)
        told = state if state is not None else TrialState.COMPLETE
        if frozen.state != told and self.on_lost is not None:
            self.on_lost(frozen)
        self.finished.add(frozen)
        if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self.n_finished += 1
        return frozen

    def fail_in_flight(self) -> None:
        """Tell FAIL to every trial this process holds (training raised; the storage came back)."""
        from optuna.trial import TrialState

        for trial in list(self.in_flight.values()):
            try:
                self.tell(trial, state=TrialState.FAIL)
            except Exception as e:  # the storage is still away: the stale check fails it later
                if not caused_by_storage(e):
                    raise
                self.in_flight.pop(trial._trial_id, None)
                self.heartbeat.discard(trial._trial_id)

    def recover(self, error: BaseException, url: str) -> None:
        """A server storage went away mid-trial (a PostgreSQL restart): wait for it, then fail
        the trials in flight. SQLite errors (disk full, read-only, locked, corrupt) do not pass
        with time: they end the launch with one line.

        Raises:
            StorageError: a SQLite storage error, or a server away for ``STORAGE_RETRY_SECONDS``.
        """
        import sys

        from tuner.errors import redact_url
        from tuner.study import storage_problem

        if url.startswith("sqlite"):
            raise StorageError(f"study storage {redact_url(url)} failed: {storage_problem(error, url)}") from None
        print(f"warning: study storage {redact_url(url)} failed ({storage_problem(error, url)}); reconnecting", file=sys.stderr)
        give_up = time.monotonic() + STORAGE_RETRY_SECONDS
        while True:
            try:
                storage_alive(self.study)
                break
            except storage_errors() as e:
                if time.monotonic() > give_up:
                    raise StorageError(
                        f"study storage {redact_url(url)} unreachable for {STORAGE_RETRY_SECONDS:.0f}s: "
                        f"{storage_problem(e, url)}; check that the database server is running"
                    ) from None
                time.sleep(1.0)
        lost = list(self.in_flight.values())
        self.fail_in_flight()
        if self.on_lost is not None:
            for trial in lost:
                self.on_lost(stored_trial(self.study, trial._trial_id))

    def close(self) -> None:
        self.heartbeat.close()
