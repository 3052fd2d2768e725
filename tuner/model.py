"""The network: an MLP (``hidden_size = 0`` is the plain linear model) that carries its own
preprocessing, so a reloaded model takes raw feature columns and answers in the target's units.

The preprocessing is the column encoder (``tuner.columns``: imputation, missing indicators,
one-hot levels) as plain JSON in ``ModelConfig.encoder``, then the standardiser as buffers. A
config without an encoder (a champion from before it existed) reads numeric columns as they are.

This module imports torch only at import time (numpy and pandas where a frame is predicted): the
MLflow model code loads it without optuna or mlflow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from torch import nn

__all__ = ["ModelConfig", "TabularNet", "EnsembleNet", "Checkpoint", "initial_draws", "layer_widths",
           "make_activation", "encode_frame", "predict_frame"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network: architecture, columns, task, classes."""

    feature_names: list[str]
    target: str
    task: Literal["regression", "classification"] = "regression"
    hidden_size: int = 0
    n_layers: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    classes: list[Any] | None = None
    # tuner.columns.TableEncoder state (plain types): raw columns -> the model's inputs, whose
    # names ``feature_names`` then are. None: ``feature_names`` are raw numeric columns.
    encoder: dict[str, Any] | None = None

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1

    @property
    def input_columns(self) -> list[str]:
        """The raw columns the model reads."""
        return [c["name"] for c in self.encoder["columns"]] if self.encoder else list(self.feature_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)


def layer_widths(config: ModelConfig) -> tuple[int, ...]:
    """The widths of ``TabularNet(config)``'s layers: inputs, each hidden layer, outputs."""
    hidden = [config.hidden_size] * (config.n_layers if config.hidden_size else 0)
    return (len(config.feature_names), *hidden, config.n_outputs)


def initial_draws(widths: Sequence[tuple[int, ...]], seeds: Sequence[int]) -> Any:
    """Every network's ``nn.Linear`` initial weights and biases for its seed, as one float32
    numpy array: network t (layer widths ``widths[t]``, see ``layer_widths``) as
    ``TabularNet`` draws it right after ``torch.manual_seed(seeds[t])``, in draw order (per
    layer the weight ``(out, in)`` row-major, then the bias), the networks one after another.

    Vectorised over networks, without building them: torch's CPU generator is MT19937
    (``shuffle.mt_outputs`` runs it for all seeds at once), and ``uniform_(lo, hi)`` on float32
    maps each output u to ``float32((u & 0xFFFFFF) / 2**24 * (hi - lo) + lo)`` in double with
    float32 bounds, the bounds being ``kaiming_uniform_(a=sqrt(5))``'s and the bias's
    ``1/sqrt(fan_in)`` (a test holds every draw equal to ``nn.Linear``'s). Fused training starts
    thousands of trials at once, and one ``TabularNet`` alone costs ~0.3 ms.
    """
    import numpy as np

    from tuner.shuffle import mt_outputs

    plans = [_draw_plan(tuple(w)) for w in widths]
    counts = np.array([len(lo) for lo, _ in plans])
    words = mt_outputs(np.asarray(seeds), counts)
    words = words[np.arange(words.shape[1]) < counts[:, None]]  # row-major: each network's in order
    lo = np.concatenate([lo for lo, _ in plans])
    span = np.concatenate([span for _, span in plans])
    return ((words & np.uint32(0xFFFFFF)) * (1.0 / (1 << 24)) * span + lo).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _draw_plan(widths: tuple[int, ...]) -> tuple[Any, Any]:
    """Per draw of a network of these layer widths: ``lo`` and ``hi - lo`` of its ``uniform_``
    (float32 bounds, as double)."""
    import numpy as np

    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # nn.init.calculate_gain("leaky_relu", sqrt(5))
    lo, span = [], []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        for n, bound in ((fan_in * fan_out, math.sqrt(3.0) * (gain / math.sqrt(fan_in))), (fan_out, 1 / math.sqrt(fan_in))):
            b = np.float32(bound)
            lo.append(np.full(n, float(-b)))
            span.append(np.full(n, float(b - (-b))))
    return np.concatenate(lo), np.concatenate(span)


