"""Issue 3, security: loading a model runs no code (S1), its weights are verified (S2), no password
reaches any output or store (S3), the servers bind to this machine unless told otherwise (S4)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CARS, free_port, mlflow_store, need, port_open, write_study

from tuner.config import load_spec
from tuner.errors import ModelError
from tuner.registry import load_model
from tuner.session import launch


class _Marker:
    """Unpickling this object creates the file at ``path`` (what an attacker's code would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny study, launched once: its champion is a model tuner produced."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    tmp = tmp_path_factory.mktemp("registry")
    uri = mlflow_store(tmp / "mlflow.db")
    spec = load_spec(write_study(tmp, "sec", n_trials=1, tracking_uri=uri))
    launch(spec, progress=False, report=False)  # the champion is what the tests below use
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("sec", "champion")
    model_dir = Path(download_artifacts(f"models:/sec/{version.version}", dst_path=str(tmp / "good")))
    return {"tmp": tmp, "uri": uri, "client": client, "version": version, "model_dir": model_dir}


def _register(registry: dict[str, Any], name: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Register ``model_dir`` as a new version of ``name`` (as anyone with write access could)."""
    client = registry["client"]
    experiment = client.get_experiment_by_name("sec").experiment_id
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception:
        pass
    version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags=tags)
    return f"{name}/{version.version}"


def _copy_model(registry: dict[str, Any], folder: str) -> Path:
    target = registry["tmp"] / folder
    shutil.copytree(registry["model_dir"], target)
    return target


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_s1_the_pickle_payload_used_below_does_run_code_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Marker(marker)))
    assert marker.exists()


def test_s1_predict_refuses_a_registered_pickle_and_never_runs_it(registry: dict[str, Any], capsys: Any) -> None:
    from tuner.cli import main

    marker = registry["tmp"] / "pwned-weights"
    evil = _copy_model(registry, "evil-weights")
    (evil / "artifacts" / "checkpoint.pt").write_bytes(pickle.dumps(_Marker(marker)))
    # Even with a SHA-256 tag that matches (the attacker can write tags too).
    tags = {**registry["version"].tags, "tuner.weights_sha256": _sha256(evil / "artifacts" / "checkpoint.pt")}
    ref = _register(registry, "sec-evil", evil, tags)

    rc = main(["predict", ref, "--input", str(CARS), "--tracking-uri", registry["uri"]])

    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: model '{ref}' cannot be loaded as plain weights")
    assert "tuner never unpickles code, refusing it" in err and err.count("\n") == 1
    assert not marker.exists()


def test_s1_predict_refuses_a_pickled_pyfunc_model(registry: dict[str, Any]) -> None:
    marker = registry["tmp"] / "pwned-pyfunc"
    evil = _copy_model(registry, "evil-pyfunc")
    (evil / "artifacts" / "checkpoint.pt").unlink()
    (evil / "python_model.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    ref = _register(registry, "sec-evil-pyfunc", evil, dict(registry["version"].tags))
    with pytest.raises(ModelError, match=r"is not a tuner model \(no artifacts/checkpoint.pt\)"):
        load_model(ref, registry["uri"])
    assert not marker.exists()


def test_s1_stored_model_code_never_runs_and_a_tuner_model_still_predicts(registry: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd

    marker = registry["tmp"] / "pwned-code"
    evil = _copy_model(registry, "evil-code")
    for code in evil.rglob("*.py"):  # every shipped source file now writes the marker when imported
        code.write_text(f"open({str(marker)!r}, 'w')\n" + code.read_text())
    ref = _register(registry, "sec-evil-code", evil, dict(registry["version"].tags))

    # The code digest recorded at registration no longer matches: refused, and nothing ran.
    expected = registry["version"].tags["tuner.code_sha256"]
    with pytest.raises(ModelError, match=rf"its stored code does not match the SHA-256 recorded at registration \({expected[:12]}"):
        load_model(ref, registry["uri"])
    assert not marker.exists()

    # The genuine champion predicts without running its stored code, the numbers MLflow's own loader gives.
    genuine = _register(registry, "sec-genuine", _copy_model(registry, "genuine"), dict(registry["version"].tags))
    model, version = load_model(genuine, registry["uri"])
    frame = pd.read_csv(CARS)
    predictions = model.predict(frame)
    reference = mlflow.pyfunc.load_model(str(registry["model_dir"])).predict(frame[model.metadata.get_input_schema().input_names()])
    assert predictions.shape == (32,) and np.allclose(predictions, reference, rtol=1e-6)
    assert version is not None and version.tags["tuner.weights_sha256"] == registry["version"].tags["tuner.weights_sha256"]


def test_s2_a_weights_file_changed_after_registration_is_refused(registry: dict[str, Any]) -> None:
    import torch

    tampered = _copy_model(registry, "tampered")
    path = tampered / "artifacts" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    for value in payload["state_dict"].values():
        value.add_(0.5)  # still a valid checkpoint: only the digest tells
    torch.save(payload, path)
    ref = _register(registry, "sec-tampered", tampered, dict(registry["version"].tags))
    expected = registry["version"].tags["tuner.weights_sha256"]
    with pytest.raises(ModelError, match=rf"does not match its recorded SHA-256 \({expected[:12]}\.\.\.\); the artifact was changed"):
        load_model(ref, registry["uri"])


def test_s2_a_version_without_a_recorded_digest_is_refused(registry: dict[str, Any]) -> None:
    tags = {k: v for k, v in registry["version"].tags.items() if k != "tuner.weights_sha256"}
    ref = _register(registry, "sec-untagged", _copy_model(registry, "untagged"), tags)
    with pytest.raises(ModelError, match=r"has no tuner.weights_sha256 tag: it was not registered by `tuner launch`"):
        load_model(ref, registry["uri"])
    model, _ = load_model("sec/latest", registry["uri"])  # `latest` resolves to a version and is verified
    assert model.predict(__import__("pandas").read_csv(CARS)).shape == (32,)


@pytest.mark.slow
def test_s3_no_password_in_output_mlflow_or_optuna(tmp_path: Path, capfd: Any) -> None:
    import optuna
    import psycopg
    from mlflow import MlflowClient

    from tuner.cli import main

    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    password = "S3cretPw-q7"
    database = f"tuner_s3_{free_port()}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    storage = f"postgresql://postgres:{password}@127.0.0.1:5432/{database}"
    tracking = mlflow_store(tmp_path / "mlflow.db")
    study = write_study(tmp_path, "s3", n_trials=2)
    try:
        common = [str(study), "--storage", storage, "--tracking-uri", tracking]
        assert main(["launch", *common, "-v"]) == 0
        assert main(["best", *common, "--json"]) == 0
        assert main(["reconcile", *common]) == 0
        bad = storage.replace(":5432/", f":{free_port()}/")
        assert main(["best", str(study), "--storage", bad, "--tracking-uri", tracking]) == 2
        out, err = capfd.readouterr()
        assert "postgres:***@127.0.0.1" in out + err  # the URL is shown, redacted

        texts = [out, err]
        client = MlflowClient(tracking, registry_uri=tracking)
        experiment = client.get_experiment_by_name("s3").experiment_id
        for run in client.search_runs([experiment]):
            texts += [repr(run.data.params), repr(run.data.tags), run.info.run_name]
        for version in client.search_model_versions("name = 's3'"):
            texts += [repr(version.tags), version.description or ""]
        loaded = optuna.load_study(study_name="s3", storage=storage)
        texts += [repr(loaded.user_attrs), repr(loaded._storage.get_study_system_attrs(loaded._study_id))]
        for trial in loaded.trials:
            texts += [repr(trial.user_attrs), repr(trial.system_attrs), repr(trial.params)]
        leaks = [t for t in texts if password in t]
        assert leaks == []
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.parametrize("command", ["dashboard", "ui"])
def test_s4_servers_bind_to_localhost_by_default(command: str) -> None:
    from tuner.cli import _parser

    args = ["dashboard", "x.toml"] if command == "dashboard" else ["ui"]
    assert _parser().parse_args(args).host == "127.0.0.1"


def test_s4_binding_elsewhere_prints_a_warning(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    import os

    import optuna_dashboard

    from tuner.cli import main

    served: list[tuple[str, int]] = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port: served.append((host, port)))
    monkeypatch.setattr(os, "execv", lambda exe, cmd: served.append((cmd[cmd.index("--host") + 1], 0)))
    study = write_study(tmp_path, "s4")
    # Both commands only read: the stores they serve must exist.
    import optuna

    optuna.create_study(storage=f"sqlite:///{tmp_path / 's4.db'}", study_name="s4")
    mlflow_store(tmp_path / "mlflow.db")
    assert main(["dashboard", str(study), "--port", "8123"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["dashboard", str(study), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert main(["ui", "--host", "0.0.0.0", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: binding to 0.0.0.0: anyone who can reach this address can read the studies") == 2
    assert served == [("127.0.0.1", 8123), ("0.0.0.0", 8123), ("0.0.0.0", 0)]
