"""The champion's model: logged once as a pickle-free MLflow model, registered, aliased, and read back.

``promote`` logs the best trial's weights as an MLflow "model from code" (``tuner/pyfunc_model.py``
over a ``weights_only`` checkpoint; no pickle), registers it with the digests of its weights and
of its stored code, and moves ``champion`` only if it beats the current champion. ``load_model``
(``tuner predict``) downloads a registered model, checks both digests and rebuilds the network
from the weights alone: nothing stored runs.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping

from tuner.errors import ModelError, TrackingError, first_line, redact_url
from tuner.replay import file_sha256
from tuner.tracking import quiet_mlflow, quote, tag

if TYPE_CHECKING:
    import pandas as pd

    from tuner.tracking import Tracker

__all__ = [
    "Promotion",
    "promote",
    "registered_version",
    "resolve_model_uri",
    "load_model",
    "LoadedModel",
    "conform_input",
    "model_input_example",
    "code_digest",
    "pinned_requirements_check",
]

_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
_PACKAGE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Promotion:
    """Outcome of registering a study's best trial."""

    model_name: str
    version: str
    alias: Literal["champion", "challenger"]
    model_uri: str  # models:/NAME/VERSION
    trial_number: int
    value: float
    new_version: bool  # False: the best trial was already registered
    ensemble: str | None = None  # with ``ensemble`` in the study file: the selection in one line


