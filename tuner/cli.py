"""Thin command line: parse, call one library function, print. Every TunerError becomes one
line on stderr and exit code 2; Ctrl-C/SIGTERM exit 130; no traceback unless --debug.

Heavy packages (torch, optuna, mlflow) are imported inside the commands: ``tuner --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Sequence

__all__ = ["main"]


def _add_study_args(p: argparse.ArgumentParser, *, tracking: bool = True) -> None:
    p.add_argument("study", help="study file, e.g. studies/cars_mlp.toml")
    p.add_argument(
        "--storage",
        default=os.environ.get("TUNER_STORAGE"),
        help="Optuna storage URL (default: $TUNER_STORAGE, else a SQLite file next to the study file)",
    )
    if tracking:
        p.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: the study file's tracking_uri, $MLFLOW_TRACKING_URI, else mlflow.db "
            "in the project folder above the study file)",
        )


_FOUND_STORE = "(default: $MLFLOW_TRACKING_URI, else the first mlflow.db here or in a folder above)"


def _parser() -> argparse.ArgumentParser:
    from tuner import __version__

    parser = argparse.ArgumentParser(prog="tuner", description="Hyperparameter tuning for PyTorch models on tabular data.")
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("launch", help="create or resume a study and run it to n_trials finished trials")
    _add_study_args(p)
    p.add_argument("--n-trials", type=int, help="total finished trials to reach (overrides the study file)")
    p.add_argument("--seed", type=int, help="the study's seed: split, sampler and trial seeds (overrides the study file)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (overrides the study file)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (overrides the study file)")
    p.add_argument("--allow-space-change", action="store_true", help="resume although the search space changed")
    p.add_argument("--allow-data-change", action="store_true", help="resume although the data file changed")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per trial")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--no-report", action="store_true", help="do not log the study report on the launch's MLflow run")
    p.add_argument("--workers", type=int, help="run N worker processes on the study (one progress line)")
    p.add_argument("--gpus", help="comma-separated GPU indices: one worker per GPU via CUDA_VISIBLE_DEVICES")
    p.add_argument("--warm-start-from", metavar="OTHER[:K]",
                   help="first run the params of the K (default 5) best trials of study OTHER in this storage (or of "
                   "study file OTHER.toml) that fit this search space")

    p = sub.add_parser("worker", help="run one worker on a shared study until it has n_trials finished trials")
    _add_study_args(p)
    p.add_argument("--n-trials", type=int, help="the study's total finished trials (overrides the study file)")
    p.add_argument("--seed", type=int, help="the study's seed (overrides the study file)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (overrides the study file)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (overrides the study file)")
    p.add_argument("--allow-space-change", action="store_true", help="resume although the search space changed")
    p.add_argument("--allow-data-change", action="store_true", help="resume although the data file changed")
    p.add_argument("--no-promote", action="store_true", help="leave promotion to the launch (or `tuner promote`)")
    p.add_argument("--no-report", action="store_true", help="do not log the study report on the parent run")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per trial")
    p.add_argument("--no-progress", action="store_true", help="no progress line")

    p = sub.add_parser("promote", help="register the study's best trial and move the champion alias if it is better")
    _add_study_args(p)

    p = sub.add_parser("best", help="best trial, its MLflow run and the champion model")
    _add_study_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("studies", help="the studies in a storage: trial counts and best values")
    p.add_argument(
        "storage",
        nargs="?",
        help="storage URL, .db file or study file (default: $TUNER_STORAGE, else the storages of the study files "
        "here and in studies/)",
    )

    p = sub.add_parser("trials", help="a table of a study's trials: number, state, value, duration, params")
    _add_study_args(p, tracking=False)
    p.add_argument("--csv", action="store_true", help="print every trial as CSV (all columns, full precision)")
    p.add_argument("--wide", action="store_true", help="add the start time and the MLflow run id")

    p = sub.add_parser("reconcile", help="after a crash: fail stale trials, align MLflow runs and the champion")
    _add_study_args(p)

    p = sub.add_parser("report", help="HTML report (+ PNGs) of a study: Optuna plots, champion, baselines")
    _add_study_args(p)
    p.add_argument("--output", help="HTML file to write (default: STUDYNAME-report.html here); PNGs go beside it")

    p = sub.add_parser("predict", help="predict with a registered model")
    p.add_argument("model", help="NAME@ALIAS, NAME/VERSION, models:/... (e.g. cars-mpg@champion), or a study file: its champion")
    p.add_argument("--input", required=True, help="CSV with the raw feature columns (others are ignored)")
    p.add_argument("--output", help="CSV to write (default: stdout)")
    p.add_argument("--proba", action="store_true", help="class probabilities, one column per class (classifiers)")
    p.add_argument("--keep", action="append", default=[], metavar="COL", help="copy this input column to the output (repeatable)")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {_FOUND_STORE}")

    p = sub.add_parser("replay", help="retrain one stored trial from its params and seed; compare the metric")
    _add_study_args(p, tracking=False)
    p.add_argument("--trial", type=int, required=True, help="trial number (see `tuner best` or the dashboard)")
    p.add_argument("--seed", type=int, help="the --seed the study was launched with, if it was")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the study file's)")

    p = sub.add_parser("dashboard", help="optuna-dashboard for a study's storage")
    _add_study_args(p, tracking=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--mlflow-url",
        help="where the MLflow UI is served, for the links in the notes (default: $TUNER_MLFLOW_UI_URL, else "
        "http://127.0.0.1:5000, what `tuner ui` serves)",
    )

    p = sub.add_parser("ui", help="MLflow UI over the tracking store")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI {_FOUND_STORE}")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1; MLflow's own default is 4)")
    for command in sub.choices.values():  # `tuner launch X --debug` as well as `tuner --debug launch X`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tuner import interrupts, process
    from tuner.errors import TunerError

    interrupts.install()  # SIGINT/SIGTERM -> KeyboardInterrupt that a weakref callback cannot swallow
    process.setup()  # a rarer garbage collector and a quick exit: ~2 s of a 1-trial launch

    if not args.debug:
        warnings.filterwarnings("ignore", module="mlflow")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    try:
        return COMMANDS[args.command](args)
    except TunerError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tuner predict ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: the running trial is marked FAIL; relaunch to continue the study", file=sys.stderr)
        return 130


def _spec(args: argparse.Namespace) -> Any:
    from tuner.config import load_spec

    return load_spec(args.study, seed=getattr(args, "seed", None), timeout=getattr(args, "timeout", None))


def _tracking_uri(args: argparse.Namespace, spec: Any = None) -> str:
    """--tracking-uri, else the study's store (tuner.stores). Without a study (predict, ui): the
    store found from here, which must exist (opening a missing SQLite store would create it)."""
    if spec is not None:
        return str(args.tracking_uri or spec.tracking)
    from tuner.stores import find_tracking_uri, require_tracking_store

    uri = find_tracking_uri(args.tracking_uri)
    require_tracking_store(uri)
    return uri


def cmd_launch(args: argparse.Namespace) -> int:
    from tuner.session import launch

    spec = _spec(args)
    options: dict[str, Any] = dict(
        n_trials=args.n_trials,
        storage=args.storage,
        tracking_uri=_tracking_uri(args, spec),
        allow_space_change=args.allow_space_change,
        allow_data_change=args.allow_data_change,
        device=args.device,
        progress=not args.no_progress,
        verbose=args.verbose,
        report=not args.no_report,
        warm_start=args.warm_start_from,
    )
    if args.workers is not None or args.gpus:
        from tuner.workers import parse_gpus

        options.update(workers=args.workers, gpus=parse_gpus(args.gpus))
    return _print_launch(launch(spec, **options))


def _print_launch(s: Any) -> int:
    from tuner.browse import launch_summary

    print(launch_summary(s))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tuner.session import launch

    spec = _spec(args)
    s = launch(
        spec,
        role="worker",
        n_trials=args.n_trials,
        storage=args.storage,
        tracking_uri=_tracking_uri(args, spec),
        device=args.device,
        allow_space_change=args.allow_space_change,
        allow_data_change=args.allow_data_change,
        promote=not args.no_promote,
        report=not args.no_report,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    print(f"worker: ran {s.n_run} trials; study {s.study_name}: {s.n_finished}/{s.n_trials} finished in {s.storage}")
    if s.promotion is not None:
        _print_promotion(s.promotion)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tuner.promotion import promote_study

    spec = _spec(args)
    _print_promotion(promote_study(spec, storage=args.storage, tracking_uri=_tracking_uri(args, spec)))
    return 0


def _print_promotion(p: Any) -> None:
    state = "registered" if p.new_version else "already registered"
    alias_uri = f"models:/{p.model_name}@{p.alias}"
    print(f"model {state}: {p.model_uri} (trial {p.trial_number}) -> alias {p.alias} ({alias_uri})")
    if p.ensemble:
        print(p.ensemble)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_best(args: argparse.Namespace) -> int:
    from tuner.browse import best_info

    spec = _spec(args)
    info = best_info(spec, storage=args.storage, tracking_uri=_tracking_uri(args, spec))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"study {info['study']} ({info['n_finished']} finished trials) in {info['storage']}")
    print(f"mlflow store: {info['tracking_uri']}")
    print(f"best trial {info['best_trial']}: {info['metric']} = {info['value']:.6g}")
    print("params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in info["params"].items()))
    print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in info["metrics"].items()))
    print(f"mlflow run: {info['mlflow_run_id']}")
    if info.get("validation"):
        print(f"validation: {info['validation']}")
    if info.get("columns"):
        print(info["columns"])
    if info.get("ensemble"):
        print(info["ensemble"]["summary"])
    for name, values in info.get("baselines", {}).items():
        print(f"baseline {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    if info.get("test"):
        from tuner.browse import estimate_line

        print(estimate_line(info["value"], info["test"]["metrics"], info["metric"], info["test"]["rows"]))
        for name, values in (info.get("test_baselines") or {}).items():
            print(f"test baseline {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    if info.get("verdict"):
        print(("" if info["beats_baselines"] else "WARNING: ") + info["verdict"])
    if "champion" in info:
        c = info["champion"]
        print(f"champion: {c['model_uri']} (version {c['version']}, trial {c['trial']}, {info['metric']} {c['value']})")
        if c.get("ensemble"):
            print(f"champion is an ensemble (trial x weight): {c['ensemble']}")
    else:
        print("champion: none registered")
    for key, label in (
        ("mlflow_run_url", "mlflow run link"),
        ("mlflow_launch_run_url", "mlflow launch run (report)"),
        ("mlflow_experiment_url", "mlflow experiment"),
        ("champion_url", "champion model version"),
        ("dashboard_trial_url", "dashboard trial"),
        ("dashboard_study_url", "dashboard study"),
    ):
        if info.get(key):
            print(f"{label}: {info[key]}")
    if info.get("champion_tags"):
        print("champion tags: " + ", ".join(f"{k}={v}" for k, v in info["champion_tags"].items()))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from tuner.reconcile import reconcile

    spec = _spec(args)
    r = reconcile(spec, storage=args.storage, tracking_uri=_tracking_uri(args, spec))
    for n in r.stale_trials:
        print(f"trial {n}: heartbeat stopped, RUNNING -> FAIL")
    for n, run_id, old, new in r.runs:
        print(f"trial {n}: MLflow run {run_id} {old} -> {new}")
    for run_id in r.launch_runs:
        print(f"launch run {run_id}: its process is gone, RUNNING -> FAILED")
    if r.champion:
        print(r.champion)
    for problem in r.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not r.changed:
        print(f"study {r.study_name}: trials, runs and champion are consistent; nothing to do")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tuner.data import load_table, output_path, write_csv
    from tuner.errors import ModelError
    from tuner.registry import conform_input, load_model

    output = output_path(args.output, "--output") if args.output else None  # checked before the work
    frame = load_table(args.input, what="input file", fix="pass an existing CSV or Parquet file to --input")
    unknown = [c for c in args.keep if c not in frame.columns]
    if unknown:
        raise ModelError(f"--keep {unknown}: no such column in {args.input}; its columns are {list(frame.columns)}")
    model, _ = load_model(*_model_and_store(args))
    features = model.metadata.get_input_schema().input_names()
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ModelError(f"{args.input} lacks the model's feature column(s) {missing}; it needs {features}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preds = model.predict(conform_input(model, frame), params={"proba": True} if args.proba else None)
        for note in model.notes:  # imputations training never needed (tuner.model.predict_frame)
            print(f"warning: {note}", file=sys.stderr)
    except Exception as e:
        raise ModelError(f"prediction failed on {args.input}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    import pandas as pd

    if args.proba and getattr(preds, "ndim", 1) == 1:
        raise ModelError(f"model {args.model!r} is a regression model: --proba needs a classifier")
    out = pd.DataFrame({"prediction": preds}) if getattr(preds, "ndim", 1) == 1 else pd.DataFrame(preds)
    if args.keep:  # e.g. an id column, so the predictions can be joined back
        out = pd.concat([frame[args.keep].reset_index(drop=True), out.reset_index(drop=True)], axis=1)
    if output is not None:
        write_csv(out, output, "--output")
        print(f"wrote {len(out)} predictions to {output}", file=sys.stderr)
    else:
        out.to_csv(sys.stdout, index=False)
    return 0


def _model_and_store(args: argparse.Namespace) -> tuple[str, str]:
    """MODEL as given and the store found from here, or a study file's champion in its store."""
    if not args.model.endswith(".toml"):
        return args.model, _tracking_uri(args)
    from tuner.config import load_spec
    from tuner.stores import require_tracking_store

    spec = load_spec(args.model)
    uri = _tracking_uri(args, spec)
    require_tracking_store(uri)  # a read-only command never creates the store
    return f"{spec.model_name}@champion", uri


