"""The study-wide lock: one process at a time among all processes working on a study.

Taken to create the schemas, the study and the launch run once, by the gate to count the budget
and create a trial as one step, and to promote.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Any

from tuner.errors import StorageError, redact_url

__all__ = ["StudyLock"]


class StudyLock:
    """A lock held by one process at a time among all processes working on a study.

    PostgreSQL: a transaction-scoped advisory lock (released on commit, or by the server when the
    connection dies). SQLite: ``flock`` on ``<file>.lock`` beside the database (one host, as SQLite
    itself). Other databases: no lock (budget exactness then holds only for one worker).
    Re-entrant within a process: the gate takes it inside a launch step that holds it already.
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url, self.shown = url, redact_url(url)
        # Stable across processes and hosts (unlike hash()); PostgreSQL takes a bigint key.
        self.key = zlib.crc32(f"tuner-study:{study_name}".encode())
        self._engine: Any = None
        self._conn: Any = None
        self._file: Any = None
        self._depth = 0
        self.path: Path | None = None
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///").split("?")[0])
            self.path = db.with_name(db.name + ".lock")

    def __enter__(self) -> StudyLock:
        if self._depth == 0:
            if self.path is not None:
                self._lock_file()
            elif self.url.startswith("postgresql"):
                self._lock_postgres()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.commit()  # ends the transaction: the advisory lock goes with it
                conn.close()
            except Exception:  # the server went away: so did the lock
                with contextlib.suppress(Exception):
                    conn.invalidate()
                    conn.close()

    def _lock_file(self) -> None:
        import fcntl

        assert self.path is not None
        if not self.path.parent.is_dir():
            raise StorageError(
                f"storage folder {str(self.path.parent)!r} does not exist (from {self.shown}); "
                "create it or pass --storage"
            )
        try:
            self._file = open(self.path, "a")
        except OSError as e:
            raise StorageError(
                f"cannot create the study lock {str(self.path)!r}: {e.strerror}; pass a writable --storage"
            ) from None
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def _lock_postgres(self) -> None:
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url, pool_pre_ping=True, pool_size=1, connect_args={"connect_timeout": 10}
            )
        try:
            conn = self._engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.key})
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
            from tuner.study import cannot_open

            raise cannot_open(e, self.url) from None
        self._conn = conn

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
