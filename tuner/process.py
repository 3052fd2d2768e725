"""What a ``tuner`` command sets for its own process; ``tuner.cli.main`` calls ``setup`` once.

A program that imports tuner as a library keeps its interpreter as it is. Both settings were
measured with ``python -m benchmarks.fixed_cost`` (docs/performance.md):

- **A rarer garbage collector.** Python collects every 700 new objects; a launch makes millions as
  it imports MLflow's ORM, plotly and the stores, and collecting that often cost ~1 s (20%) of a
  1-trial launch. Collect every 50,000, as freqtrade does (``freqtrade/util/gc_setup.py``).
- **A quick exit.** At exit CPython frees every object of every module one by one: 1.2 s after a
  1-trial launch of 4 s. The process's database connections are closed first (the last one to a
  SQLite file folds its ``-wal`` file into the database and removes it, so the file alone holds
  every write), then the heap is frozen (``gc.freeze``): the interpreter leaves the memory to the
  operating system. Instagram's ``atexit.register(os._exit, 0)``, gentler: atexit handlers, stdio
  flushing and torch's C++ exit still run.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import weakref
from typing import Any

__all__ = ["GC_THRESHOLD", "setup"]

GC_THRESHOLD = (50_000, 20, 20)  # Python's default: (700, 10, 10)

# SQLAlchemy's record of each open DBAPI connection, of every engine (tuner's, Optuna's, MLflow's);
# weak, so a pool that is dropped takes its records with it.
_connections: weakref.WeakSet[Any] = weakref.WeakSet()


def setup() -> None:
    """Set the collector and register the quick exit (once per process)."""
    gc.set_threshold(*GC_THRESHOLD)
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if event.contains(Pool, "connect", _opened):
        return
    event.listen(Pool, "connect", _opened)
    # Registered before anything imports MLflow or Optuna, so it runs after their atexit handlers.
    atexit.register(_quick_exit)


def _opened(dbapi_connection: Any, connection_record: Any) -> None:
    _connections.add(connection_record)


def _quick_exit() -> None:
    for record in list(_connections):
        with contextlib.suppress(Exception):  # one a thread still holds stays open: no data is lost
            if record.dbapi_connection is not None:
                record.dbapi_connection.close()
    gc.freeze()
