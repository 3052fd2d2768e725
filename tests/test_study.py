"""The study runner against a real SQLite study and a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import write_study
from tuner.config import load_spec
from tuner.errors import StorageError, TrackingError
from tuner.session import launch
from tuner.study import open_study


def _runs(tracking_uri: str, experiment: str) -> tuple[list, list]:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tuner.role") == "launch"]
    children = [r for r in runs if r.data.tags.get("tuner.role") == "trial"]
    return parents, children


def test_launch_logs_one_child_run_per_trial_and_registers_a_champion(
    tmp_path: Path, storage_url: str, tracking_uri: str
) -> None:
    spec = load_spec(write_study(tmp_path, n_trials=4, registered_model="cars-small"))
    summary = launch(spec, storage=storage_url, tracking_uri=tracking_uri, progress=False)

    study = optuna.load_study(study_name="study", storage=storage_url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4 == summary.n_finished == summary.n_run
    assert not study.get_trials(states=(TrialState.RUNNING,))
    parents, children = _runs(tracking_uri, "study")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    by_id = {r.info.run_id: r for r in children}
    for t in finished:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["tuner.trial"] == str(t.number)
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
        assert {k: str(v) for k, v in t.params.items()} == run.data.params
        assert len(MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "rmse")) == len(t.intermediate_values)
        # Seed and launch record in one attribute: the study seed 0 plus the trial number.
        assert t.user_attrs["provenance"]["seed"] == t.number and "seed" not in t.user_attrs
        assert run.data.tags["tuner.seed"] == str(t.number)
    best = study.best_trial
    assert by_id[best.user_attrs["mlflow_run_id"]].data.metrics["final_rmse"] == pytest.approx(best.value)
    version = MlflowClient(tracking_uri).get_model_version_by_alias("cars-small", "champion")
    assert version.tags["tuner.trial"] == str(best.number)
    assert version.tags["tuner.study"] == "study"
    assert float(version.tags["tuner.value"]) == pytest.approx(best.value)
    assert version.tags["tuner.space_hash"] == spec.space_hash()
    assert summary.promotion is not None and summary.promotion.alias == "champion"
    assert set(summary.baselines) == {"mean", "least_squares", "least_squares_wt"}  # wt: the best single feature


def test_n_trials_is_the_total_of_finished_trials_across_launches(
    tmp_path: Path, storage_url: str, tracking_uri: str
) -> None:
    spec = load_spec(write_study(tmp_path, n_trials=2))
    first = launch(spec, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    again = launch(spec, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    more = launch(spec, n_trials=5, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    assert (first.n_run, again.n_run, more.n_run) == (2, 0, 3)
    assert more.n_finished == 5
    assert again.promotion is not None and not again.promotion.new_version  # nothing new to register
    parents, children = _runs(tracking_uri, "study")
    assert len(parents) == 2 and len(children) == 5  # a launch with nothing to run opens no run


def test_pruning_checks_against_the_finished_trials_read_once_decide_as_should_prune(storage_url: str) -> None:
    from tuner.pruning import FinishedTrials
    from tuner.study import open_storage

    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    study = optuna.create_study(storage=open_storage(storage_url), study_name="p", pruner=pruner)
    for curve in ([3.0, 2.0, 1.0], [4.0, 3.0, 2.0], [5.0, 4.0, 3.0]):
        done = study.ask()
        for step, value in enumerate(curve):
            done.report(value, step)
        study.tell(done, curve[-1])
    trial = study.ask()
    judge = FinishedTrials(study, study.get_trials())  # the gate's view, read once per ask
    decisions = []
    for step, value in enumerate([3.5, 3.0, 5.0]):  # medians at steps 1, 2: 3.0, 2.0; best so far 3.0
        trial.report(value, step)
        decisions.append((judge.prune(trial), trial.should_prune()))
    assert decisions == [(False, False), (False, False), (True, True)]


def test_linear_study_champion_is_the_least_squares_line(workdir: Path, storage_url: str, tracking_uri: str) -> None:
    """The seed check through MLflow's own loader: cars_linear's champion, refit on all 32 cars
    after a 20% holdout chose it, is their least-squares line (tests/test_promotion.py checks
    the same through `tuner predict`)."""
    spec = load_spec(workdir / "studies" / "cars_linear.toml")
    summary = launch(spec, n_trials=4, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/cars-linear@champion")
    import pandas as pd

    rows = pd.read_csv(workdir / "data" / "cars.csv")
    (a_ls, b_ls), *_ = np.linalg.lstsq(np.c_[np.ones(len(rows)), rows["wt"]], rows["mpg"], rcond=None)
    probe = pd.DataFrame({"wt": [0.0, 1.0]})
    intercept, at_one = model.predict(probe)
    assert intercept == pytest.approx(a_ls, rel=0.01)
    assert at_one - intercept == pytest.approx(b_ls, rel=0.01)
    assert summary.best_params["hidden_size"] == 0


def test_changed_search_space_is_refused_and_trials_are_kept(
    tmp_path: Path, storage_url: str, tracking_uri: str
) -> None:
    spec = load_spec(write_study(tmp_path, n_trials=2))
    launch(spec, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    changed = load_spec(write_study(tmp_path, n_trials=4, space=(
        'lr = { type = "float", low = 1e-4, high = 1e-1, log = true }\n'
        'epochs = { type = "int", low = 2, high = 3 }\n'
        'batch_size = { type = "categorical", choices = [8, 16] }\n'
        'hidden_size = { type = "int", low = 2, high = 8 }\n'
        'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    )))
    with pytest.raises(StorageError, match=r"another search space \(lr: low 0.001 -> 0.0001\).*--allow-space-change"):
        launch(changed, storage=storage_url, tracking_uri=tracking_uri, progress=False)
    assert len(optuna.load_study(study_name="study", storage=storage_url).trials) == 2
    resumed = launch(changed, storage=storage_url, tracking_uri=tracking_uri, progress=False, allow_space_change=True)
    assert resumed.n_finished == 4


def test_storage_in_a_missing_folder_is_refused_before_anything_is_written(tmp_path: Path, tracking_uri: str) -> None:
    spec = load_spec(write_study(tmp_path))
    with pytest.raises(StorageError, match=r"storage folder '.*nowhere' does not exist"):
        launch(spec, storage=f"sqlite:///{tmp_path / 'nowhere' / 'o.db'}", tracking_uri=tracking_uri, progress=False)


def test_unreachable_tracking_store_is_refused_before_the_study_is_created(tmp_path: Path, storage_url: str) -> None:
    spec = load_spec(write_study(tmp_path))
    with pytest.raises(TrackingError, match=r"MLflow store folder '.*nowhere' does not exist"):
        launch(spec, storage=storage_url, tracking_uri=f"sqlite:///{tmp_path / 'nowhere' / 'm.db'}", progress=False)
    assert not (tmp_path / "optuna.db").exists()


def test_postgres_url_with_a_closed_port_names_the_host_and_hides_the_password(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path))
    with pytest.raises(StorageError) as err:
        open_study(spec, "postgresql+psycopg://tuner:s3cret@127.0.0.1:1/optuna")
    text = str(err.value)
    assert "127.0.0.1" in text and "port 1" in text or ":1/" in text
    assert "s3cret" not in text and "***" in text


def test_shipped_mlp_study_is_resumable_on_its_default_paths(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    spec = load_spec(workdir / "studies" / "cars_mlp.toml")
    s = launch(spec, n_trials=2, progress=False)
    assert (workdir / "studies" / "cars_mlp.db").exists() and (workdir / "mlflow.db").exists()
    assert (workdir / "mlartifacts").is_dir()
    assert s.n_finished == 2 and s.storage == f"sqlite:///{workdir / 'studies' / 'cars_mlp.db'}"


def test_accuracy_ties_go_to_the_lower_log_loss_not_the_earlier_trial(storage_url: str) -> None:
    """The one selection rule (promotion, `tuner best`, `tuner promote`, `tuner studies`, reports):
    equal accuracy (to float32 precision) is broken by validation log loss, then trial order."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.browse import list_studies
    from tuner.selection import best_trial, ranked_trials

    study = optuna.create_study(storage=storage_url, study_name="ties", direction="maximize")
    study.set_metric_names(["accuracy"])
    dist = {"lr": FloatDistribution(1e-3, 1.0)}
    # trial 3's accuracy differs from 0.9 in the 8th digit only: float32 noise, the same value
    for accuracy, log_loss in [(0.9, 0.30), (0.8, 0.05), (0.9, 0.12), (0.9000001, 0.50)]:
        study.add_trial(create_trial(value=accuracy, params={"lr": 0.1}, distributions=dist,
                                     user_attrs={"accuracy": accuracy, "log_loss": log_loss}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.2}, distributions=dist))
    assert study.best_trial.number == 3  # Optuna's own rule: the largest float, whatever its log loss
    assert best_trial(study).number == 2
    assert [t.number for t in ranked_trials(study.trials, "maximize", "accuracy")] == [2, 0, 3, 1]
    row = next(r for r in list_studies(storage_url) if r.name == "ties")
    assert (row.best_trial, row.best_value) == (2, 0.9)

    # regression metrics are continuous: ties (rare) go to the earlier trial
    rmse = optuna.create_study(storage=storage_url, study_name="rmse", direction="minimize")
    rmse.set_metric_names(["rmse"])
    for value in (2.0, 1.5, 1.5):
        rmse.add_trial(create_trial(value=value, params={"lr": 0.1}, distributions=dist, user_attrs={"log_loss": 9.0}))
    assert best_trial(rmse).number == 1


