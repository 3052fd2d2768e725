"""Reproducibility: what each trial records about where it ran, and replaying a stored trial.

Every trial of a launch stores its seed (and its folds' seeds), the torch/optuna/mlflow
versions, the device and the SHA-256 of the data file (the ``provenance`` user attribute in
Optuna, tags on the MLflow run). ``replay`` retrains a trial from its stored params and seed through the same
``train()`` (or the same cross-validation) and puts the original metric beside the new one; on
CPU with the same data and versions they are equal bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.errors import TunerError

if TYPE_CHECKING:
    import optuna
    import torch

    from tuner.config import StudySpec
    from tuner.validation import ValidationPlan

__all__ = ["provenance", "trial_seed", "file_sha256", "device_name", "replay", "Replay"]


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, read once per size and modification time (a launch asks twice: the
    study's data check and the trials' provenance)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cpu (x86_64)``, ``mps``."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.machine() or 'unknown'})"
    return str(device)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def provenance(spec: StudySpec, device: torch.device, plan: ValidationPlan | None = None) -> dict[str, Any]:
    """What a trial needs to be reproduced, beyond its params and seed."""
    record: dict[str, Any] = {
        "torch": _version("torch"),
        "optuna": _version("optuna"),
        "mlflow": _version("mlflow"),
        "device": device_name(device),
        "data_sha256": file_sha256(spec.data),
    }
    if plan is not None:
        record["validation"] = plan.describe()
    return record


def trial_seed(trial: optuna.trial.FrozenTrial, default: int) -> int:
    """The seed a trial trained with: in its ``provenance`` attribute (studies run before it moved
    there: a ``seed`` attribute); ``default`` where neither is recorded."""
    attrs = trial.user_attrs
    return int(attrs.get("provenance", {}).get("seed", attrs.get("seed", default)))


@dataclass
class Replay:
    """One trial retrained: the stored metric beside the replayed one."""

    study: str
    trial: int
    state: str
    metric: str
    epoch: int  # the epoch the compared values belong to (a pruned trial's last report)
    original: float
    replayed: float
    params: dict[str, Any]
    seed: int
    fold_metrics: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.original == self.replayed

    @property
    def difference(self) -> float:
        return self.replayed - self.original


def replay(spec: StudySpec, trial_number: int, *, storage: str | None = None, device: str | None = None) -> Replay:
    """Retrain trial ``trial_number`` of the stored study from its params and seed.

    A pruned trial is replayed up to the epoch of its last report and compared there.

    Raises:
        TunerError: the study or trial does not exist, or the trial never reported a value.
    """
    import torch
    from optuna.trial import TrialState

    from tuner.inputs import load_data
    from tuner.study import open_study
    from tuner.train import resolve_device, train
    from tuner.validation import cross_validate, load_folds

    study = open_study(spec, storage, create=False)
    trials = study.get_trials(deepcopy=False)
    found = [t for t in trials if t.number == trial_number]
    if not found:
        raise TunerError(f"study {spec.name!r} has no trial {trial_number}; it has trials 0-{len(trials) - 1}")
    t = found[0]
    if t.state == TrialState.COMPLETE:
        original = float(t.value if t.value is not None else math.nan)
        epoch = max(t.intermediate_values, default=-1)
    elif t.intermediate_values:
        epoch = max(t.intermediate_values)
        original = float(t.intermediate_values[epoch])
    else:
        raise TunerError(f"trial {trial_number} is {t.state.name} and never reported a value: nothing to compare")
    notes: list[str] = []
    recorded = t.user_attrs.get("provenance", {})
    try:
        dev = resolve_device(device or spec.device)
    except ValueError as e:
        raise TunerError(str(e)) from None
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as launch does: the same kernels, the same sums
    current = provenance(spec, dev)
    for key in ("data_sha256", "torch", "device"):
        if key in recorded and recorded[key] != current[key]:
            notes.append(f"{key} differs from the trial's: {recorded[key]} then, {current[key]} now")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, frame = load_data(spec)
        cv = load_folds(spec, frame)
    if "validation" in recorded and recorded["validation"] != cv.plan.describe():
        notes.append(f"validation differs: {recorded['validation']!r} then, {cv.plan.describe()!r} now")
    seed = trial_seed(t, spec.seed + t.number)
    stop_after = epoch if t.state != TrialState.COMPLETE else None

    def hook(e: int, metrics: dict[str, float]) -> bool:
        return stop_after is not None and e >= stop_after

    fold_values: list[float] = []
    if cv.folds:
        folds = [f.to(dev) for f in cv.folds]
        result: Any = cross_validate(t.params, folds, device=dev, seed=seed, on_epoch_end=hook)
        fold_values = [m[spec.metric] for m in result.fold_metrics if spec.metric in m]
    else:
        result = train(t.params, prepared.to(dev), device=dev, seed=seed, on_epoch_end=hook)
    if stop_after is not None and len(result.history) > stop_after:
        replayed = result.history[stop_after][spec.metric]
    else:
        replayed = result.metrics.get(spec.metric, math.nan)
    return Replay(
        study=spec.name,
        trial=t.number,
        state=t.state.name,
        metric=spec.metric,
        epoch=epoch,
        original=original,
        replayed=float(replayed),
        params=dict(t.params),
        seed=seed,
        fold_metrics=fold_values,
        warnings=notes,
    )
