"""The benchmark harness runs end to end in its smallest mode and writes a complete report.

No timing is asserted here (speed is reported by ``python -m benchmarks.compare``, not tested):
the test checks that every metric is present and finite, and that the quality guard holds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tuner_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=tuner_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "compare-smoke.md").read_text().startswith("| metric | measured | goal |")
    return json.loads((out / "compare-smoke.json").read_text())


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_has_every_metric_with_finite_values(smoke_report: dict) -> None:
    m = smoke_report["metrics"]
    assert set(m) == {"m1_m5", "m3", "m4", "m2", "cli"}
    for key in ("m1_ratio", "m5_ratio", "m5_tuner_median_ms", "m5_baseline_median_ms", "m5_tuner_median_cpu_ms"):
        assert _finite(m["m1_m5"][key]) and m["m1_m5"][key] > 0, key
    assert len(m["m1_m5"]["tuner"]["wall_s"]) == len(m["m1_m5"]["baseline"]["wall_s"]) == 2
    for key in ("m3_cars_ratio", "m3_large_ratio"):
        assert _finite(m["m3"][key]) and m["m3"][key] > 0, key
    csv = m["m3"]["csv"]
    assert csv["rows"] == 20_000 and _finite(csv["csv_time_ratio"]) and _finite(csv["csv_peak_ratio"])
    assert _finite(m["m4"]["m4_ratio"]) and m["m4"]["target_rmse"] > 0
    assert m["m2"]["status"] == "ok", m["m2"]
    assert 1 <= m["m2"]["m2_trials"] <= 51
    assert _finite(m["cli"]["cli_help_s"])
    assert smoke_report["machine"]["cpus"] >= 1
    # every row of the table states a goal and a verdict
    rows = smoke_report["table"].splitlines()[2:]
    assert len(rows) == 10 and all(r.rstrip().endswith(("met |", "n/a |")) for r in rows)


def test_quality_guard_holds(smoke_report: dict) -> None:
    """tuner's best validation RMSE is not worse than the baseline's beyond the seed spread, and
    pruning does not cost quality beyond it either."""
    for name in ("m1_m5", "m4"):
        guard = smoke_report["metrics"][name]["quality_guard"]
        assert guard["ok"], (name, guard)
        assert _finite(guard["tuner"]["median"]) and _finite(guard["baseline"]["median"])



def test_quality_benchmark_smoke_run_prints_the_table(tmp_path) -> None:
    """benchmarks/quality.py in its smallest mode: one table, one seed, a few trials, both arms
    (a real launch and ``tuner predict`` per arm); every cell finite."""
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--tables", "cars", "--seeds", "1", "--n-trials", "3", "--out", str(out)],
        cwd=ROOT, env=tuner_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| cars |")]
    assert len(table) == 1 and "met (" in table[0]
    (row,) = json.loads(out.read_text())
    for key in ("linear", "hist_gradient_boosting", "single", "ensemble", "single_selection", "ensemble_selection"):
        assert _finite(row[key]) and row[key] > 0, key
    assert row["n_test"] == 7 and row["single_ensemble"] is False


def test_host_work_benchmark_measures_the_host_work_and_restores_the_shuffles() -> None:
    """benchmarks/host_work.py (also gpu_check's part "host"): every trial and epoch counted,
    the host work a positive part of the run, and Bank's shuffle setting as it was."""
    import torch

    from benchmarks.host_work import host_rows
    from tuner.bank import Bank

    before, threads = Bank.vector_shuffles, torch.get_num_threads()
    rows = host_rows([8], 3)
    assert [(r["kind"], r["K"], r["trials"]) for r in rows] == [("uniform", 8, 8), ("mixed", 8, 32)]
    for r in rows:
        assert 0 < r["host_s"] < r["total_s"] and r["ceiling"] > 0 and r["model_steps"] > 0
    assert rows[0]["model_steps"] == 8 * 3 * 4  # 26 rows in batches of 8: 4 steps an epoch
    assert Bank.vector_shuffles is before
    assert torch.get_num_threads() == threads  # measured on one thread, the process's setting restored


def test_the_gpu_check_runs_every_part_as_a_dry_run_on_the_cpu() -> None:
    """benchmarks/gpu_check.py waits for a GPU session with minutes of device time: every part
    runs here first (``--cpu``, tiny sizes), so a broken part is found before it costs them."""
    args = ["--cpu", "--rows", "2000", "--steps", "5", "--fused-epochs", "1", "--study-trials", "2", "--fused-k", "16"]
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=tuner_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for heading in ("fused trials on cpu", "host work of the uniform fused rows", "device: cpu (1 thread); 2,000 rows",
                    "cars MLP study on cpu"):
        assert heading in out, out
    assert out.count("train_many") == 2  # uniform and mixed at K=16
    assert out.index("device: cpu") < out.index("cars MLP study")  # m3 before the longest part
    studies = [line.split()[0] for line in out.splitlines() if "best rmse" in line]
    assert studies == ["sequential", "fused"]