class TabularNet(nn.Module):
    """``core`` works in standardised units; ``forward`` wraps it with the fitted scaling.

    Buffers ``x_mean``/``x_std`` (fitted on the training rows) and ``y_mean``/``y_std`` travel
    in the state dict, so the saved weights alone reproduce the predictions.
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n_in, n_out = len(config.feature_names), config.n_outputs
        if config.hidden_size == 0:
            self.core: nn.Module = nn.Linear(n_in, n_out)
        else:
            layers: list[nn.Module] = []
            width = n_in
            for _ in range(config.n_layers):
                layers += [nn.Linear(width, config.hidden_size), make_activation(config.activation)]
                if config.dropout > 0:
                    layers.append(nn.Dropout(config.dropout))
                width = config.hidden_size
            layers.append(nn.Linear(width, n_out))
            self.core = nn.Sequential(*layers)
        self.register_buffer("x_mean", torch.zeros(n_in))
        self.register_buffer("x_std", torch.ones(n_in))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def set_scaling(self, x_mean: Any, x_std: Any, y_mean: float, y_std: float) -> None:
        """Store the standardiser fitted on the training rows."""
        with torch.no_grad():
            self.x_mean.copy_(torch.as_tensor(x_mean, dtype=torch.float32))
            self.x_std.copy_(torch.as_tensor(x_std, dtype=torch.float32))
            self.y_mean.fill_(float(y_mean))
            self.y_std.fill_(float(y_std))

    def core_output(self, x_std: torch.Tensor) -> torch.Tensor:
        """Standardised features -> standardised target (regression) or logits."""
        out = self.core(x_std)
        return out.squeeze(-1) if self.config.task == "regression" else out

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw feature columns -> predictions in the target's units (or class logits)."""
        out = self.core_output((x_raw - self.x_mean) / self.x_std)
        if self.config.task == "regression":
            return out * self.y_std + self.y_mean
        return out


SCALING_BUFFERS = ("x_mean", "x_std", "y_mean", "y_std")
ARCHITECTURE = ("hidden_size", "n_layers", "activation", "dropout")


class EnsembleNet(nn.Module):
    """A weighted average of TabularNets that share one preprocessing (columns, encoder,
    standardiser): predictions in the target's units, or for classification the log of the
    averaged class probabilities (so ``softmax`` of the output is the weighted average)."""

    weights: torch.Tensor

    def __init__(self, config: ModelConfig, members: list[TabularNet], weights: list[int]) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))

    @property
    def x_mean(self) -> torch.Tensor:  # the shared standardiser (encode_frame imputes with it)
        first: TabularNet = self.members[0]  # type: ignore[assignment]
        return first.x_mean

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(x_raw) for m in self.members])  # (k, rows) or (k, rows, classes)
        if self.config.task == "regression":
            return torch.einsum("k,kr->r", self.weights, outs)
        probabilities = torch.einsum("k,krc->rc", self.weights, torch.softmax(outs, -1))
        return probabilities.clamp_min(1e-30).log()


