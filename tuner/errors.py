"""The few exceptions callers branch on (the CLI maps every TunerError to exit code 2), and the
helpers their one-line messages share: the first line of an error, a URL without its password,
"did you mean", a missing database named with its fix."""

from __future__ import annotations

from typing import Iterable

__all__ = [
    "TunerError", "ConfigError", "DataError", "StorageError", "TrackingError", "ModelError", "did_you_mean", "first_line",
    "missing_database", "redact_url",
]


class TunerError(Exception):
    """An expected, user-fixable problem: the message names the problem and the fix."""


class ConfigError(TunerError):
    """The study file (or a command-line override of it) is invalid."""


class DataError(TunerError):
    """The CSV cannot be used as training data."""


class StorageError(TunerError):
    """The Optuna storage cannot be opened, or refuses this study."""


class TrackingError(TunerError):
    """The MLflow tracking store or model registry cannot be used."""


class ModelError(TunerError):
    """A registered model cannot be found, verified or applied to the input."""


def first_line(e: BaseException, hide: str = "") -> str:
    """The first line of an error (at most 300 characters), with the password of the URL ``hide``
    masked: database and MLflow errors repeat the URL they failed on, password included."""
    from urllib.parse import urlsplit

    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]  # callers go on with "; <the fix>"
    try:
        password = urlsplit(hide).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``word``, or ``""``."""
    import difflib

    options = list(choices)
    # a case slip ('Label' for 'label') first: difflib's ratio misses it on short names
    same = [c for c in options if c.lower() == word.lower()]
    close = same or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def missing_database(text: str, url: str) -> str | None:
    """A database server's ``database "x" does not exist`` (PostgreSQL) in words with the fix, else None.

    Both stores say it the same way: Optuna's storage and MLflow's tracking store."""
    import re
    from urllib.parse import urlsplit

    found = re.search(r'database "([^"]+)" does not exist', text)
    if found is None:
        return None
    name, parts = found.group(1), urlsplit(url)
    return (f"the server has no database {name!r} (create it once: createdb -h {parts.hostname or 'localhost'} "
            f"-p {parts.port or 5432} -U {parts.username or 'postgres'} {name})")


def redact_url(url: str) -> str:
    """Hide the password of a URL (``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
