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
        import numpy as np
        import torch

        config = self.net.config
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in config.feature_names if c not in frame.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s) {missing}; the model needs {config.feature_names}")
        x = torch.from_numpy(np.array(frame[config.feature_names], dtype=np.float32))
        with torch.inference_mode():
            out = self.net(x)
        if config.task == "regression":
            return out.numpy().astype(np.float64)
        proba = torch.softmax(out, dim=-1).numpy()
        if params and params.get("proba"):
            return pd.DataFrame(proba, columns=[str(c) for c in config.classes or []])
        # The labels as the training CSV had them (ints stay ints, strings stay strings).
        return np.asarray(config.classes)[proba.argmax(axis=1)]


mlflow.models.set_model(TunerModel())