@dataclass
class Checkpoint:
    """What a trial's weights file holds: ``torch.load(..., weights_only=True)`` reads it.

    An ensemble's file holds the shared preprocessing once (``config``; the standardiser's
    buffers in ``state_dict``) and, in ``members``, each member's architecture, integer weight
    and network weights: plain dicts, lists and tensors, still read with ``weights_only=True``.
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    members: list[dict[str, Any]] | None = None

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"config": self.config.to_dict(), "state_dict": self.state_dict}
        if self.members is not None:
            payload["members"] = self.members
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Checkpoint:
        return cls(ModelConfig.from_dict(payload["config"]), payload["state_dict"], payload.get("members"))

    @classmethod
    def ensemble(cls, nets: list[TabularNet], weights: list[int]) -> Checkpoint:
        """One checkpoint of ``nets`` (fit on the same rows: one preprocessing) averaged by ``weights``.

        Raises:
            ValueError: the members' preprocessing differs.
        """
        first = nets[0]
        shared = {k: v.detach().cpu() for k, v in first.state_dict().items() if k in SCALING_BUFFERS}
        members = []
        for net, w in zip(nets, weights):
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            same = replace(net.config, **{a: getattr(first.config, a) for a in ARCHITECTURE}) == first.config
            if not same or any(not torch.equal(state[k], shared[k]) for k in SCALING_BUFFERS):
                raise ValueError("ensemble members must share their columns, encoder and standardiser (refit on the same rows)")
            members.append({"architecture": {a: getattr(net.config, a) for a in ARCHITECTURE}, "weight": int(w),
                            "state_dict": {k: v for k, v in state.items() if k not in SCALING_BUFFERS}})
        return cls(first.config, shared, members)

    def build(self) -> TabularNet | EnsembleNet:
        if self.members is None:
            net = TabularNet(self.config)
            net.load_state_dict(self.state_dict)
            return net.eval()
        nets = []
        for m in self.members:
            net = TabularNet(replace(self.config, **m["architecture"]))
            net.load_state_dict({**m["state_dict"], **self.state_dict})
            nets.append(net)
        return EnsembleNet(self.config, nets, [int(m["weight"]) for m in self.members]).eval()


def encode_frame(net: TabularNet | EnsembleNet, frame: Any, *, first_row: int = 2) -> tuple[Any, list[str]]:
    """Raw columns (a DataFrame; extra columns ignored) -> the network's float32 input matrix,
    and notes on what had to be imputed that training never saw (for a warning).

    Raises:
        DataError: a column is missing, or a numeric column holds text (column and row named).
    """
    import numpy as np
    import pandas as pd

    from tuner.encoder import TableEncoder
    from tuner.errors import DataError

    config = net.config
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    if config.encoder is not None:
        x, notes = TableEncoder.from_dict(config.encoder).transform(frame, first_row=first_row)
        return x.astype(np.float32), notes
    # A numeric-only model from before the encoder: a missing value takes the training mean
    # (the standardiser's), i.e. zero once standardised, instead of an empty prediction.
    missing = [c for c in config.feature_names if c not in frame.columns]
    if missing:
        raise DataError(f"input lacks feature column(s) {missing}; the model needs {config.feature_names}")
    from tuner.columns import bad_numeric_cells

    columns = []
    for name in config.feature_names:
        col = frame[name]
        if not pd.api.types.is_numeric_dtype(col):
            count, shown = bad_numeric_cells(col, first_row)
            if count:
                raise DataError(f"column {name!r} is numeric in the model, but {count} cell(s) are not numbers: {shown}")
            col = pd.to_numeric(col, errors="coerce")
        columns.append(col.to_numpy(dtype=np.float64, na_value=np.nan))
    x = np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0))
    bad = ~np.isfinite(x)
    notes = []
    if bad.any():
        x = np.where(bad, net.x_mean.detach().cpu().double().numpy(), x)
        counts = bad.sum(axis=0)
        notes.append("missing values imputed with the training mean: " + ", ".join(
            f"{n} ({int(k)} row(s))" for n, k in zip(config.feature_names, counts) if k))
    return x.astype(np.float32), notes


def predict_frame(net: TabularNet | EnsembleNet, frame: Any, *, proba: bool = False) -> Any:
    """Raw feature columns (a DataFrame; extra columns ignored; missing values and unseen
    levels allowed) -> predictions in the target's units, class labels, or (``proba``) a
    DataFrame of class probabilities. Imputations training never needed are warned about."""
    import warnings

    import numpy as np
    import pandas as pd

    config = net.config
    x_np, notes = encode_frame(net, frame)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    x = torch.from_numpy(x_np)
    with torch.inference_mode():
        out = net(x)
    if config.task == "regression":
        return out.numpy().astype(np.float64)
    probabilities = torch.softmax(out, dim=-1).numpy()
    if proba:
        return pd.DataFrame(probabilities, columns=[str(c) for c in config.classes or []])
    # The labels as the training CSV had them (ints stay ints, strings stay strings).
    return np.asarray(config.classes)[probabilities.argmax(axis=1)]