@pytest.mark.parametrize("execution", ["sequential", "fused"])
def test_every_classification_trial_records_the_log_loss_that_breaks_ties(
    tmp_path: Path, tracking_uri: str, execution: str
) -> None:
    from tuner.selection import best_trial, ranked_trials

    spec = load_spec(write_study(tmp_path, "am", target="am", n_trials=3, execution=execution, body="[validation]\nfolds = 2\n"))
    storage = f"sqlite:///{tmp_path / 'am.db'}"
    summary = launch(spec, storage=storage, tracking_uri=tracking_uri, progress=False, report=False)
    assert summary.execution.startswith(execution)
    study = optuna.load_study(study_name="am", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(isinstance(t.user_attrs.get("log_loss"), float) for t in complete)
    assert summary.best_number == best_trial(study).number == ranked_trials(study.trials, "maximize", "accuracy")[0].number
    assert summary.promotion is not None and summary.promotion.trial_number == summary.best_number


def test_a_resumed_launch_does_not_draw_the_first_launchs_params_again(
    tmp_path: Path, storage_url: str, tracking_uri: str
) -> None:
    # A seeded sampler replays its stream from the start: before the fix trials 3-5 repeated 0-2.
    spec = load_spec(write_study(tmp_path, n_trials=3))
    launch(spec, storage=storage_url, tracking_uri=tracking_uri, progress=False, report=False)
    launch(spec, n_trials=6, storage=storage_url, tracking_uri=tracking_uri, progress=False, report=False)
    trials = optuna.load_study(study_name=spec.name, storage=storage_url).get_trials()
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(drawn) == 6 and len(set(drawn)) == 6
