"""Where a browser finds the MLflow UI and optuna-dashboard, and the links into them.

Plain strings, no I/O: the tracker, the dashboard notes and ``tuner best`` build every link here.
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_UI_URL", "ui_base", "experiment_link", "run_link", "dashboard_base"]

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # what `tuner ui` serves without --host/--port


def ui_base(tracking_uri: str) -> str:
    """Where a browser finds the MLflow UI of a store: the tracking server itself for http(s)
    URIs, else ``$TUNER_MLFLOW_UI_URL`` or the address ``tuner ui`` serves by default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get("TUNER_MLFLOW_UI_URL", DEFAULT_UI_URL).rstrip("/")


def experiment_link(base: str, experiment_id: str) -> str:
    """The runs table of an experiment: MLflow 3's bare ``#/experiments/ID`` opens its GenAI
    overview, not the runs (routes of mlflow/server/js, 3.17)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    return f"{experiment_link(base, experiment_id)}/{run_id}"


def dashboard_base() -> str:
    """Where a browser finds optuna-dashboard: ``$TUNER_DASHBOARD_URL`` or what ``tuner dashboard`` serves."""
    return os.environ.get("TUNER_DASHBOARD_URL", "http://127.0.0.1:8080").rstrip("/")
