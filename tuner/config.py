"""Study definitions: a TOML file validated once, at the boundary, into a typed StudySpec.

Study files are data, not code: loading one never executes anything from it. pydantic does the
type checking and collects every problem of one file, so the user fixes them all in one go.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuner import stores
from tuner.errors import ConfigError, did_you_mean

__all__ = [
    "ACTIVATIONS",
    "OPTIMIZERS",
    "REQUIRED_PARAMS",
    "EXTRA_PARAMS",
    "METRICS",
    "SAMPLERS",
    "PRUNERS",
    "StudySpec",
    "load_spec",
    "fit_problems",
    "fit_value",
]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "leaky_relu", "elu", "silu")
OPTIMIZERS = ("adam", "adamw", "sgd")
REQUIRED_PARAMS = ("lr", "epochs", "batch_size", "hidden_size", "activation")
# Dimensions a study file may add beyond the five every study samples.
EXTRA_PARAMS = ("n_layers", "dropout", "weight_decay", "optimizer")
# metric -> direction that makes it better
METRICS: dict[str, Literal["minimize", "maximize"]] = {
    "rmse": "minimize",
    "mae": "minimize",
    "r2": "maximize",
    "accuracy": "maximize",
    "log_loss": "minimize",
    "f1_macro": "maximize",
}
REGRESSION_METRICS = ("rmse", "mae", "r2")
CLASSIFICATION_METRICS = ("accuracy", "log_loss", "f1_macro")
SAMPLERS = ("tpe", "random", "gp", "cmaes", "qmc")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")

# Python type each parameter's values must have.
_INT_PARAMS = {"epochs", "batch_size", "hidden_size", "n_layers"}
_FLOAT_PARAMS = {"lr", "dropout", "weight_decay"}
_CHOICE_PARAMS = {"activation": ACTIVATIONS, "optimizer": OPTIMIZERS}
# Smallest allowed value per numeric parameter, and whether it is exclusive.
_MINIMUM: dict[str, tuple[float, bool]] = {
    "lr": (0.0, True),
    "epochs": (1, False),
    "batch_size": (1, False),
    "hidden_size": (0, False),
    "n_layers": (1, False),
    "dropout": (0.0, False),
    "weight_decay": (0.0, False),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Union[int, float, str, bool]] = Field(min_length=1)


class FixedParam(_Strict):
    type: Literal["fixed"]
    value: Union[int, float, str, bool]


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam, FixedParam], Field(discriminator="type")]


class Validation(_Strict):
    fraction: float = Field(0.2, gt=0.0, lt=1.0)  # share of rows held out for validation
    seed: int | None = None  # None: the study's seed
    # k-fold cross-validation instead of one split (tuner.validation); neither set: 5-fold
    # under 5000 rows (validation.CV_BELOW_ROWS), else the split above.
    folds: int | None = Field(None, ge=2)
    repeats: int = Field(1, ge=1)  # cross-validation repeated with reshuffled folds
    # The champion is the best trial's params trained again on every row the trials saw
    # (scikit-learn's refit=True); false: register the holdout trial's own model.
    refit: bool = True
    # An untouched test part, split off (seeded, stratified for classification) before anything
    # else: no trial, baseline or refit sees it; the champion is scored on it once at promotion.
    test_fraction: float | None = Field(None, gt=0.0, le=0.5)

    @model_validator(mode="after")
    def _one_scheme(self) -> Validation:
        if self.folds is not None and "fraction" in self.model_fields_set:
            raise ValueError("set either fraction (one split) or folds (cross-validation), not both")
        if self.folds is None and "repeats" in self.model_fields_set:
            raise ValueError("repeats needs folds, e.g. validation = { folds = 5, repeats = 2 }")
        return self


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "gp", "cmaes", "qmc"] = "tpe"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the sampler


class PrunerSpec(_Strict):
    name: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    # Median pruning with a warm-up: do not judge a trial on its first noisy epochs.
    options: dict[str, Any] = Field(default_factory=lambda: {"n_startup_trials": 5, "n_warmup_steps": 5})


class Heartbeat(_Strict):
    interval: int = Field(10, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(60, ge=2)  # seconds without a heartbeat before a trial is stale
    max_retry: int = Field(1, ge=0)  # how often a stale trial is re-run with the same params


class Ensemble(_Strict):
    """A top-k ensemble champion (tuner.ensemble): Caruana's greedy selection with replacement
    over the out-of-fold predictions of the best ``candidates`` complete trials."""

    size: int = Field(5, ge=2)  # greedy picks (with replacement): integer member weights summing to this
    candidates: int = Field(20, ge=2)  # the best complete trials the picks are drawn from
    # Adopted only if its out-of-fold estimate beats the single best trial's by more than this
    # share of it (the picks were chosen on the same rows, so a hair's gain is noise).
    tolerance: float = Field(0.001, ge=0.0)
    # ...and only if it also wins cross-fitted: picked on the other folds, scored on each fold
    # (one split: on fifths of its validation rows), against the single best chosen the same way.
    cross_check: bool = True


class StudySpec(_Strict):
    """A validated study definition; paths are absolute."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: Path
    target: str
    features: list[str] | None = None  # None: every column but the target, ids and constants (tuner.columns)
    categorical: list[str] = Field(default_factory=list)  # numeric columns to treat as categories
    exclude: list[str] = Field(default_factory=list)  # columns never used as features
    # "balanced": cross-entropy weights n / (k * count) per class, counted on the training part.
    class_weight: Literal["balanced"] | None = None
    task: Literal["regression", "classification"] = "regression"  # load_spec infers it when unset
    n_trials: int = Field(50, gt=0)  # finished (complete + pruned) trials the study should reach
    timeout: float | None = Field(None, gt=0)  # seconds for one launch
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and the samplers take 0 .. 2**32 - 1
    metric: str = "rmse"  # unset: rmse (regression) or accuracy (classification)
    direction: Literal["minimize", "maximize"] | None = None  # None: the metric's own
    registered_model: str | None = None  # None: the study name
    storage: str | None = None  # None: a SQLite file next to the study file
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else mlflow.db in the project root (tuner.stores)
    device: str = "auto"
    # auto: fused (K trials as one batched model, tuner/fused.py) where a calibration at launch
    # measures it cheaper per trial-step than one trial at a time; else sequential.
    execution: Literal["auto", "sequential", "fused"] = "auto"
    # Epochs 0, k, 2k, ... (and a trial's last) are reported: Optuna intermediate values (the
    # pruner's steps) and MLflow metric rows. One grid for every trial, so the pruner compares
    # equal steps, at 1/k of the writes (each report, pruning check and metric row costs a
    # database round trip or ORM object). 1 = every epoch; the shipped studies use 10.
    report_every: int = Field(1, ge=1)
    validation: Validation = Validation()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    heartbeat: Heartbeat = Heartbeat()
    # None (the default): the champion is the single best trial; no predictions are stored.
    ensemble: Ensemble | None = None
    space: dict[str, Param]
    # [[enqueue]] tables: known-good params (all or some of the space's) that run first.
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    source: Path | None = None  # the study file this spec came from
    task_note: str | None = None  # set by tuner: why the task was inferred from the data

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict[str, Any]) -> dict[str, Any]:
        problems = []
        known = REQUIRED_PARAMS + EXTRA_PARAMS
        for name in space:
            if name not in known:
                problems.append(f"unknown parameter {name!r}{did_you_mean(name, known)}; choose from {list(known)}")
        for name in REQUIRED_PARAMS:
            if name not in space:
                problems.append(f"missing parameter {name!r} (every study samples {list(REQUIRED_PARAMS)})")
        for name, p in space.items():
            if name in known:
                problems.extend(f"space.{name}: {msg}" for msg in _param_problems(name, p))
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @field_validator("registered_model")
    @classmethod
    def _check_model_name(cls, name: str | None) -> str | None:
        # MLflow refuses these only when the model is registered, after every trial has run.
        if name is None:
            return name
        if not name.strip() or name != name.strip():
            raise ValueError(f"{name!r} must be a non-empty name without leading or trailing spaces")
        bad = sorted({c for c in name if c in "/:@\\"})
        if bad or ".." in name:
            shown = bad or [".."]
            raise ValueError(
                f"{name!r} cannot contain {shown} (MLflow refuses '/' and ':' and path-like names; '@' separates "
                "an alias in NAME@ALIAS); use letters, digits, '-', '_', '.' and spaces"
            )
        return name

    @model_validator(mode="after")
    def _check_metric(self) -> StudySpec:
        if self.class_weight is not None and self.task != "classification":
            raise ValueError(f"class_weight = {self.class_weight!r} needs task = \"classification\"; remove it")
        allowed = REGRESSION_METRICS if self.task == "regression" else CLASSIFICATION_METRICS
        if self.metric not in allowed:
            why = f" ({self.task_note}; set task to override)" if self.task_note else ""
            raise ValueError(
                f"metric {self.metric!r} does not fit task {self.task!r}{why}; choose one of {list(allowed)}"
            )
        return self

    @model_validator(mode="after")
    def _check_enqueue(self) -> StudySpec:
        problems = [f"enqueue[{i}].{name}: {msg}" for i, params in enumerate(self.enqueue)
                    for name, msg in fit_problems(params, self.space)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def study_direction(self) -> Literal["minimize", "maximize"]:
        return self.direction or METRICS[self.metric]

    @property
    def model_name(self) -> str:
        return self.registered_model or self.name

    @property
    def validation_seed(self) -> int:
        return self.seed if self.validation.seed is None else self.validation.seed

    @property
    def storage_url(self) -> str:
        """The study file's ``storage``, else ``<study file stem>.db`` next to it (``tuner.stores``)."""
        if self.storage:
            return self.storage
        return stores.default_storage_url(self.source or Path.cwd() / f"{self.name}.toml")

    @property
    def tracking(self) -> str:
        """The study file's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (containers and remote
        workers point at a server), else ``mlflow.db`` in the project root (``tuner.stores``)."""
        import os

        return (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or stores.default_tracking_uri(self.source or Path.cwd() / f"{self.name}.toml")
        )

    def space_dict(self) -> dict[str, Any]:
        """The search space as plain JSON-able data (what the space hash is taken over)."""
        return {k: self.space[k].model_dump() for k in sorted(self.space)}

    def space_hash(self) -> str:
        blob = json.dumps(self.space_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _param_problems(name: str, p: Any) -> list[str]:
    problems: list[str] = []
    values: list[Any]
    if isinstance(p, (FloatParam, IntParam)):
        if name in _CHOICE_PARAMS:
            return [f"is a choice; use type = 'categorical' with choices from {list(_CHOICE_PARAMS[name])}"]
        if name in _INT_PARAMS and isinstance(p, FloatParam):
            problems.append("must be type = 'int'")
        if p.low > p.high:
            problems.append(f"low ({p.low}) > high ({p.high}); swap them")
        elif p.low == p.high:
            problems.append(f"low == high ({p.low}) is a zero-width range; use {{ type = 'fixed', value = {p.low} }}")
        values = [p.low, p.high]
        if p.log and p.low <= 0:
            problems.append(f"log = true needs low > 0 (got low = {p.low})")
            values = [p.high]  # low's own minimum would say the same again
    elif isinstance(p, CategoricalParam):
        values = list(p.choices)
        if len(set(map(repr, values))) != len(values):
            problems.append(f"duplicate choices in {values}")
    else:
        values = [p.value]
    for v in values:
        problems.extend(_value_problems(name, v))
    return problems


def fit_problems(params: dict[str, Any], space: dict[str, Any]) -> list[tuple[str, str]]:
    """``(param, problem and fix)`` for each value of ``params`` that the search space cannot take
    (unknown name, wrong type, outside the range or the choices, off the step grid)."""
    problems = []
    for name, v in params.items():
        p = space.get(name)
        if p is None:
            problems.append((name, f"not in the search space {sorted(space)}; remove it or add space.{name}"))
            continue
        fix = f"change it or widen space.{name}"
        if isinstance(p, (FloatParam, IntParam)):
            kind = "float" if isinstance(p, FloatParam) else "int"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and not float(v).is_integer()):
                problems.append((name, f"{v!r} is not {'a number' if kind == 'float' else 'a whole number'}; space.{name} is {kind}"))
            elif not p.low <= v <= p.high:
                problems.append((name, f"{v!r} is outside the space [{p.low}, {p.high}]; {fix}"))
            elif p.step is not None and not math.isclose((v - p.low) / p.step, round((v - p.low) / p.step), abs_tol=1e-9):
                problems.append((name, f"{v!r} is off the step grid {p.low} + k * {p.step}; {fix}"))
        else:
            choices = p.choices if isinstance(p, CategoricalParam) else [p.value]
            if not any(type(v) is type(c) and v == c or (_is_num(v) and _is_num(c) and v == c) for c in choices):
                problems.append((name, f"{v!r} is not one of {choices}; {fix}"))
    return problems


def fit_value(name: str, value: Any, space: dict[str, Any]) -> Any:
    """``value`` as Optuna stores the parameter: float for float ranges, int for int ranges, the
    choice itself for categoricals (so a relaunch enqueues the same dict and is skipped)."""
    p = space[name]
    if isinstance(p, FloatParam):
        return float(value)
    if isinstance(p, IntParam):
        return int(value)
    choices = p.choices if isinstance(p, CategoricalParam) else [p.value]
    return next(c for c in choices if type(value) is type(c) and value == c or (_is_num(value) and _is_num(c) and value == c))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_problems(name: str, v: Any) -> list[str]:
    if name in _CHOICE_PARAMS:
        if v not in _CHOICE_PARAMS[name]:
            return [f"unknown {name} {v!r}; choose one of {sorted(_CHOICE_PARAMS[name])}"]
        return []
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return [f"{v!r} is not a number"]
    if name in _INT_PARAMS and not float(v).is_integer():
        return [f"{v!r} is not a whole number"]
    low, exclusive = _MINIMUM[name]
    if v < low or (exclusive and v == low):
        return [f"{v!r} must be {'>' if exclusive else '>='} {low}"]
    if name == "dropout" and v >= 1:
        return [f"{v!r} must be < 1"]
    return []


def check_options(kind: str, factory: Any, options: dict[str, Any]) -> None:
    """Refuse sampler/pruner options the Optuna class does not take, listing the ones it does."""
    accepted = {n for n, prm in inspect.signature(factory).parameters.items() if prm.kind is not prm.VAR_KEYWORD}
    accepted.discard("self")
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"unknown {kind} option(s) {unknown}; {factory.__name__} takes {sorted(accepted)}")