def promote(
    tracker: Tracker,
    *,
    model_name: str,
    run_id: str,
    study_name: str,
    trial_number: int,
    metric: str,
    value: float,
    direction: Literal["minimize", "maximize"],
    space_hash: str,
    input_example: pd.DataFrame,
    tags: Mapping[str, str] | None = None,
    ensemble: str | None = None,
) -> Promotion:
    """Log the trial's model once, register it, and move ``champion`` only if it is better.

    ``ensemble``: the run holds an ensemble (``tuner.ensemble``) of these members ("trial x
    weight, ..."), recorded as a tag; ``trial_number`` is then its best member.

    ``input_example``: a few raw rows of the table (any extra columns); the model's input
    columns of them, typed for its signature, become the input example. ``tags``: more tags of a
    new version (which rows it was fit on, its test estimate).

    The previous champion keeps its alias unless every step before the alias move succeeded.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    existing = registered_version(tracker, model_name, study_name, trial_number, ensemble=ensemble)
    champion = tracker.alias_version(model_name, "champion")
    if existing is not None:
        version = existing
        new_version = False
    else:
        new_version = True
        checkpoint, _ = tracker.load_checkpoint(run_id)
        input_example = model_input_example(checkpoint.config, input_example)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            import torch

            torch.save(checkpoint.to_payload(), path)
            digest = file_sha256(path)
            try:
                # The trial's run owns the model; MLflow's advice on type hints is silenced: our
                # schema comes from the input example.
                with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), pinned_requirements_check():
                    warnings.simplefilter("ignore")
                    info = mlflow.pyfunc.log_model(
                        name="model",
                        python_model=str(_MODEL_CODE),
                        artifacts={"checkpoint": str(path)},
                        code_paths=[str(_PACKAGE_DIR)],
                        # A classifier takes params={"proba": True}: the example's params become the
                        # signature's params schema, without which MLflow drops them before predict.
                        input_example=(input_example, {"proba": False})
                        if checkpoint.config.task == "classification"
                        else input_example,
                        metadata={"target": checkpoint.config.target, "task": checkpoint.config.task},
                        # Explicit requirements: inferring them costs ~5 s per model.
                        pip_requirements=_requirements(),
                    )
            except BaseException as e:
                # start_run's exit marked the trial's run FAILED (KILLED on Ctrl-C/SIGTERM): it is
                # a COMPLETE trial's run, and a signal after the trials must not rewrite it.
                tracker.client.set_terminated(run_id, "FINISHED")
                if not isinstance(e, Exception):
                    raise
                raise TrackingError(
                    f"cannot register trial {trial_number} of study {study_name!r}: logging its model failed "
                    f"({first_line(e)}); the champion alias is unchanged, relaunch to retry"
                ) from None
        if not tracker.registered(model_name):
            try:
                tracker.client.create_registered_model(model_name)
            except MlflowException:
                pass  # created by another worker meanwhile
        version = tracker.client.create_model_version(
            model_name,
            source=info.model_uri,
            run_id=run_id,
            model_id=info.model_id,  # a tracking server refuses a models:/m-... source without it
            tags={
                tag("study"): study_name,
                tag("trial"): str(trial_number),
                tag("metric"): metric,
                tag("value"): repr(float(value)),
                tag("direction"): direction,
                tag("space_hash"): space_hash,
                tag("weights_sha256"): digest,
                # pyfunc.load_model imports the stored code: tuner predict checks it first.
                tag("code_sha256"): code_digest(_model_code_files()),
                **(tags or {}),
                **({tag("ensemble"): ensemble} if ensemble else {}),
            },
        )
        # The description names the version itself, so it is written once the version exists.
        uri = f"models:/{model_name}/{version.version}"
        tracker.client.update_model_version(
            model_name,
            version.version,
            description=(
                (f"Ensemble of trials {ensemble} (trial x weight), best member: " if ensemble else "")
                + f"Trial {trial_number} of study `{study_name}` ({metric} = {value:.6g}, search space "
                f"`{space_hash}`). Reload with `mlflow.pyfunc.load_model('{uri}')`, "
                f"`tuner predict {model_name}/{version.version} --input FILE.csv`, or serve with "
                f"`mlflow models serve -m {uri} --env-manager local`."
            ),
        )
    alias: Literal["champion", "challenger"] = "champion" if _better(value, champion, direction) or (
        champion is not None and champion.version == version.version
    ) else "challenger"
    tracker.client.set_registered_model_alias(model_name, alias, version.version)
    return Promotion(
        model_name=model_name,
        version=str(version.version),
        alias=alias,
        model_uri=f"models:/{model_name}/{version.version}",
        trial_number=trial_number,
        value=value,
        new_version=new_version,
    )



def registered_version(
    tracker: Tracker, model_name: str, study_name: str, trial_number: int, *, ensemble: str | None = None
) -> Any | None:
    """The registered version of a study's trial (alone, or the ensemble ``ensemble`` it leads), or None."""
    if not tracker.registered(model_name):
        return None
    found = tracker.client.search_model_versions(
        f"name = {quote(model_name)} and tags.`{tag('study')}` = {quote(study_name)} and "
        f"tags.`{tag('trial')}` = '{trial_number}'"
    )
    mine = [v for v in found if v.tags.get(tag("ensemble")) == ensemble]  # a trial alone, or this ensemble
    return mine[0] if mine else None


def _better(value: float, champion: Any | None, direction: str) -> bool:
    if champion is None:
        return True
    try:
        current = float(champion.tags[tag("value")])
    except (KeyError, ValueError):
        return True  # a champion without our tags: a finished study may replace it
    return value < current if direction == "minimize" else value > current


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "pandas", "numpy")]


@contextmanager
def pinned_requirements_check() -> Iterator[None]:
    """Let ``log_model`` check our pinned requirements without building MLflow's module map.

    Every ``log_model`` checks its pip requirements against the installed packages (no setting
    skips it), and before its first check MLflow maps every importable module to its
    distribution (``importlib_metadata.packages_distributions``: 0.6-1.1 s, a ``stat`` of every
    file in the RECORD of each distribution without ``top_level.txt``, 19,075 here). The check
    reads that map only to find the version of a package without metadata; ``_requirements()``
    pins versions read from the metadata, so an empty map for the length of the call leaves the
    check as it was (a mismatch still warns) and MLflow's state as it found it. This is MLflow's
    private state: where it is already built or has moved, this does nothing and the check costs
    what it did (``tests/test_registry.py`` pins both).
    """
    from mlflow.utils import requirements_utils

    unbuilt = getattr(requirements_utils, "_MODULES_TO_PACKAGES", False) is None
    if not unbuilt or not hasattr(requirements_utils, "_PACKAGES_TO_MODULES"):  # built, or MLflow moved it
        yield
        return
    saved = requirements_utils._PACKAGES_TO_MODULES
    setattr(requirements_utils, "_MODULES_TO_PACKAGES", {})  # setattr: MLflow annotates it as None
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None
        requirements_utils._PACKAGES_TO_MODULES = saved


