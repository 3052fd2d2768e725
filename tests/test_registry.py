"""The champion's registration: MLflow's requirement check without its module map; a model
reference that names nothing."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mlflow_store
from tuner.errors import ModelError
from tuner.registry import load_model, pinned_requirements_check


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_pinned_requirements_check_still_warns_of_a_mismatch_without_mapping_every_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.utils import requirements_utils

    # A process where no model was logged yet; the map's builder is counted, not replaced.
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    builds: list[int] = []
    build = requirements_utils.importlib_metadata.packages_distributions

    def counted() -> Any:
        builds.append(1)
        return build()

    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", counted)
    records = _Records()
    logger = logging.getLogger(requirements_utils.__name__)
    logger.addHandler(records)
    try:
        requirements = ["torch==0.0.1", f"numpy=={version('numpy')}"]
        with pinned_requirements_check():
            requirements_utils.warn_dependency_requirement_mismatches(requirements)
        assert builds == []
        assert requirements_utils._MODULES_TO_PACKAGES is None  # MLflow's state as it was
        assert len(records.messages) == 1
        assert f"torch (current: {version('torch')}, required: torch==0.0.1)" in records.messages[0]
        assert "numpy" not in records.messages[0]

        # Without it MLflow builds the map first (what the context saves), then warns the same.
        requirements_utils.warn_dependency_requirement_mismatches(requirements)
        assert builds == [1]
        assert records.messages[1] == records.messages[0]
    finally:
        logger.removeHandler(records)


def test_the_pinned_requirements_check_leaves_a_built_map_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.utils import requirements_utils

    built = {"torch": ["torch"]}
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", built)
    with pinned_requirements_check():
        assert requirements_utils._MODULES_TO_PACKAGES is built
    assert requirements_utils._MODULES_TO_PACKAGES is built


@pytest.mark.parametrize(("ref", "says"), [("cars-mpg@nosuch", "alias nosuch"), ("nope@champion", "name=nope")])
def test_a_model_that_is_not_registered_is_one_line_naming_it_and_the_fix(tmp_path: Path, ref: str, says: str) -> None:
    from mlflow import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    MlflowClient(uri).create_registered_model("cars-mpg")  # a registered model without that alias
    with pytest.raises(ModelError) as e:
        load_model(ref, uri)
    message = str(e.value)
    assert message.startswith(f"model {ref!r} not found in ") and says in message
    assert message.endswith("not found; check the name and alias (tuner best STUDY shows them) and --tracking-uri")
    assert "\n" not in message
