"""Read-only views of stored studies: ``tuner best``, ``tuner studies``, ``tuner trials``.

Nothing here creates a store: a SQLite file that is not there is a one-line error naming it and
``tuner launch`` (``tuner.stores``). Tables are plain text with columns padded to their widest
cell, so values of any size stay apart.
"""

from __future__ import annotations

import csv
import io
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tuner.errors import StorageError, TrackingError, TunerError, redact_url
from tuner.stores import require_storage, resolve_sqlite_url

if TYPE_CHECKING:

    from tuner.config import StudySpec

__all__ = [
    "check_served_address",
    "launch_summary",
    "format_table",
    "fmt_value",
    "studies_table",
    "studies_report",
    "metrics_table",
    "estimate_line",
    "best_info",
    "StudyRow",
    "list_studies",
    "find_storages",
    "storage_of",
    "TRIAL_COLUMNS",
    "trial_table",
    "trials_csv",
    "open_existing_storage",
]

FINISHED = ("COMPLETE", "PRUNED")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None, gap: int = 2) -> str:
    """Text table: each column as wide as its widest cell, ``gap`` spaces between columns.

    ``align``: one ``l`` or ``r`` per column; default: numbers right, text left. Floats are
    written with ``fmt_value``.
    """
    cells = [[fmt_value(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    if align is None:
        align = "".join("r" if rows and all(_is_number(r[i]) or r[i] is None for r in rows) else "l" for i in range(len(header)))
    sep = " " * gap

    def line(values: Sequence[str]) -> str:
        return sep.join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(list(header)), *(line(r) for r in cells)])


def fmt_value(v: Any) -> str:
    """A float with 6 significant digits (``31918.5``, ``0.00123457``); None empty; others ``str``."""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def open_existing_storage(url: str, study: str | Path | None = None) -> Any:
    """The Optuna storage at ``url``, refused (never created) when its SQLite file is missing.

    Raises:
        StorageError: the file is missing or the database cannot be opened.
    """
    from tuner.study import open_storage

    require_storage(url, study)
    return open_storage(url)


def metrics_table(tuned: dict[str, float], baselines: dict[str, dict[str, float]], *, label: str = "validation") -> str:
    """The launch summary's table: the tuned model beside the baselines, one column per metric,
    on the validation scheme (``label``) or on the test part."""
    metrics = [k for k in ("rmse", "mae", "r2", "accuracy", "log_loss", "f1_macro") if k in tuned]
    rows = [["tuned model", *(f"{tuned[m]:.4f}" for m in metrics)]]
    rows += [[name, *(f"{values[m]:.4f}" if m in values else "" for m in metrics)] for name, values in baselines.items()]
    return format_table([label, *metrics], rows, align="l" + "r" * len(metrics))


def estimate_line(selected: float | None, test: dict[str, float], metric: str, rows: int) -> str:
    """The champion's selection value beside its honest estimate, in one line."""
    chosen = f"{selected:.4g} on validation (what chose it), " if selected is not None else ""
    return f"estimate: {metric} {chosen}{test[metric]:.4g} on the {rows} untouched test rows (the honest estimate)"


# -- tuner best --------------------------------------------------------------------------------


def best_info(spec: StudySpec, *, storage: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """The best trial of a stored study with its MLflow run and the registered champion.

    Raises:
        StorageError: the storage or the study does not exist (nothing is created).
        TrackingError: the MLflow store or the study's experiment does not exist.
        TunerError: the study has no complete trial yet.
    """
    from tuner.lineage import best_links
    from tuner.selection import best_trial
    from tuner.study import finished_count, open_study
    from tuner.tracking import Tracker

    study = open_study(spec, storage, create=False)
    best = best_trial(study)
    if best is None:
        raise TunerError(f"study {spec.name!r} has no complete trial yet; run `tuner launch` first")
    tracker = Tracker(tracking_uri or spec.tracking, spec.name, create=False)
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id and tracker.run_status(run_id) is None:
        raise TrackingError(
            f"MLflow run {run_id} of trial {best.number} is not in {redact_url(tracker.tracking_uri)}: study "
            f"{spec.name!r} was launched with another MLflow store; pass the --tracking-uri its launch used"
        )
    champion = tracker.champion(spec.model_name)
    info: dict[str, Any] = {
        "study": spec.name,
        "storage": redact_url(storage or spec.storage_url),
        "tracking_uri": redact_url(tracker.tracking_uri),
        "n_finished": finished_count(study),
        "best_trial": best.number,
        "value": best.value,
        "metric": spec.metric,
        "params": dict(best.params),
        "metrics": {k: v for k, v in best.user_attrs.items() if isinstance(v, float)},
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "validation": study.user_attrs.get("validation"),
        "baselines": study.user_attrs.get("baselines", {}),
        "columns": study.user_attrs.get("columns"),
        "ensemble": study.user_attrs.get("ensemble"),  # tuner.ensemble's last selection
    }
    from tuner.promotion import champion_verdict

    test_baselines = study.user_attrs.get("test_baselines") or {}
    test, beats, text = champion_verdict(spec, study, best, info["metrics"], info["baselines"], test_baselines)
    if test is not None:  # the champion's test estimate (validation.test_fraction)
        info["test"], info["test_baselines"] = test, test_baselines
    if info["baselines"]:  # the launch summary's verdict
        info["beats_baselines"], info["verdict"] = beats, text
    if champion is not None:
        info["champion"] = {
            "model_uri": f"models:/{spec.model_name}@champion",
            "version": champion.version,
            "trial": champion.tags.get("tuner.trial"),
            "value": champion.tags.get("tuner.value"),
            "ensemble": champion.tags.get("tuner.ensemble"),
        }
    info.update(best_links(study, best, spec=spec, tracker=tracker))
    return info


# -- tuner studies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    """One study of a storage, as ``tuner studies`` lists it."""

    name: str
    direction: str
    metric: str | None
    n_trials: int  # every trial, whatever its state
    n_complete: int
    n_pruned: int
    n_failed: int
    n_running: int
    best_value: float | None
    best_trial: int | None


def storage_of(target: str) -> str:
    """A storage named on the command line: a URL as it is, a ``.db`` file, or a study file (its
    storage: ``storage`` in it, else the ``.db`` beside it)."""
    if "://" in target:
        return target
    path = Path(target)
    if path.suffix == ".toml":
        return _study_file_storage(path)
    return f"sqlite:///{path.resolve()}"


def _study_file_storage(path: Path) -> str:
    from tuner.stores import default_storage_url

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"cannot read study file {str(path)!r}: {e}") from None
    given = raw.get("storage")
    if isinstance(given, str):
        return resolve_sqlite_url(given, path.resolve().parent)
    return default_storage_url(path)


def find_storages(folder: Path | None = None) -> list[str]:
    """The existing storages of the study files in ``folder`` (default: here) and its ``studies/``."""
    from tuner.stores import sqlite_path

    folder = folder or Path.cwd()
    urls: list[str] = []
    for study_file in sorted([*folder.glob("*.toml"), *(folder / "studies").glob("*.toml")]):
        if study_file.name == "pyproject.toml":
            continue
        try:
            url = _study_file_storage(study_file)
        except StorageError:
            continue
        path = sqlite_path(url)
        if url not in urls and (path is None or path.is_file()):
            urls.append(url)
    return urls


def list_studies(storage: str) -> list[StudyRow]:
    """Every study in a storage with its trial counts and best value.

    Raises:
        StorageError: the SQLite file does not exist (it is not created) or cannot be opened.
    """
    import optuna

    opened = open_existing_storage(storage)
    rows = []
    from tuner.selection import best_trial

    for summary in optuna.get_all_study_summaries(opened, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=opened)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        best = best_trial(study)
        rows.append(
            StudyRow(
                name=summary.study_name,
                direction=summary.direction.name.lower(),
                metric=summary.user_attrs.get("metric"),
                n_trials=len(states),
                n_complete=states.count("COMPLETE"),
                n_pruned=states.count("PRUNED"),
                n_failed=states.count("FAIL"),
                n_running=states.count("RUNNING") + states.count("WAITING"),
                best_value=best.value if best is not None else None,
                best_trial=best.number if best is not None else None,
            )
        )
    return rows


def studies_table(rows: Sequence[StudyRow]) -> str:
    header = ["study", "metric", "direction", "trials", "complete", "pruned", "failed", "running", "best value", "best trial"]
    return format_table(
        header,
        [
            [r.name, r.metric or "", r.direction, r.n_trials, r.n_complete, r.n_pruned, r.n_failed, r.n_running,
             r.best_value, r.best_trial]
            for r in rows
        ],
    )


def studies_report(target: str | None = None) -> str:
    """``tuner studies``: a table per storage (``target``: see ``storage_of``; None: the storages
    of the study files here and in ``studies/``).

    Raises:
        StorageError: no storage given or found, or a SQLite file that does not exist.
    """
    urls = [storage_of(target)] if target else find_storages()
    if not urls:
        raise StorageError(
            "no study storage found: no study file with an existing storage in . or studies/; "
            "pass STORAGE (a URL, a .db file or a study file), or run `tuner launch STUDY` first"
        )
    parts = []
    for url in urls:
        rows = list_studies(url)
        parts.append(f"storage {redact_url(url)}: {len(rows)} " + ("study" if len(rows) == 1 else "studies"))
        if rows:
            parts.append(studies_table(rows))
    return "\n".join(parts)


# -- tuner trials ------------------------------------------------------------------------------

TRIAL_COLUMNS = ("number", "state", "value", "duration_s")


def _trial_rows(spec: StudySpec, storage: str | None) -> tuple[list[str], list[list[Any]]]:
    from tuner.study import open_study

    study = open_study(spec, storage, create=False)
    trials = study.get_trials(deepcopy=False)
    names = [n for n in spec.space if any(n in t.params for t in trials)]
    names += sorted({n for t in trials for n in t.params} - set(names))
    header = [*TRIAL_COLUMNS, *names, "started", "mlflow_run_id"]
    rows = []
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        started = t.datetime_start.strftime("%Y-%m-%d %H:%M:%S") if t.datetime_start else None
        rows.append(
            [t.number, t.state.name, t.value, duration, *(t.params.get(n) for n in names), started,
             t.user_attrs.get("mlflow_run_id")]
        )
    return header, rows


def trial_table(spec: StudySpec, *, storage: str | None = None, wide: bool = False) -> str:
    """``tuner trials``: one row per trial (number, state, value, duration, params); ``wide``
    adds the start time and the MLflow run id.

    Raises:
        StorageError: the storage or the study does not exist (nothing is created).
    """
    header, rows = _trial_rows(spec, storage)
    header[2] = spec.metric
    if not wide:
        header, rows = header[:-2], [r[:-2] for r in rows]
    for r in rows:
        if r[3] is not None:
            r[3] = round(r[3], 1)
    return format_table(header, rows)


def trials_csv(spec: StudySpec, *, storage: str | None = None) -> str:
    """``tuner trials --csv``: every trial with all columns, values at full precision."""
    header, rows = _trial_rows(spec, storage)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in r] for r in rows])
    return buf.getvalue()


