"""`make lint` in the suite: ruff over the code, tests and benchmarks, mypy over the package and
the benchmarks. CI runs the README's test command only, so without this a type error in a
benchmark (23 of them sat in five files of benchmarks/) never failed a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "tuner", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_finds_nothing_in_the_package_and_the_benchmarks() -> None:
    done = _run("mypy", "tuner", "benchmarks")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout
