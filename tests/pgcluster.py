"""A throwaway PostgreSQL cluster for tests that stop or restart the server: `initdb` into a
temporary folder, a free loopback port, its unix socket in that folder, stopped and removed at
the end. The machine's own server (127.0.0.1:5432) is never touched.

initdb refuses to run as root: as root, the server binaries run as the ``postgres`` OS user
(``runuser -u postgres --``) and the folder is owned by that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgCluster", "pg_bin", "PG_CLUSTER_MISSING"]


def pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL server binary (initdb, pg_ctl): on PATH, else Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)  # newest first
    return candidates[0] if candidates else None


def _missing() -> str | None:
    for name in ("initdb", "pg_ctl"):
        if pg_bin(name) is None:
            return f"{name} (PostgreSQL server binaries) to start a throwaway cluster"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "a 'postgres' OS user to run initdb as (it refuses root)"
        if shutil.which("runuser") is None:
            return "runuser to run initdb as the postgres user"
    return None


PG_CLUSTER_MISSING = _missing()


class PgCluster:
    """One PostgreSQL server of its own: ``start()``, ``restart()``, ``stop()``, ``url(db)``."""

    def __init__(self, port: int, *, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        # Not pytest's tmp_path: that folder is 0700 root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="tuner-pgcluster-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.startup_seconds: float | None = None  # initdb + first start, measured

    # -- server -------------------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}\n{self._log_tail()}")
        return r

    def _log_tail(self) -> str:
        try:
            return "server log: " + " / ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return ""

    def init(self) -> None:
        started = time.monotonic()
        # Trust on loopback and the socket only; no fsync: a test cluster holds nothing to keep.
        self._run(pg_bin("initdb") or "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        self.startup_seconds = time.monotonic() - started

    def start(self) -> None:
        started = time.monotonic()
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        self._run(pg_bin("pg_ctl") or "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options)
        self.startup_seconds = (self.startup_seconds or 0.0) + time.monotonic() - started

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would, no checkpoint); a no-op if it is down."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(pg_bin("pg_ctl") or "pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))

    def restart(self) -> None:
        """What a server restart does to its clients: every connection dropped, then up again."""
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        """Stop the server (immediately; killed if pg_ctl fails) and remove its folder."""
        try:
            self.stop("immediate")
        except Exception:
            self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)  # the postmaster of this cluster only (its pid file)
        except ProcessLookupError:
            pass

    # -- clients ------------------------------------------------------------------------------

    def is_up(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            f"host={self.host} port={self.port} user=postgres dbname=postgres", autocommit=True, connect_timeout=10
        ) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """A new database on this cluster, as a tuner storage URL."""
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres:pw-not-checked@{self.host}:{self.port}/{database}"
