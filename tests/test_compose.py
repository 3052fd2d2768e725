"""The docker-compose stack without a docker engine: the test reads docker-compose.yml and
.env.example and starts the same commands with the same environment on this machine
(PostgreSQL from 127.0.0.1, `mlflow server`, the dashboard, N `tuner worker`s), so the file and
the test cannot drift apart. Only addresses, ports and paths are mapped to local ones."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import ROOT, free_port, need, port_open, run_tuner, tuner_env, write_study
from tests.test_workers import PG_HOST, PG_PORT, check_study, pg_admin

COMPOSE = ROOT / "docker-compose.yml"


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml with ``${VAR}`` / ``${VAR:-default}`` filled in from ``env``."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return fill(yaml.safe_load(COMPOSE.read_text()))


def dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_file_has_the_stack_the_issue_asks_for() -> None:
    env = dotenv(ROOT / ".env.example")
    assert env["POSTGRES_PASSWORD"]
    c = load_compose(env)
    s = c["services"]
    assert set(s) >= {"postgres", "mlflow", "dashboard", "worker", "worker-gpu"}
    pg = s["postgres"]
    assert "ports" not in pg  # PostgreSQL is not published
    assert pg["environment"]["POSTGRES_DB"] == "optuna" and "healthcheck" in pg
    init = [v for v in pg["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init and "CREATE DATABASE mlflow" in (ROOT / init[0].split(":")[0]).read_text()
    for name in ("mlflow", "dashboard"):
        assert all(p.startswith("127.0.0.1:") for p in s[name]["ports"]), s[name]["ports"]
    ml = s["mlflow"]
    cmd = ml["command"]
    assert "--serve-artifacts" in cmd and "mlflow:5000" in cmd[cmd.index("--allowed-hosts") + 1]
    assert ml["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert cmd[cmd.index("--artifacts-destination") + 1] + "" in {v.split(":")[1] for v in ml["volumes"]}
    assert "mlartifacts" in c["volumes"] and "healthcheck" in ml
    for name in ("worker", "worker-gpu"):
        w = s[name]
        assert w["command"][:2] == ["tuner", "worker"]
        assert w["environment"]["TUNER_STORAGE"].endswith("@postgres:5432/optuna")
        assert w["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "mlflow": {"condition": "service_healthy"},
        }
        assert "container_name" not in w and "ports" not in w  # --scale worker=N works
    gpu = s["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in s["worker"]  # the CPU variant


@pytest.fixture
def pg_databases() -> Iterator[dict[str, str]]:
    need(port_open(PG_HOST, PG_PORT), f"PostgreSQL on {PG_HOST}:{PG_PORT}")
    suffix = uuid.uuid4().hex[:8]
    dbs = {"optuna": f"tuner_compose_optuna_{suffix}", "mlflow": f"tuner_compose_mlflow_{suffix}"}
    for db in dbs.values():
        pg_admin(f"CREATE DATABASE {db}")
    yield dbs
    for db in dbs.values():
        pg_admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            if any(p.poll() is not None for p in procs):
                raise AssertionError(f"a server exited while waiting for {url}: {[p.args for p in procs]}") from None
            time.sleep(0.5)
    raise AssertionError(f"{url} not ready in {timeout}s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the whole group: mlflow server forks workers
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_compose_commands_run_the_stack_locally(tmp_path: Path, pg_databases: dict[str, str]) -> None:
    """8 `tuner worker`s, started at the same instant on empty databases, through a real MLflow
    server: one study, exactly n_trials, one parent run, one champion, `tuner predict` through the
    server, and the dashboard lists the study."""
    n_workers, n_trials = 8, 16
    (tmp_path / "studies").mkdir()
    # One holdout split (not the default 5 folds): the test is about the stack and its storage.
    body = '[validation]\nfraction = 0.2\n[pruner]\nname = "none"\n'
    write_study(tmp_path / "studies", "stack", n_trials=n_trials, body=body)
    env_file = dotenv(ROOT / ".env.example")
    password = env_file["POSTGRES_PASSWORD"]
    c = load_compose({**env_file, "TUNER_STUDY": "studies/stack.toml"})
    s = c["services"]
    ports = {"5000": str(free_port()), "8080": str(free_port())}

    def local(value: str) -> str:
        """Service names -> 127.0.0.1, published ports -> free ones, the databases -> test ones."""
        value = re.sub(
            r"postgresql\+psycopg://[^:]+:([^@]+)@postgres:5432/(\w+)",
            lambda m: f"postgresql+psycopg://postgres:{m.group(1)}@{PG_HOST}:{PG_PORT}/{pg_databases[m.group(2)]}",
            value,
        )
        value = value.replace("http://mlflow:", "http://127.0.0.1:").replace("0.0.0.0", "127.0.0.1")
        for old, new in ports.items():
            value = value.replace(old, new)
        return value.replace("/mlartifacts", str(tmp_path / "mlartifacts"))

    def process(service: str, **extra: str) -> tuple[list[str], dict[str, str]]:
        spec = s[service]
        cmd = [local(str(a)) for a in spec["command"]]
        program = {"tuner": [sys.executable, "-m", "tuner"], "mlflow": [sys.executable, "-m", "mlflow"]}[cmd[0]]
        env = tuner_env(**{k: local(str(v)) for k, v in spec["environment"].items()}, **extra)
        env.pop("TUNER_WORKER_INDEX", None)
        return program + cmd[1:], env

    procs: list[subprocess.Popen] = []
    workers: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        cmd, env = process("mlflow")
        cmd[cmd.index("--workers") + 1] = "1"  # 2 cores here
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path,
                env=env,
                start_new_session=True,
                stdout=open(logs / "mlflow.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
        cmd, env = process("dashboard")
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path,
                env=env,
                start_new_session=True,
                stdout=open(logs / "dashboard.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
        mlflow_url = f"http://127.0.0.1:{ports['5000']}"
        _wait_http(f"{mlflow_url}/health", procs)
        cmd, env = process("worker")
        assert env["MLFLOW_TRACKING_URI"] == mlflow_url
        for _ in range(n_workers):  # at the same instant, on empty databases
            workers.append(
                subprocess.Popen(
                    cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outs = [w.communicate(timeout=420)[0] for w in workers]
        assert [w.returncode for w in workers] == [0] * n_workers, [o[-1500:] for o in outs]
        text = "\n".join(outs)
        assert not re.search(r"already exists|duplicate|Traceback", text, re.I), text
        assert password not in text
        storage = env["TUNER_STORAGE"]
        check_study(storage, mlflow_url, "stack", n_trials)

        import optuna
        from mlflow import MlflowClient

        assert [st.study_name for st in optuna.get_all_study_summaries(storage)] == ["stack"]
        client = MlflowClient(tracking_uri=mlflow_url)
        exp = client.get_experiment_by_name("stack")
        parents = client.search_runs([exp.experiment_id], "tags.`tuner.role` = 'launch'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sum("model registered" in o for o in outs) == 1  # promoted once, by the last worker
        versions = client.search_model_versions("name = 'stack'")
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias("stack", "champion").version) == "1"
        # artifacts went through the server into its --artifacts-destination
        assert any((tmp_path / "mlartifacts").rglob("weights.pt"))

        r = run_tuner("predict", "stack@champion", "--input", str(ROOT / "data" / "cars.csv"), cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        rows = r.stdout.strip().splitlines()
        assert len(rows) == 33  # a header and the 32 cars
        assert all(math.isfinite(float(x)) for x in rows[1:])

        dash = f"http://127.0.0.1:{ports['8080']}"
        _wait_http(f"{dash}/api/studies", procs)
        with urllib.request.urlopen(f"{dash}/api/studies", timeout=10) as resp:
            studies = json.load(resp)["study_summaries"]
        assert [st["study_name"] for st in studies] == ["stack"]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        _stop(procs)