def launch_summary(s: Any) -> str:
    """What ``tuner launch`` prints when it ends: counts, scheme, best trial, metrics beside the
    baselines (and on the test part), the verdict, the registered model."""
    lines = [f"study {s.study_name}: {s.n_finished}/{s.n_trials} finished trials ({s.n_run} run now, "
             f"{s.wall_seconds:.1f}s) in {s.storage}"]
    if s.note:
        lines.append(s.note)
    if s.task_note:
        lines.append(f"{s.task_note} (set task in the study file to override)")
    if s.validation:
        lines.append(f"validation: {s.validation}")
    if s.best_number is None:
        return "\n".join([*lines, "no complete trial: nothing to register"])
    fmt = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in s.best_params.items()}
    lines.append(f"best trial {s.best_number}: " + ", ".join(f"{k}={v}" for k, v in fmt.items()))
    lines.append(metrics_table(s.best_metrics, s.baselines))
    if s.test_metrics:
        lines.append(metrics_table(s.test_metrics, s.test_baselines or {}, label="test"))
        lines.append(estimate_line(s.best_metrics.get(s.metric), s.test_metrics, s.metric, s.test_rows))
    if s.verdict:
        lines.append(("" if s.beats_baselines else "WARNING: ") + s.verdict)
    if s.promotion is not None:
        p = s.promotion
        state = "registered" if p.new_version else "already registered"
        lines.append(f"model {state}: {p.model_uri} -> alias {p.alias} (models:/{p.model_name}@{p.alias})")
        if p.ensemble:
            lines.append(p.ensemble)
    return "\n".join(lines)


def check_served_address(host: str, port: int) -> None:
    """Refuse an address a server cannot listen on before it starts (optuna-dashboard and MLflow
    would fail seconds later with a traceback, or exit 0), and warn where the network can read.

    Raises:
        TunerError: not a port number, or the address is taken or cannot be bound.
    """
    import socket
    import sys

    if not 0 < port < 65536:
        raise TunerError(f"--port {port} is not a port number; pass one from 1 to 65535")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {host}: anyone who can reach this address can read the studies", file=sys.stderr)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        raise TunerError(f"cannot serve on {host}:{port}: {e.strerror or e}; pass another --port (or --host)") from None
