"""Issue 12 (6): broken stores and exhausted resources end a launch with one line and exit 2 (no
traceback), and a launch killed while it creates the MLflow store leaves one the next launch uses.

Real processes and real files: `tuner launch` as a process (forked, or a fresh interpreter where
its stderr is judged), a SIGKILL mid-migration, a truncated SQLite file, a read-only bind mount
and a full tmpfs in a mount namespace of the launch's own (`unshare -m`: nothing outside it sees
the mounts, and they vanish with the process), and a real CPU allocation failure under an
address-space limit.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import CARS, mlflow_store, run_tuner, tuner_env, write_study
from faultkit import HEARTBEAT, champion, check_consistent, exit_code, fork_cli, load_trials

from tuner.config import load_spec


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_exit_2(r: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line, naming each of ``names``; returns it."""
    last = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    if "Traceback" in r.stderr:
        pytest.fail(f"exit {r.returncode} with a traceback of {r.stderr.count(chr(10))} lines ending {last!r}")
    if r.returncode != 2:
        pytest.fail(f"exit {r.returncode}, not 2; stderr ends {last!r}")
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-2000:]
    [line] = lines
    for name in names:
        assert name in line, line
    return line


# -- a kill while the MLflow store is being created -----------------------------------------


def _store_revision(db: Path) -> tuple[int, str | None] | None:
    """(number of tables, alembic revision) of a SQLite MLflow store being written; None if
    unreadable right now (the migrating process holds a lock)."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)) as conn:
            (n,) = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
            try:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.Error:
                row = None
    except sqlite3.Error:
        return None
    return n, (row[0] if row else None)


# Kill points: while the migrated empty store (the template, made once per MLflow version) is
# being built, and the moment the study's store appears. The store is copied from the template
# and linked into place, so it is never seen half-made (before, a kill 0.5 s after `mlflow.db`
# appeared left a half-migrated store that every later launch failed on).
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["building-the-template", "store-just-appeared"])
def test_a_launch_killed_while_it_creates_the_mlflow_store_leaves_a_store_the_next_launch_uses(
    tmp_path: Path, moment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.store.db.utils import _get_latest_schema_revision

    head = _get_latest_schema_revision()
    cache = tmp_path / "cache"  # a cache of its own: this launch builds the template
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    db = tmp_path / "mlflow.db"  # a new store: not the migrated template of mlflow_store()
    spec = load_spec(write_study(tmp_path, "birth", body=HEARTBEAT, n_trials=2, tracking_uri=f"sqlite:///{db}"))
    pid = fork_cli(["launch", str(spec.source), "--no-progress"], tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            building = [p for p in cache.glob("tuner/.*.building") if (_store_revision(p) or (0, None))[0] >= 20]
            if (moment == "building-the-template" and building) or (moment == "store-just-appeared" and db.exists()):
                break
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"the launch ended before the kill point ({moment})"
            assert time.monotonic() < deadline, f"{moment} not seen within 120s"
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
    # Whole or not at all: no half-made store, whatever the moment.
    assert not db.exists() or _store_revision(db) == (_store_revision(db) or (0, None))[:1] + (head,)

    r = run_tuner("launch", str(spec.source), "--no-progress", "--no-report", cwd=tmp_path, timeout=180)

    last = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    if r.returncode != 0 or "Traceback" in r.stderr:
        pytest.fail(f"after a kill at {moment}: exit {r.returncode}, stderr {r.stderr.count(chr(10))} lines ending {last!r}")
    assert "alias champion" in r.stdout
    assert champion(spec) is not None
    check_consistent(spec)


def test_a_half_made_mlflow_store_is_one_line_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    """A store an older tuner left half-migrated (killed mid-migration): named, with the fix."""
    db = tmp_path / "mlflow.db"
    mlflow_store(db)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f5a4f2784254'")  # a revision from the middle
        conn.commit()
    study = write_study(tmp_path, "half", n_trials=2, tracking_uri=f"sqlite:///{db}")

    r = run_tuner("launch", str(study), "--no-progress", cwd=tmp_path, timeout=120)

    line = assert_one_line_exit_2(r, str(db), "f5a4f2784254")
    assert "move it away and relaunch" in line and "mlflow db upgrade" in line
    assert not (tmp_path / "half.db").exists() or load_trials(load_spec(study)) == []  # no trial ran


def test_a_truncated_mlflow_store_is_one_line_naming_the_file(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    mlflow_store(db)
    os.truncate(db, db.stat().st_size // 3)  # a copy cut short, or a disk that lost its tail
    study = write_study(tmp_path, "cut", n_trials=2, tracking_uri=f"sqlite:///{db}")

    r = run_tuner("launch", str(study), "--no-progress", cwd=tmp_path, timeout=120)

    assert_one_line_exit_2(r, str(db))


# -- read-only store, full disk: mounts in a namespace of the launch's own ------------------


def _unshare_ok() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) for a private mount namespace"
    r = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"], capture_output=True, timeout=30)
    if r.returncode != 0:
        return f"mounting in a private namespace is not permitted here ({r.stderr.decode(errors='replace').strip()})"
    return None


def _in_namespace(setup: str, *tuner_args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``setup`` (shell, mounts) then `python -m tuner ARGS`, in a mount namespace of their own."""
    tuner = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tuner", *tuner_args])
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-ec", f"{setup}\nexec {tuner}"],
        cwd=cwd, env=tuner_env(), capture_output=True, text=True, timeout=timeout,
    )