def _model_code_files() -> dict[str, Path]:
    """The code a registered model stores, by its path inside the model folder."""
    files = {_MODEL_CODE.name: _MODEL_CODE}
    files.update({f"code/{_PACKAGE_DIR.name}/{p.name}": p for p in _PACKAGE_DIR.glob("*.py")})
    return files


def _stored_code_files(model_dir: Path) -> dict[str, Path]:
    files = {_MODEL_CODE.name: model_dir / _MODEL_CODE.name}
    files.update({f"code/{_PACKAGE_DIR.name}/{p.name}": p for p in (model_dir / "code" / _PACKAGE_DIR.name).glob("*.py")})
    return files


def code_digest(files: Mapping[str, Path]) -> str:
    """SHA-256 over the model's code files (names and contents, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        path = files[name]
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def _weights_error(e: BaseException) -> str:
    """The reason in torch's weights-only refusal (not its advice to load unsafely)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Please file an issue") and i + 1 < len(lines):
            return f"torch.load(weights_only=True) refused it: {lines[i + 1][:200]}"
    return first_line(e)


# -- reading models back ---------------------------------------------------------------------


def resolve_model_uri(ref: str) -> str:
    """``NAME@ALIAS``, ``NAME/VERSION`` or a ``models:/`` URI -> a ``models:/`` URI."""
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    raise ModelError(f"model reference {ref!r} is not NAME@ALIAS, NAME/VERSION or models:/...; e.g. cars-mpg@champion")


class LoadedModel:
    """A tuner model rebuilt from its weights alone: no pickle and no stored code runs.

    ``metadata`` is the MLmodel file (signature, input example), parsed as YAML.
    """

    def __init__(self, net: Any, metadata: Any) -> None:
        self.net, self.metadata = net, metadata
        self.notes: list[str] = []  # the last predict's imputations that training never needed

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from tuner.model import predict_frame

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = predict_frame(self.net, frame, proba=bool(params and params.get("proba")))
        self.notes = [str(w.message) for w in caught if w.category is UserWarning]
        return out