def load_spec(path: str | Path, **overrides: Any) -> StudySpec:
    """Read and validate a study file; ``overrides`` (not None) replace its top-level keys.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid; the message lists every problem.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study file {str(path)!r} does not exist; pass the path of a .toml file in studies/") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study file {str(path)!r} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read study file {str(path)!r}: {e}") from None
    raw.setdefault("name", path.stem)
    for key in ("source", "task_note"):
        if key in raw:
            raise ConfigError(f"{path}: {key!r} is set by tuner, not by the study file; remove it")
    raw["source"] = path.resolve()
    if isinstance(raw.get("data"), str):
        raw["data"] = (path.parent / raw["data"]).resolve()
    for key in ("storage", "tracking_uri"):  # a relative SQLite path means: beside the study file
        if isinstance(raw.get(key), str):
            raw[key] = stores.resolve_sqlite_url(raw[key], path.resolve().parent)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "task" not in raw and isinstance(raw.get("target"), str) and isinstance(raw.get("data"), Path):
        from tuner.tasks import infer_task

        inferred = infer_task(raw["data"], raw["target"])  # None: data unreadable, reported later
        if inferred is not None:
            raw["task"], raw["task_note"] = inferred
        elif raw.get("metric") in CLASSIFICATION_METRICS:
            # The data cannot tell (a missing file or column: the loader names it), the metric can;
            # otherwise "metric does not fit task 'regression'" would hide the real problem.
            raw["task"] = "classification"
    if "metric" not in raw and raw.get("task") == "classification":
        raw["metric"] = "accuracy"
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_errors(e)}") from None


def _format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = [x for x in err["loc"] if not str(x).startswith(("function-", "tagged-union"))]
        if len(where) >= 3 and where[0] == "space" and where[2] in _PARAM_TYPES:
            del where[2]  # the union's tag, not a key of the file
        loc = ".".join(str(x) for x in where)
        msg = err["msg"].removeprefix("Value error, ")
        if len(where) == 2 and where[0] == "space" and err["type"] in ("model_attributes_type", "dict_type"):
            parts.append(_type_problem(loc, err))
            continue
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            parent = err["loc"][:-1]
            hint = f" (did you mean {_SYNONYMS[key]!r}?)" if not parent and key in _SYNONYMS else ""
            msg = f"unknown key{hint or did_you_mean(key, _known_keys(parent))}; remove it or check its spelling"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parts.append(_type_problem(loc, err))
            continue
        elif err["type"] == "literal_error":
            msg = f"{err.get('input')!r} is not allowed; {msg.lower()}"
        elif err["type"] == "too_short" and where[-1:] == ["choices"]:
            msg = "is empty; list at least one value, or use { type = 'fixed', value = ... }"
        parts.append(f"{loc}: {msg}" if loc and loc != "space" else msg)
    return "; ".join(parts)


_PARAM_TYPES: dict[str, type[BaseModel]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam, "fixed": FixedParam}
_SECTIONS: dict[str, type[BaseModel]] = {"validation": Validation, "sampler": SamplerSpec, "pruner": PrunerSpec, "heartbeat": Heartbeat}
_SET_BY_TUNER = ("source", "task_note")
# Top-level keys other tools name differently, which no spelling distance finds.
_SYNONYMS = {"model_name": "registered_model", "registered_model_name": "registered_model", "study_name": "name",
             "num_trials": "n_trials", "trials": "n_trials", "label": "target", "target_column": "target",
             "search_space": "space", "params": "space"}


def _known_keys(parent: tuple[Any, ...]) -> list[str]:
    """The keys a study file may write at ``parent`` (a pydantic error location)."""
    if not parent:
        return [k for k in StudySpec.model_fields if k not in _SET_BY_TUNER]
    if len(parent) == 1 and parent[0] in _SECTIONS:
        return list(_SECTIONS[parent[0]].model_fields)
    if len(parent) == 3 and parent[0] == "space" and parent[2] in _PARAM_TYPES:
        return [k for k in _PARAM_TYPES[parent[2]].model_fields if k != "type"] + ["type"]
    return []


def _type_problem(loc: str, err: Any) -> str:
    """A parameter whose ``type`` is missing or misspelt, in tuner's words."""
    types = sorted(_PARAM_TYPES)
    given = err.get("input")
    if err["type"] == "union_tag_invalid":
        tag = str(err.get("ctx", {}).get("tag", given))
        return f"{loc}.type: {tag!r} is not a parameter type{did_you_mean(tag, types)}; choose one of {types}"
    if isinstance(given, dict):
        near = [k for k in given if difflib.get_close_matches(str(k), ["type"], n=1, cutoff=0.6)]
        hint = f" ({near[0]!r}: did you mean 'type'?)" if near else ""
        return f"{loc}: no type{hint}; add type = one of {types}, e.g. {{ type = \"float\", low = 0.001, high = 0.1 }}"
    return f"{loc}: {given!r} is not a parameter table; write {{ type = \"fixed\", value = {given!r} }} or another of {types}"
