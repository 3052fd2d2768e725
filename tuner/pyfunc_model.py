"""MLflow "models from code" file: logged as source, not pickled.

``load_context`` rebuilds the network from the checkpoint (read with ``weights_only=True``), so
loading works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` and runs no stored code but this
file and ``tuner/model.py`` (shipped beside it as ``code_paths``). Input: a DataFrame with the
raw feature columns (extra columns are ignored); output: predictions in the target's units, or
class labels (``params={"proba": True}`` for class probabilities).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TunerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from tuner.model import Checkpoint

        payload = torch.load(context.artifacts["checkpoint"], weights_only=True, map_location="cpu")
        self.net = Checkpoint.from_payload(payload).build()

    # A DataFrame hint: MLflow accepts it (no warning) and takes the column schema from the input example.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from tuner.model import predict_frame

        return predict_frame(self.net, model_input, proba=bool(params and params.get("proba")))


mlflow.models.set_model(TunerModel())