def cmd_replay(args: argparse.Namespace) -> int:
    from tuner.replay import replay

    r = replay(_spec(args), args.trial, storage=args.storage, device=args.device)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in r.params.items())
    print(f"study {r.study} trial {r.trial} ({r.state}), seed {r.seed}: {params}")
    for note in r.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"{'':<10}{r.metric + ' at epoch ' + str(r.epoch):>24}")
    print(f"{'original':<10}{r.original!r:>24}")
    print(f"{'replayed':<10}{r.replayed!r:>24}")
    if r.fold_metrics:
        print("replayed folds: " + ", ".join(f"{v:.4f}" for v in r.fold_metrics))
    print("identical" if r.identical else f"differs by {r.difference:.3g}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.report import build_report

    spec = _spec(args)
    files = build_report(spec, storage=args.storage, tracking_uri=_tracking_uri(args, spec), output=args.output)
    print(f"wrote {files.html} and {len(files.pngs)} PNGs beside it ({files.seconds:.1f}s)")
    for key, why in files.skipped.items():
        print(f"  {key}: not drawn ({why})")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from tuner.browse import studies_report

    print(studies_report(args.storage or os.environ.get("TUNER_STORAGE")))
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    from tuner.browse import trial_table, trials_csv

    spec = _spec(args)
    if args.csv:
        sys.stdout.write(trials_csv(spec, storage=args.storage))
    else:
        print(trial_table(spec, storage=args.storage, wide=args.wide))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from tuner.browse import check_served_address, open_existing_storage

    spec = _spec(args)
    check_served_address(args.host, args.port)  # before the storage is opened
    url = args.storage or spec.storage_url
    storage = open_existing_storage(url, spec.source)
    from tuner.lineage import rebase_study_notes
    from tuner.links import ui_base

    base = args.mlflow_url or ui_base(spec.tracking)
    if n := rebase_study_notes(storage, spec.name, base):
        print(f"notes: {n} rewritten, their MLflow links now point at {base}", file=sys.stderr)
    print(f"optuna-dashboard for {spec.name} at http://{args.host}:{args.port}/dashboard/ (Ctrl-C stops)", flush=True)
    import signal

    import optuna_dashboard

    # A read-only server: Ctrl-C and SIGTERM end the process at once. tuner's handlers raise
    # KeyboardInterrupt, which wsgiref catches (and prints) when it lands while a request is being
    # answered: the server then served on, and `kill` did not stop it.
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tuner.browse import check_served_address
    from tuner.links import DEFAULT_UI_URL

    uri = _tracking_uri(args)
    check_served_address(args.host, args.port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    served = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {served}/ (Ctrl-C stops)", flush=True)
    if served != os.environ.get("TUNER_MLFLOW_UI_URL", DEFAULT_UI_URL).rstrip("/"):
        print(
            f"note: links written by tuner point at {os.environ.get('TUNER_MLFLOW_UI_URL', DEFAULT_UI_URL)}; "
            f"`tuner dashboard STUDY --mlflow-url {served}` moves the dashboard's notes here",
            file=sys.stderr,
            flush=True,
        )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


COMMANDS = {
    "launch": cmd_launch,
    "worker": cmd_worker,
    "promote": cmd_promote,
    "best": cmd_best,
    "reconcile": cmd_reconcile,
    "studies": cmd_studies,
    "trials": cmd_trials,
    "report": cmd_report,
    "predict": cmd_predict,
    "replay": cmd_replay,
    "dashboard": cmd_dashboard,
    "ui": cmd_ui,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
