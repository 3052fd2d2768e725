"""MLflow "models from code" file: logged as source, not pickled.

``load_context`` rebuilds the network from the checkpoint (read with ``weights_only=True``), so
loading works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` and runs no stored code but this
file and ``tuner/model.py`` (shipped beside it as ``code_paths``). Input: a DataFrame with the
raw feature columns (extra columns are ignored); output: predictions in the target's units, or
class labels (``params={"proba": True}`` for class probabilities).
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# The schema comes from the input example (raw CSV columns, extra columns allowed), not from
# type hints: silence MLflow's advice to add them.
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method")


class TunerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from tuner.model import Checkpoint

        payload = torch.load(context.artifacts["checkpoint"], weights_only=True, map_location="cpu")
        self.net = Checkpoint.from_payload(payload).build()

    # No type hints on predict: MLflow would build a schema from them instead of the input example.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from tuner.model import predict_frame

        return predict_frame(self.net, model_input, proba=bool(params and params.get("proba")))


mlflow.models.set_model(TunerModel())
