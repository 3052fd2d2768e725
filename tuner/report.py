"""A study report a user can share: one self-contained HTML file plus a PNG per plot.

The Optuna plots come from ``optuna.visualization`` (plotly, interactive in the HTML, plotly.js
inlined once so the file opens offline) and ``optuna.visualization.matplotlib`` (the PNGs: no
browser or kaleido needed). Besides Optuna's plots: the champion's predicted-vs-actual on the
validation rows (all rows, marked in-sample, for a champion refit on them) and the comparison
with the baselines (mean predictor, least squares).

``tuner report STUDY`` writes it on demand; every launch logs it on its parent MLflow run.
"""

from __future__ import annotations

import html
import importlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tuner.errors import DataError, first_line
from tuner.selection import best_trial

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from tuner.config import StudySpec
    from tuner.data import Prepared
    from tuner.tracking import Tracker

__all__ = ["SECTIONS", "ReportFiles", "write_report", "build_report", "log_launch_report"]

# section id -> title; the ids name the PNG files and the HTML sections.
SECTIONS: dict[str, str] = {
    "history": "Optimisation history",
    "importances": "Parameter importances",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plots",
    "intermediate_values": "Intermediate values (pruned trials included)",
    "predicted_vs_actual": "Champion: predicted vs actual",
    "baselines": "Baseline comparison (validation rows)",
}


@dataclass
class ReportFiles:
    """What ``write_report`` produced: the HTML file, one PNG per section that could be drawn,
    and why the others could not (e.g. importances need two complete trials)."""

    html: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def folder(self) -> Path:
        return self.html.parent


@dataclass
class _Champion:
    label: str
    actual: Any  # numpy array, target units (or class labels)
    predicted: Any
    rows: str = "validation rows"  # what the points are, for the legend and the caption


def _optuna_plots(full: bool) -> dict[str, tuple[Callable[..., Any], Callable[..., Any] | None]]:
    """Each section's plotly function and, where PNGs are drawn, its matplotlib twin."""
    vis = _plotly_visualization() if not full else importlib.import_module("optuna.visualization")
    names = {
        "history": "plot_optimization_history",
        "importances": "plot_param_importances",
        "parallel_coordinate": "plot_parallel_coordinate",
        "slice": "plot_slice",
        "intermediate_values": "plot_intermediate_values",
    }
    vmpl = importlib.import_module("optuna.visualization.matplotlib") if full else None
    return {key: (getattr(vis, name), getattr(vmpl, name) if vmpl else None) for key, name in names.items()}


def _plotly_visualization() -> Any:
    """``optuna.visualization`` without its matplotlib half. The package imports
    ``optuna.visualization.matplotlib`` and through it pyplot (0.6-0.7 s on 2 cores) though a
    launch draws no PNG; matplotlib is hidden for that one import (Optuna defers a missing
    matplotlib to the first matplotlib plot) and the half-loaded submodule is dropped after, so a
    later ``import optuna.visualization.matplotlib`` (``tuner report`` in the same process) loads
    it afresh with matplotlib present."""
    if "optuna.visualization" in sys.modules or "matplotlib" in sys.modules:
        return importlib.import_module("optuna.visualization")
    sys.modules["matplotlib"] = None  # type: ignore[assignment]  # `import matplotlib` -> ImportError
    try:
        vis = importlib.import_module("optuna.visualization")
    finally:
        del sys.modules["matplotlib"]
        for name in [n for n in sys.modules if n.startswith("optuna.visualization.matplotlib")]:
            del sys.modules[name]
    vars(vis).pop("matplotlib", None)
    return vis


