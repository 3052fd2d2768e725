"""The champion's registration: MLflow's requirement check without its module map."""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import Any

import pytest

from tuner.registry import pinned_requirements_check


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