def load_model(ref: str, tracking_uri: str) -> tuple[LoadedModel, Any | None]:
    """Download a registered model, verify its weights' SHA-256 tag, rebuild it from the weights.

    Only ``torch.load(weights_only=True)`` reads the artifact: a pickle or model code stored in
    the registry is never executed, whoever registered it.

    Returns:
        ``(model, model_version)``; the version is None for ``runs:/`` and ``models:/m-`` URIs.

    Raises:
        ModelError: not found, not a tuner model, weights changed after registration, or not
            loadable as plain weights.
        TrackingError: the tracking store cannot be opened.
    """
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from tuner.model import Checkpoint
    from tuner.stores import check_tracking_database, tracking_store_error

    check_tracking_database(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    quiet_mlflow()
    uri = resolve_model_uri(ref)
    version = None
    try:  # the store itself (MLflow 3 refuses a file store as the client is made)
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - mlflow raises many types for a store it cannot open
        raise tracking_store_error(e, tracking_uri) from None
    try:
        if uri.startswith("models:/") and not uri.startswith("models:/m-"):
            name, _, rest = uri.removeprefix("models:/").partition("@")
            if rest:
                version = client.get_model_version_by_alias(name, rest)
            else:
                name, _, number = name.partition("/")
                if number == "latest":
                    versions = client.search_model_versions(f"name = {quote(name)}")
                    if not versions:
                        raise MlflowException(f"registered model {name!r} has no version")
                    version = max(versions, key=lambda v: int(v.version))
                else:
                    version = client.get_model_version(name, number)
            uri = f"models:/{name}/{version.version}"  # verify and load the very version resolved
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(prefix="tuner-model-")))
    except MlflowException as e:
        raise ModelError(
            f"model {ref!r} not found in {redact_url(tracking_uri)}: {first_line(e, hide=tracking_uri)}; "
            "check the name and alias (tuner best STUDY shows them) and --tracking-uri"
        ) from None
    checkpoint = local / "artifacts" / "checkpoint.pt"
    if not checkpoint.is_file() or not (local / "MLmodel").is_file():
        raise ModelError(
            f"model {ref!r} is not a tuner model (no artifacts/checkpoint.pt); tuner only loads its own "
            "pickle-free models"
        )
    expected = version.tags.get(tag("weights_sha256")) if version is not None else None
    if version is not None and not expected:
        raise ModelError(
            f"model {ref!r} (version {version.version}) has no {tag('weights_sha256')} tag: it was not "
            "registered by `tuner launch`, so its weights cannot be verified; refusing to load it"
        )
    if expected and file_sha256(checkpoint) != expected:
        raise ModelError(
            f"model {ref!r}: weights file does not match its recorded SHA-256 ({expected[:12]}...); "
            "the artifact was changed after registration, refusing to load it"
        )
    expected_code = version.tags.get(tag("code_sha256")) if version is not None else None
    if expected_code and code_digest(_stored_code_files(local)) != expected_code:
        raise ModelError(
            f"model {ref!r}: its stored code does not match the SHA-256 recorded at registration "
            f"({expected_code[:12]}...); it was changed afterwards, refusing it (mlflow.pyfunc.load_model would import it)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            payload = torch.load(checkpoint, weights_only=True, map_location="cpu")
        net = Checkpoint.from_payload(payload).build()
        metadata = Model.load(str(local / "MLmodel"))
    except Exception as e:  # a pickle with code in it lands here: weights_only refuses it unrun
        raise ModelError(
            f"model {ref!r} cannot be loaded as plain weights ({_weights_error(e)}); tuner never unpickles "
            "code, refusing it"
        ) from None
    return LoadedModel(net, metadata), version


def model_input_example(config: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """The raw input columns of ``frame`` as the signature should list them: numbers as doubles
    (so a missing value at predict time is not refused), categoricals as strings. A model
    without an encoder keeps the CSV's own dtypes, as before."""
    from tuner.encoder import TableEncoder

    if config.encoder is None:
        return frame[config.feature_names]
    encoder = TableEncoder.from_dict(config.encoder)
    return encoder.example(frame[encoder.input_columns])


def conform_input(model: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """The model's feature columns of ``frame``, cast to its signature's types where that
    loses nothing: a CSV whose ``disp`` happens to hold whole numbers reads as int64, which MLflow
    refuses for a double column (and a whole-valued float column for a long one); a categorical
    read as numbers, bools or an all-empty column becomes the level strings the model knows."""
    import numpy as np
    import pandas as pd

    from tuner.encoder import level_text

    schema = model.metadata.get_input_schema()
    out = frame[schema.input_names()].copy()
    for name, kind in zip(schema.input_names(), schema.input_types()):
        kind = getattr(kind, "name", str(kind))
        col = out[name]
        if kind == "string" and not (col.dtype == object or isinstance(col.dtype, pd.StringDtype)):
            out[name] = pd.Series(level_text(col), index=col.index, dtype=object)
        elif kind in ("double", "float") and pd.api.types.is_integer_dtype(col):
            out[name] = col.astype(np.float64 if kind == "double" else np.float32)
        elif kind in ("long", "integer") and pd.api.types.is_float_dtype(col) and col.notna().all():
            if bool((col % 1 == 0).all()):
                out[name] = col.astype(np.int64 if kind == "long" else np.int32)
    return out