def write_report(
    study: optuna.Study,
    spec: StudySpec,
    output: Path,
    *,
    prepared: Prepared,
    frame: pd.DataFrame,
    tracker: Tracker | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
    full: bool = True,
) -> ReportFiles:
    """Write ``output`` (HTML) and ``<stem>.<section>.png`` beside it. ``full=False`` is what a
    launch logs: the interactive HTML without PNGs and without parameter importances (matplotlib,
    and the fANOVA behind importances, which imports scikit-learn: seconds of every launch);
    ``tuner report`` draws them.

    Args:
        study: the stored study.
        spec: its definition (metric, target, registered model name).
        prepared, frame: the study's split and raw CSV (validation rows for the champion plot).
        tracker: reads the champion's weights from MLflow; None leaves that section out.
        baselines: validation metrics of the reference models (computed when None).
    """
    import optuna
    import plotly.graph_objects as go

    plt: Any = _Discard()
    if full:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt

    from tuner.baselines import baselines as compute_baselines

    started = time.perf_counter()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html=output)
    figures: dict[str, Any] = {}
    prepared = prepared.to("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib plots are "experimental"; empty-study warnings
        n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        for key, (plotly_fn, mpl_fn) in _optuna_plots(full).items():
            if n_complete == 0 and key != "intermediate_values":
                # Optuna would draw an empty frame; say why instead.
                files.skipped[key] = "no complete trial yet"
                continue
            if key == "importances" and not full:
                files.skipped[key] = "drawn by `tuner report` (fANOVA: seconds a launch does not spend)"
                continue
            try:
                figures[key] = plotly_fn(study)
                if mpl_fn is None:
                    continue
                axes = mpl_fn(study)
            except Exception as e:  # e.g. importances with fewer than two complete trials
                files.skipped[key] = first_line(e)
                continue
            fig = _figure_of(axes)
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            files.pngs[key] = _save_png(fig, output, key)
            plt.close(fig)

        champion = None
        if tracker is not None:
            try:
                champion = _champion(study, spec, prepared, frame, tracker)
            except Exception as e:  # no complete trial, weights missing, store unreachable
                files.skipped["predicted_vs_actual"] = first_line(e)
        else:
            files.skipped["predicted_vs_actual"] = "no MLflow tracker given"
        if champion is not None:
            figures["predicted_vs_actual"], png_fig = _predicted_vs_actual(champion, spec, go, plt)
            if full:
                files.pngs["predicted_vs_actual"] = _save_png(png_fig, output, "predicted_vs_actual")
            plt.close(png_fig)

        table = _comparison(study, spec, baselines if baselines is not None else compute_baselines(prepared))
        if table:
            figures["baselines"], png_fig = _baseline_plot(table, spec.metric, go, plt)
            if full:
                files.pngs["baselines"] = _save_png(png_fig, output, "baselines")
            plt.close(png_fig)
        else:
            files.skipped["baselines"] = "no complete trial to compare"
    output.write_text(_html(study, spec, figures, files, table, champion), encoding="utf-8")
    files.seconds = time.perf_counter() - started
    return files


class _Discard:
    """Stands in for matplotlib where no PNG is drawn: every attribute and call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __iter__(self) -> Any:
        return iter((self, self))  # fig, ax = plt.subplots()


def _figure_of(axes: Any) -> Any:
    import numpy as np

    first = np.asarray(axes, dtype=object).flat[0] if not hasattr(axes, "figure") else axes
    return first.figure


def _save_png(fig: Any, output: Path, key: str) -> Path:
    path = output.with_name(f"{output.stem}.{key}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def _champion(
    study: optuna.Study, spec: StudySpec, prepared: Prepared, frame: pd.DataFrame, tracker: Tracker
) -> _Champion:
    """The champion's predictions on the validation rows: the registered champion when it comes
    from this study, else this study's best trial (same weights file, read without pickle)."""
    import numpy as np
    import torch

    from tuner.tracking import tag

    version = tracker.champion(spec.model_name)
    if version is not None and version.tags.get("tuner.study") == spec.name:
        run_id = version.run_id
        label = f"{spec.model_name} version {version.version} (@champion, trial {version.tags.get('tuner.trial')})"
    else:
        best = best_trial(study)
        if best is None:
            raise ValueError("no complete trial")
        run_id = best.user_attrs["mlflow_run_id"]
        label = f"best trial {best.number} (not registered as champion)"
    checkpoint, _ = tracker.load_checkpoint(run_id)
    net = checkpoint.build()
    # A refit champion has seen every row (the dev rows, with a test part): show them all, and say
    # they are in-sample, rather than a holdout it was trained on.
    refit = tracker.client.get_run(run_id).data.tags.get(tag("refit"), "").startswith("all ")
    rows = frame if refit else frame.iloc[prepared.val_index]
    what = f"all {len(rows)} rows, in-sample (the champion was refit on them)" if refit else "validation rows"
    from tuner.model import encode_frame

    x = torch.as_tensor(encode_frame(net, rows)[0])  # raw columns -> the model's inputs (encoder)
    with torch.inference_mode():
        out = net(x).numpy()
    if spec.task == "regression":
        actual = rows[spec.target].to_numpy(dtype=np.float64) if refit else prepared.y_val_raw.double().numpy()
        return _Champion(label, actual, out.astype(np.float64), what)
    classes = np.asarray(checkpoint.config.classes, dtype=object)
    return _Champion(label, rows[spec.target].to_numpy(), classes[out.argmax(axis=1)], what)


def _predicted_vs_actual(c: _Champion, spec: StudySpec, go: Any, plt: Any) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(6, 6))
    if spec.task == "regression":
        lo, hi = float(min(c.actual.min(), c.predicted.min())), float(max(c.actual.max(), c.predicted.max()))
        pfig = go.Figure(
            [
                go.Scatter(x=c.actual, y=c.predicted, mode="markers", name=c.rows),
                go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = actual", line={"dash": "dash"}),
            ]
        )
        pfig.update_layout(title=c.label, xaxis_title=f"actual {spec.target}", yaxis_title=f"predicted {spec.target}")
        ax.scatter(c.actual, c.predicted, label=c.rows)
        ax.plot([lo, hi], [lo, hi], "--", color="grey", label="predicted = actual")
        ax.set_xlabel(f"actual {spec.target}")
        ax.set_ylabel(f"predicted {spec.target}")
        ax.legend()
    else:
        import pandas as pd

        counts = pd.crosstab(pd.Series(c.actual, name="actual"), pd.Series(c.predicted, name="predicted"))
        pfig = go.Figure(
            go.Heatmap(
                z=counts.to_numpy(),
                x=[str(v) for v in counts.columns],
                y=[str(v) for v in counts.index],
                text=counts.to_numpy(),
                texttemplate="%{text}",
            )
        )
        pfig.update_layout(title=c.label, xaxis_title="predicted", yaxis_title="actual")
        ax.imshow(counts.to_numpy(), cmap="Blues")
        ax.set_xticks(range(len(counts.columns)), [str(v) for v in counts.columns])
        ax.set_yticks(range(len(counts.index)), [str(v) for v in counts.index])
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    ax.set_title(c.label, fontsize=9)
    return pfig, fig


