"""Ctrl-C and SIGTERM that end a launch cleanly and are never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; inside a garbage-collector
callback (SQLAlchemy registers some) the exception is printed as "Exception ignored" and dropped,
and the launch would go on as if nothing happened. So the handler records the signal. During a
trial it only records it, and the epoch hook raises at the end of the epoch (a second signal
raises at once); elsewhere it also raises at once. The trial loop checks the record between trials.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["install", "check", "deferred"]

_received: int | None = None
_deferred = False


def install() -> None:
    """Handle SIGINT and SIGTERM alike (Optuna fails a trial on KeyboardInterrupt, not on SIGTERM)."""
    global _received
    _received = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handle)


def _handle(signum: int, frame: Any) -> None:
    global _received
    repeated = _received is not None
    _received = signum
    if not _deferred or repeated:
        raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if a signal came in since ``install()``."""
    if _received is not None:
        raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: a first signal is only recorded, for ``check()`` at the next safe point."""
    global _deferred
    previous, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = previous
