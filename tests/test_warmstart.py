"""Warm start: `[[enqueue]]` params of the study file and `--warm-start-from OTHER[:K]` run first,
once, on the sequential and the fused loop, counted in `n_trials`; params that do not fit the
space are refused (study file) or dropped with a note (other study). Real SQLite studies."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import mlflow_store, write_study
from tuner.cli import main
from tuner.config import load_spec
from tuner.errors import ConfigError
from tuner.session import launch
from tuner.warmstart import parse_warm_start

ENQUEUE = (
    "[[enqueue]]\nlr = 0.05\nepochs = 3\nbatch_size = 8\nhidden_size = 4\nactivation = \"tanh\"\n"
    "[[enqueue]]\nlr = 0.002\nhidden_size = 7\n"  # some params only: the sampler draws the others
)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return mlflow_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_enqueued_params_run_first_once_and_count_in_n_trials(tmp_path: Path, tracking: str, execution: str) -> None:
    study_file = write_study(tmp_path, "warm", n_trials=3, execution=execution, body=ENQUEUE)
    spec = load_spec(study_file)
    storage = f"sqlite:///{tmp_path / 'warm.db'}"
    summary = launch(spec, storage=storage, tracking_uri=tracking, progress=False, report=False)
    assert summary.warm_start == ["warm start: 2 trial(s) enqueued from the study file's [[enqueue]]"]
    assert summary.execution.startswith(execution) and summary.n_finished == 3
    trials = _study(storage, spec.name).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert trials[0].params == {"lr": 0.05, "epochs": 3, "batch_size": 8, "hidden_size": 4, "activation": "tanh"}
    assert (trials[1].params["lr"], trials[1].params["hidden_size"]) == (0.002, 7)
    # a relaunch (and every worker of a pool) enqueues nothing twice
    again = launch(spec, n_trials=4, storage=storage, tracking_uri=tracking, progress=False, report=False)
    assert again.warm_start is None and again.n_finished == 4
    trials = _study(storage, spec.name).trials
    assert len(trials) == 4 and sum(t.params["lr"] == 0.05 for t in trials) == 1
    assert not [t for t in trials if t.state.name == "WAITING"]


def test_enqueued_params_outside_the_space_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = "[[enqueue]]\nlr = 2.0\nepochs = 2.5\nactivation = \"elu\"\nwidth = 3\n"
    with pytest.raises(ConfigError) as e:
        load_spec(write_study(tmp_path, "bad", body=bad))
    message = str(e.value)
    assert "\n" not in message
    assert "enqueue[0].lr: 2.0 is outside the space [0.001, 0.1]; change it or widen space.lr" in message
    assert "enqueue[0].epochs: 2.5 is not a whole number; space.epochs is int" in message
    assert "enqueue[0].activation: 'elu' is not one of ['relu', 'tanh']; change it or widen space.activation" in message
    assert "enqueue[0].width: not in the search space" in message and "remove it or add space.width" in message
    # through the CLI: exit 2, one line, nothing written
    capsys.readouterr()
    study_file = tmp_path / "bad.toml"
    assert main(["launch", str(study_file), "--storage", f"sqlite:///{tmp_path / 'bad.db'}",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "enqueue[0].lr" in err
    assert not (tmp_path / "bad.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_warm_start_from_another_study_takes_its_best_trials_that_fit(
    tmp_path: Path, tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = load_spec(write_study(tmp_path, "first", n_trials=4, execution="sequential"))
    launch(first, storage=storage, tracking_uri=tracking, progress=False, report=False)
    done = _study(storage, "first")
    best_two = sorted((t for t in done.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, t.number))[:2]
    # the second study's space: another activation, which none of the first study's trials fits
    space = ('lr = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
             'epochs = { type = "int", low = 2, high = 3 }\n'
             'batch_size = { type = "categorical", choices = [8, 16] }\n'
             'hidden_size = { type = "int", low = 2, high = 8 }\n'
             'activation = { type = "fixed", value = "sigmoid" }\n')
    second = write_study(tmp_path, "second", n_trials=3, execution="sequential", space=space)
    capsys.readouterr()
    assert main(["--debug", "launch", str(second), "--storage", storage, "--tracking-uri", tracking, "--no-progress",
                 "--no-report", "--warm-start-from", "first:2"]) == 0
    err = capsys.readouterr().err
    assert "warm start: 2 trial(s) enqueued from the 2 best trials of study 'first'" in err
    numbers = ", ".join(str(t.number) for t in best_two)
    assert ("warm start: dropped params of study 'first' that do not fit this search space (the sampler draws "
            f"them): activation (trials {numbers})") in err
    trials = _study(storage, "second").trials
    for mine, theirs in zip(trials[:2], best_two):
        kept = {k: v for k, v in theirs.params.items() if k != "activation"}
        assert mine.params == {**kept, "activation": "sigmoid"}
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    # an unknown study is one line naming the studies there
    capsys.readouterr()
    assert main(["launch", str(second), "--storage", storage, "--tracking-uri", tracking, "--no-progress",
                 "--warm-start-from", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --warm-start-from: no study 'nope' in ")


def test_warm_start_argument_is_other_study_and_an_optional_count() -> None:
    assert parse_warm_start("cars-mlp") == ("cars-mlp", 5)
    assert parse_warm_start("cars-mlp:3") == ("cars-mlp", 3)
    assert parse_warm_start("studies/a.toml:2") == ("studies/a.toml", 2)
    with pytest.raises(ConfigError, match=r"write OTHER_STUDY\[:K\] with K a whole number > 0"):
        parse_warm_start("cars-mlp:0")