def _comparison(
    study: optuna.Study, spec: StudySpec, baselines: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Validation metrics per model: the best trial first, then the baselines."""
    best = best_trial(study)
    if best is None:
        return {}
    tuned = {k: float(v) for k, v in best.user_attrs.items() if isinstance(v, float)}
    if spec.metric not in tuned and best.value is not None:
        tuned[spec.metric] = float(best.value)
    return {f"tuned (trial {best.number})": tuned, **baselines}


def _baseline_plot(table: dict[str, dict[str, float]], metric: str, go: Any, plt: Any) -> tuple[Any, Any]:
    names = [n for n in table if metric in table[n]]
    values = [table[n][metric] for n in names]
    pfig = go.Figure(go.Bar(x=names, y=values, text=[f"{v:.4g}" for v in values], textposition="auto"))
    pfig.update_layout(title=f"validation {metric}", yaxis_title=metric)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["tab:blue"] + ["tab:grey"] * (len(names) - 1))
    for i, v in enumerate(values):
        ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom")
    ax.set_ylabel(f"validation {metric}")
    return pfig, fig


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section { margin: 2em 0; border-top: 1px solid #ddd; padding-top: 1em; }
table { border-collapse: collapse; } td, th { padding: 0.3em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } .skipped { color: #a60; }
"""


def _html(
    study: optuna.Study,
    spec: StudySpec,
    figures: dict[str, Any],
    files: ReportFiles,
    table: dict[str, dict[str, float]],
    champion: _Champion | None,
) -> str:
    from collections import Counter

    esc = html.escape
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    best = best_trial(study)
    best_text = f"best trial {best.number}: {spec.metric} = {best.value:.6g}" if best else "no complete trial"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tuner report: {esc(spec.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Study {esc(spec.name)}</h1>",
        f'<p id="summary">{len(study.trials)} trials ({esc(counts)}); {esc(best_text)}; metric '
        f"{esc(spec.metric)} ({esc(spec.study_direction)}) on the validation rows; search space hash "
        f"<code>{esc(spec.space_hash())}</code>; generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
    ]
    plotly_inlined = False
    for key, title in SECTIONS.items():
        parts.append(f'<section id="{key}"><h2>{esc(title)}</h2>')
        if key == "predicted_vs_actual" and champion is not None:
            n = len(champion.actual)
            what = champion.rows if champion.rows != "validation rows" else f"{n} validation rows"
            parts.append(f"<p>{esc(champion.label)}: {esc(what)}.</p>")
        if key == "baselines" and table:
            metrics = [
                m
                for m in ("rmse", "mae", "r2", "accuracy", "log_loss", "f1_macro")
                if any(m in v for v in table.values())
            ]
            parts.append("<table><tr><th>model</th>" + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>")
            for name, values in table.items():
                cells = "".join(f"<td>{values[m]:.4f}</td>" if m in values else "<td></td>" for m in metrics)
                parts.append(f"<tr><td>{esc(name)}</td>{cells}</tr>")
            parts.append("</table>")
        if key in figures:
            parts.append(
                figures[key].to_html(
                    full_html=False, include_plotlyjs=not plotly_inlined, div_id=f"plot-{key}", default_width="100%"
                )
            )
            plotly_inlined = True
        else:
            parts.append(f'<p class="skipped">Not available: {esc(files.skipped.get(key, "no data"))}</p>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    spec: StudySpec,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    output: str | Path | None = None,
) -> ReportFiles:
    """``tuner report``: the report of a stored study (default ``<study>-report.html`` here).

    Raises:
        StorageError: the study does not exist in the storage.
        TrackingError: the MLflow store cannot be opened.
        DataError: ``output`` is a folder, or cannot be written (a full disk).
    """
    from tuner.inputs import load_data
    from tuner.study import open_study
    from tuner.tracking import Tracker

    out = Path(output) if output else Path.cwd() / f"{spec.name}-report.html"
    if out.is_dir():  # before the work (a folder that does not exist yet is created)
        raise DataError(f"--output {str(out)!r} is a folder; pass a file path, e.g. {str(out / f'{spec.name}-report.html')!r}")
    study = open_study(spec, storage, create=False)
    prepared, frame = load_data(spec)
    tracker = Tracker(tracking_uri or spec.tracking, spec.name, create=False)
    # The baselines the launch computed (on the study's own folds or split), when it stored them.
    stored = study.user_attrs.get("baselines") or None
    try:
        return write_report(study, spec, out, prepared=prepared, frame=frame, tracker=tracker, baselines=stored)
    except OSError as e:  # a full disk, a read-only folder
        raise DataError(f"cannot write the report {str(out)!r}: {e.strerror or e}; free some space or pass another --output") from None


def log_launch_report(
    study: optuna.Study,
    spec: StudySpec,
    tracker: Tracker,
    run_id: str,
    *,
    prepared: Prepared,
    frame: pd.DataFrame,
    baselines: dict[str, dict[str, float]] | None = None,
) -> ReportFiles | None:
    """Write the report to a temporary folder and log it under ``report/`` of the launch's run.

    A failure is a warning, not a failed launch: the trials and the model are already stored.
    """
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="tuner-report-") as tmp:
            files = write_report(
                study,
                spec,
                Path(tmp) / "report.html",
                prepared=prepared,
                frame=frame,
                tracker=tracker,
                baselines=baselines,
                full=False,  # `tuner report` draws the PNGs and importances
            )
            tracker.log_report(run_id, Path(tmp))
        return files
    except Exception as e:
        warnings.warn(f"could not write or log the study report: {first_line(e)}", stacklevel=2)
        return None
