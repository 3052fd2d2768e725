"""Wheels for the GPU machine: what ``python -m benchmarks.gpu_check`` needs that its image lacks.

    python -m benchmarks.gpu_wheels            # here: Python 3.12 wheels into .whl/ (~42 MiB, ignored by git)

The device tool's GPU machine runs Python 3.12 with torch, numpy, pandas, pyarrow, matplotlib,
requests and PyYAML, but no Optuna, MLflow or pydantic, and reaches no package index
(/work/.library/device: KINDS.md lists its packages, README.md how wheels travel). This
downloads, on a machine with PyPI, the wheels of the packages below at the versions installed in
this environment (the ones CI tests), for CPython 3.12 on manylinux x86-64. Then one device call,
with ``.whl`` carried, installs them beside the image's torch and runs the check::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    python3 -m benchmarks.gpu_check 2>&1 | tee $OUT/gpu_check.txt

Checked once without a GPU (2026-12-02): the same set for this machine's Python 3.11, installed
that way over a fresh venv holding only the image's packages, ran ``gpu_check --cpu`` (every part).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a cars study and gpu_check import (python -X importtime over `gpu_check --cpu`, every
# part) that the device image lacks (KINDS.md, read 2026-11-17), and typing_extensions: the image
# has one, of a version not listed, and pydantic needs >= 4.16.
MISSING = (
    "alembic", "annotated-types", "cachetools", "cffi", "colorlog", "cryptography", "databricks-sdk", "fastapi",
    "google-auth", "importlib_metadata", "Mako", "mlflow", "mlflow-skinny", "mlflow-tracing", "opentelemetry-api",
    "opentelemetry-proto", "opentelemetry-sdk", "opentelemetry-semantic-conventions", "optuna", "plotly", "pydantic",
    "pydantic_core", "PySocks", "sniffio", "SQLAlchemy", "sqlparse", "starlette", "typing-inspection",
    "typing_extensions",
)
# pip matches a wheel's manylinux tag exactly: the glibc versions wheels of these are built for.
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64"]


def download(dest: Path, python: str) -> list[Path]:
    """Each package's wheel at this environment's version into ``dest`` (other versions there removed)."""
    dest.mkdir(exist_ok=True)
    for name in MISSING:
        pin = f"{name}=={version(name)}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), pin]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: no {python} wheel of {pin}: {done.stderr.strip().splitlines()[-1]}")
    wanted = {_key(n) for n in MISSING}
    wheels = []
    for wheel in sorted(dest.glob("*.whl")):
        dist, ver = wheel.name.split("-")[:2]
        if _key(dist) not in wanted or ver != version(dist.replace("_", "-")):
            wheel.unlink()  # a stale version: two of one package stop the device's install
        else:
            wheels.append(wheel)
    return wheels


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--python", default="3.12", help="the device's Python (default 3.12)")
    args = ap.parse_args(argv)
    wheels = download(args.dest, args.python)
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest} (a device call carries 64 MiB in all)")
    if shutil.which("git") and (ROOT / ".git").exists() and args.dest.resolve().is_relative_to(ROOT):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(args.dest)], cwd=ROOT).returncode == 0
        if not ignored:
            print(f"warning: {args.dest} is not ignored by git; add it to .gitignore", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