def test_a_read_only_mlflow_store_is_one_line_naming_the_file(tmp_path: Path) -> None:
    # chmod 0444 does not stop root (tests run as root here): a read-only bind mount of the file does.
    why = _unshare_ok()
    if why:
        pytest.skip(why)
    db = tmp_path / "mlflow.db"
    mlflow_store(db)
    study = write_study(tmp_path, "ro", n_trials=2, tracking_uri=f"sqlite:///{db}")
    f = shlex.quote(str(db))

    r = _in_namespace(f"mount --bind {f} {f}\nmount -o remount,ro,bind {f} {f}", "launch", str(study), "--no-progress", cwd=tmp_path)

    assert_one_line_exit_2(r, str(db))


@pytest.mark.parametrize("free_kb", [0, 400], ids=["full-before-the-launch", "fills-during-the-study"])
def test_a_full_study_folder_is_one_line_and_exit_2(tmp_path: Path, free_kb: int) -> None:
    why = _unshare_ok()
    if why:
        pytest.skip(why)
    # 30 quick trials: with 400 KB free the storage is created and fills during the trials.
    source = write_study(tmp_path, "full", n_trials=30, execution="sequential", tracking_uri=mlflow_store(tmp_path / "mlflow.db"))
    folder = tmp_path / "study"  # a 4 MB tmpfs, filled but ``free_kb``: the study file fits
    folder.mkdir()
    d, s = shlex.quote(str(folder)), shlex.quote(str(source))
    count = "" if free_kb == 0 else f" count={(4096 - free_kb) // 4}"
    setup = f"mount -t tmpfs -o size=4m tmpfs {d}\ncp {s} {d}/\ndd if=/dev/zero of={d}/filler bs=4k{count} 2>/dev/null || true"

    r = _in_namespace(setup, "launch", str(folder / source.name), "--no-progress", "--no-report", cwd=tmp_path)

    line = assert_one_line_exit_2(r)
    assert str(folder) in line or "space" in line.lower() or "full" in line.lower(), line


def test_predictions_to_a_full_disk_are_one_line_and_exit_2(tmp_path: Path) -> None:
    why = _unshare_ok()
    if why:
        pytest.skip(why)
    from tuner.session import launch

    tracking = mlflow_store(tmp_path / "mlflow.db")
    spec = load_spec(write_study(tmp_path, "champ", n_trials=1, execution="sequential", tracking_uri=tracking))
    launch(spec, progress=False, report=False)
    full = tmp_path / "full"  # a 64 KB tmpfs, filled: the predictions cannot be written there
    full.mkdir()
    d = shlex.quote(str(full))
    setup = f"mount -t tmpfs -o size=64k tmpfs {d}\ndd if=/dev/zero of={d}/filler bs=4k 2>/dev/null || true"
    big = tmp_path / "cars1000.csv"  # ~1000 rows: more than a page of predictions
    text = CARS.read_text().splitlines()
    big.write_text("\n".join([text[0], *(text[1:] * 32)]) + "\n")

    r = _in_namespace(setup, "predict", f"{spec.model_name}@champion", "--input", str(big), "--output", str(full / "p.csv"),
                      "--tracking-uri", tracking, cwd=tmp_path)

    line = assert_one_line_exit_2(r, str(full / "p.csv"))
    assert "No space left on device; free some space or pass another path" in line, line


# -- CPU out of memory ---------------------------------------------------------------------

MEMORY_LIMIT = 16 << 30  # address space of the launch: a 40 GB layer fails at once, on any machine


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_cpu_out_of_memory_fails_each_trial_with_the_reason_and_stops_in_one_line(tmp_path: Path, execution: str) -> None:
    """hidden_size 100000 x 2 layers: a 10^10-weight layer (40 GB) the CPU allocator refuses. Every
    trial ends FAIL with a reason naming memory; after MAX_FAILED_IN_A_ROW the launch stops with one
    line and exit 2."""
    from tuner.runners import MAX_FAILED_IN_A_ROW

    space = (
        'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
        'epochs = { type = "fixed", value = 2 }\n'
        'batch_size = { type = "fixed", value = 8 }\n'
        'hidden_size = { type = "fixed", value = 100000 }\n'
        'n_layers = { type = "fixed", value = 2 }\n'
        'activation = { type = "fixed", value = "relu" }\n'
    )
    study = write_study(
        tmp_path, "oom", body=HEARTBEAT, space=space, n_trials=8, execution=execution,
        tracking_uri=mlflow_store(tmp_path / "mlflow.db"),
    )

    r = run_tuner("launch", str(study), "--no-progress", cwd=tmp_path, timeout=180, preexec_fn=_limit_memory)

    line = assert_one_line_exit_2(r)
    assert "memory" in line, line
    trials = load_trials(load_spec(study))
    assert trials and all(t.state.name == "FAIL" for t in trials), [t.state.name for t in trials]
    assert len(trials) <= max(MAX_FAILED_IN_A_ROW, 8)
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials]
    assert all("memory" in reason for reason in reasons), reasons
    check_consistent(load_spec(study))

