from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tests.conftest import ROOT, write_study
from tuner.config import load_spec
from tuner.inputs import load_data
from tuner.report import SECTIONS, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-3, 1e-1, log=True),
    "epochs": IntDistribution(2, 3),
    "batch_size": CategoricalDistribution([8, 16]),
    "hidden_size": IntDistribution(2, 8),
    "activation": CategoricalDistribution(["relu", "tanh"]),
}


def _trial(number: int, state: TrialState, values: list[float]) -> optuna.trial.FrozenTrial:
    params = {"lr": 0.001 * (number + 1), "epochs": 2 + number % 2, "batch_size": [8, 16][number % 2],
              "hidden_size": 2 + number, "activation": ["relu", "tanh"][number % 2]}
    return create_trial(
        state=state,
        value=values[-1] if state == TrialState.COMPLETE else None,
        params=params,
        distributions=DISTRIBUTIONS,
        intermediate_values=dict(enumerate(values)),
        user_attrs={"rmse": values[-1], "mae": values[-1] / 2, "r2": 0.5} if state == TrialState.COMPLETE else {},
    )


@pytest.fixture
def spec_and_data(tmp_path: Path) -> tuple[Any, Any, Any]:
    spec = load_spec(write_study(tmp_path, "report"))
    prepared, frame = load_data(spec)
    return spec, prepared, frame


def test_report_draws_optuna_plots_and_baselines_and_says_what_it_left_out(spec_and_data: Any, tmp_path: Path) -> None:
    spec, prepared, frame = spec_and_data
    study = optuna.create_study(study_name="report")
    for i, (state, values) in enumerate([
        (TrialState.COMPLETE, [5.0, 4.0, 3.5]),
        (TrialState.PRUNED, [6.0, 5.5]),
        (TrialState.COMPLETE, [4.5, 3.0, 2.5]),
        (TrialState.COMPLETE, [5.5, 4.5, 4.0]),
    ]):
        study.add_trial(_trial(i, state, values))
    files = write_report(study, spec, tmp_path / "r" / "study.html", prepared=prepared, frame=frame, tracker=None)
    assert files.skipped == {"predicted_vs_actual": "no MLflow tracker given"}
    assert sorted(files.pngs) == sorted(k for k in SECTIONS if k != "predicted_vs_actual")
    assert files.pngs["history"] == tmp_path / "r" / "study.history.png"
    text = files.html.read_text()
    assert "4 trials (3 COMPLETE, 1 PRUNED); best trial 2: rmse = 2.5;" in text
    assert "<td>tuned (trial 2)</td><td>2.5000</td><td>1.2500</td><td>0.5000</td>" in text
    assert "<td>mean</td>" in text and "<td>least_squares</td>" in text
    assert "Not available: no MLflow tracker given" in text


def test_report_of_a_study_without_complete_trials_is_written_with_reasons(spec_and_data: Any, tmp_path: Path) -> None:
    spec, prepared, frame = spec_and_data
    study = optuna.create_study(study_name="report")
    study.add_trial(_trial(0, TrialState.PRUNED, [6.0, 5.5]))
    files = write_report(study, spec, tmp_path / "empty.html", prepared=prepared, frame=frame, tracker=None)
    assert files.skipped == {
        "history": "no complete trial yet",
        "importances": "no complete trial yet",
        "parallel_coordinate": "no complete trial yet",
        "slice": "no complete trial yet",
        "predicted_vs_actual": "no MLflow tracker given",
        "baselines": "no complete trial to compare",
    }
    assert list(files.pngs) == ["intermediate_values"]  # the pruned trial's curve
    text = files.html.read_text()
    assert "no complete trial" in text
    for key in SECTIONS:
        assert f'<section id="{key}">' in text


def test_launch_report_imports_no_matplotlib_and_a_full_report_after_it_draws_every_png(tmp_path: Path) -> None:
    # A launch's report is plotly only (matplotlib's import is 0.6 s of every launch); `tuner
    # report` later in the same process must still get Optuna's matplotlib plots.
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import optuna
        from tests.conftest import ROOT, write_study
        from tests.test_report import _trial
        from tuner.config import load_spec
        from tuner.inputs import load_data
        from tuner.report import write_report
        spec = load_spec(write_study(Path({str(tmp_path)!r}), "report"))
        prepared, frame = load_data(spec)
        study = optuna.create_study(study_name="report")
        for i in range(3):
            study.add_trial(_trial(i, optuna.trial.TrialState.COMPLETE, [5.0 - i, 4.0 - i]))
        launch = write_report(study, spec, Path({str(tmp_path)!r}) / "launch.html", prepared=prepared, frame=frame, full=False)
        print(sorted(launch.pngs), "matplotlib" in sys.modules)
        full = write_report(study, spec, Path({str(tmp_path)!r}) / "full.html", prepared=prepared, frame=frame)
        print(sorted(full.pngs))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    launch_line, full_line = out.stdout.strip().splitlines()
    assert launch_line == "[] False"
    assert full_line == str(sorted(k for k in SECTIONS if k != "predicted_vs_actual"))
