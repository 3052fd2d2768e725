"""Ctrl-C and SIGTERM that cannot get lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives; inside a
``__del__`` or weakref callback (SQLAlchemy runs some at every session close) the exception is
printed as "Exception ignored" and dropped, and the launch would run on. The handler therefore
also records the request, and the training loop's epoch hook raises it again at a safe point.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

__all__ = ["install", "check", "deferred", "requested"]

_requested = threading.Event()
_previous_hook: Any = sys.unraisablehook
_deferred = 0  # > 0: inside ``deferred()``, the handler records the signal without raising


def _handler(signum: int, frame: Any) -> None:
    _requested.set()
    if not _deferred:
        raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
        return  # dropped inside a callback: ``check()`` raises it again, no traceback for the user
    _previous_hook(unraisable)


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt and stay requested until the process ends
    (Optuna turns KeyboardInterrupt, not SIGTERM, into a FAIL trial)."""
    global _previous_hook
    _requested.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    if sys.unraisablehook is not _unraisable:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable


def requested() -> bool:
    """Whether Ctrl-C or SIGTERM was received (what a trial that raised anything then ended by)."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a signal was received (and possibly swallowed) earlier."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM are recorded, not raised where they land; ``check()`` still raises
    (so a wait inside that checks stays interruptible), and leaving raises a request received. Used
    where a trial is asked and begun, so that no trial is left in flight without its MLflow run."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
    if not _deferred:  # nested: the outermost raises, once all of it has run
        check()
