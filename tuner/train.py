"""The one shared training function. It knows nothing of Optuna or MLflow: the objective, the
retraining of a champion and the replay of a trial all call ``train()``, and talk to it only
through the ``on_epoch_end`` hook.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F

from tuner.data import BatchDataset, Prepared, batches, loader_batches
from tuner.model import ModelConfig, TabularNet
from tuner.optim import Stepper

__all__ = [
    "TrainParams",
    "TrainResult",
    "Deferred",
    "train",
    "evaluate",
    "val_predictions",
    "resolve_device",
    "EpochHook",
    "task_loss",
    "class_weights",
    "output_metrics",
    "epoch_record",
    "history_keys",
    "metric_names",
    "cosine_factor",
]

# Called after every epoch with (epoch, metrics); returning True stops training (pruning).
EpochHook = Callable[[int, dict[str, float]], bool]


@dataclass(frozen=True)
class TrainParams:
    """Hyperparameters of one trial; the first five are sampled by every study."""

    lr: float
    epochs: int
    batch_size: int
    hidden_size: int
    activation: str = "relu"
    n_layers: int = 1
    dropout: float = 0.0
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    # Cosine decay to ~0 over the run: lets plain gradient descent settle on the optimum
    # (the linear model lands on least squares) instead of hovering around it.
    schedule: Literal["cosine", "constant"] = "cosine"

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> TrainParams:
        names = {f.name for f in fields(cls)}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"unknown training parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**params)


@dataclass(frozen=True)
class Deferred:
    """A ``TrainResult`` field built on first access: a fused trial's model and history come
    from its slot's rows (``fused.py``), and most are never read (a cross-validation fold keeps
    its metrics only, a benchmark nothing), while building them costs more than a step."""

    build: Callable[[], Any]


@dataclass
class TrainResult:
    """What one training run produced. ``metrics`` are the last epoch's (the returned weights)."""

    model: TabularNet | None  # None only for a fused fold (Job.keep_model=False): CV keeps metrics, not models
    history: list[dict[str, float]]
    metrics: dict[str, float]
    stop_reason: str | None = None  # None: ran all epochs; else why it stopped early
    diverged: bool = False
    n_steps: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def _built_on_access(name: str) -> property:
    """A field that may be given as a ``Deferred``: built the first time it is read."""

    def get(self: TrainResult) -> Any:
        value = self.__dict__[name]
        if isinstance(value, Deferred):
            value = self.__dict__[name] = value.build()
        return value

    def put(self: TrainResult, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, put)


TrainResult.model = _built_on_access("model")  # type: ignore[assignment]
TrainResult.history = _built_on_access("history")  # type: ignore[assignment]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA, else Apple MPS, else CPU; an explicit device must exist.

    Raises:
        ValueError: the named device is not available; the message lists what is.
    """
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    if name == "auto":
        return torch.device("cuda" if "cuda" in available else "mps" if "mps" in available else "cpu")
    if name not in available:
        raise ValueError(f"device {name!r} is not available here; available: {available} (or 'auto')")
    return torch.device(name)


def _optimizer(params: TrainParams, model: torch.nn.Module, device: torch.device) -> Stepper:
    # Fused Adam/AdamW: one kernel for the whole update, ~25% cheaper per step on CPU and CUDA.
    return Stepper(model.parameters(), params.optimizer, lr=params.lr, weight_decay=params.weight_decay,
                   fused=True if device.type in ("cuda", "cpu") else None)


def task_loss(
    out: torch.Tensor,
    y: torch.Tensor,
    task: str,
    reduction: Literal["mean", "none"] = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of a task: MSE on the standardised target, or cross-entropy on logits
    (``weight``: per class, as ``class_weight = "balanced"`` sets it; the mean is then weighted)."""
    if task == "regression":
        return F.mse_loss(out, y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction, weight=weight)


def class_weights(data: Prepared, device: torch.device) -> torch.Tensor | None:
    """The split's cross-entropy class weights on ``device``, or None (unweighted)."""
    return torch.tensor(data.class_weight_, dtype=torch.float32, device=device) if data.class_weight_ else None


def _loss(model: TabularNet, xb: torch.Tensor, yb: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return task_loss(model.core_output(xb), yb, model.config.task, weight=weight)


@torch.inference_mode()
def evaluate(model: TabularNet, x_std: torch.Tensor, y_raw: torch.Tensor) -> dict[str, float]:
    """Metrics on standardised features against the target in its own units (one host sync)."""
    was_training = model.training
    model.eval()
    out = model.core_output(x_std)
    names, values = output_metrics(out, y_raw, model.config.task, model.y_mean, model.y_std)
    model.train(was_training)
    return dict(zip(names, values.tolist()))


@torch.inference_mode()
def val_predictions(model: TabularNet, data: Prepared) -> Any:
    """The validation rows' predictions at the model's weights now (a trial's final epoch), as a
    float32 numpy array: target units ``(rows,)``, or class probabilities ``(rows, classes)``.
    What the ensemble of a study is selected on (tuner.ensemble)."""
    was_training = model.training
    model.eval()
    out = model.core_output(data.x_val.to(model.y_mean.device))
    model.train(was_training)
    pred = out * model.y_std + model.y_mean if model.config.task == "regression" else torch.softmax(out, -1)
    return pred.float().cpu().numpy()


def output_metrics(
    out: torch.Tensor,
    y_raw: torch.Tensor,
    task: str,
    y_mean: torch.Tensor,
    y_std: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[tuple[str, ...], torch.Tensor]:
    """Validation metrics from network outputs, over the row dimension.

    ``out`` is ``(..., rows)`` (regression, standardised) or ``(..., rows, classes)`` (logits);
    leading dimensions (one per fused trial) are kept, so the values are ``(..., 3)``.
    ``mask`` (``(..., rows)``, bool): the rows that count, where fused trials validate on splits of
    different sizes padded to the longest (padded rows are excluded exactly; None: every row).
    """
    if mask is None:
        n_rows: torch.Tensor | int = y_raw.shape[-1]
        w: torch.Tensor | float = 1.0
    else:
        w = mask.to(out.dtype)
        n_rows = w.sum(-1)
    if task == "regression":
        pred = out * y_std + y_mean
        err = (pred - y_raw) * w
        sse = (err * err).sum(-1)
        if mask is None:
            sst = ((y_raw - y_raw.mean()) ** 2).sum()
        else:
            centred = (y_raw - (y_raw * w).sum(-1, keepdim=True) / n_rows.unsqueeze(-1)) * w  # type: ignore[union-attr]
            sst = (centred * centred).sum(-1)
        values = torch.stack([(sse / n_rows).sqrt(), err.abs().sum(-1) / n_rows, 1 - sse / sst.clamp_min(1e-12)], -1)
        return metric_names(task), values
    n_classes = out.shape[-1]
    pred = out.argmax(-1)
    y = y_raw.expand(pred.shape)
    row_w = w if mask is None else w.unsqueeze(-1)  # type: ignore[union-attr]
    onehot_true = F.one_hot(y, n_classes).float() * row_w
    onehot_pred = F.one_hot(pred, n_classes).float() * row_w
    tp = (onehot_true * onehot_pred).sum(-2)
    f1 = 2 * tp / (onehot_true.sum(-2) + onehot_pred.sum(-2)).clamp_min(1e-12)
    present = (onehot_true.sum(-2) + onehot_pred.sum(-2)) > 0
    f1_macro = (f1 * present).sum(-1) / present.sum(-1)
    log_loss = F.cross_entropy(out.reshape(-1, n_classes), y.reshape(-1), reduction="none").view(y.shape) * w
    correct = (pred == y).float() * w
    values = torch.stack([correct.sum(-1) / n_rows, log_loss.sum(-1) / n_rows, f1_macro], -1)
    return metric_names(task), values


def metric_names(task: str) -> tuple[str, ...]:
    """The validation metrics of ``output_metrics`` and of every history row, in order."""
    return ("rmse", "mae", "r2") if task == "regression" else ("accuracy", "log_loss", "f1_macro")


def history_keys(task: str) -> tuple[str, ...]:
    """A history row's keys: the validation metrics, then the training column (train RMSE in
    the target's units, or the mean train loss), as ``epoch_record`` writes them."""
    return (*metric_names(task), "train_rmse" if task == "regression" else "train_loss")


def epoch_record(
    epoch: int, train_loss: float, metrics: dict[str, float], *, task: str, y_std: float, lr: float
) -> tuple[dict[str, float] | None, str | None]:
    """One epoch's history row, or ``(None, reason)`` when training diverged (the early stop)."""
    if not math.isfinite(train_loss):
        return None, f"non-finite training loss at epoch {epoch} (lr={lr:g}); the learning rate is too high"
    if not all(math.isfinite(v) for v in metrics.values()):
        return None, f"non-finite validation metric at epoch {epoch} (lr={lr:g}); the model diverged"
    metrics[history_keys(task)[-1]] = math.sqrt(train_loss) * y_std if task == "regression" else train_loss
    return metrics, None


def cosine_factor(step: int, total_steps: int) -> float:
    """The cosine schedule's multiplier of the learning rate at optimizer step ``step``."""
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


def model_config(p: TrainParams, data: Prepared) -> ModelConfig:
    """The architecture of a trial's model on ``data`` (shared by train() and train_many())."""
    return ModelConfig(
        feature_names=data.feature_names,
        target=data.target,
        task=data.task,
        hidden_size=p.hidden_size,
        n_layers=p.n_layers,
        activation=p.activation,
        dropout=p.dropout,
        classes=data.classes,
        encoder=data.encoder,
    )


def train(
    params: TrainParams | Mapping[str, Any],
    data: Prepared,
    *,
    device: torch.device | str = "auto",
    seed: int = 0,
    on_epoch_end: EpochHook | None = None,
    loader: Literal["memory", "dataloader"] = "memory",
) -> TrainResult:
    """Train one model on ``data`` and validate it after every epoch.

    Args:
        params: hyperparameters (a TrainParams or a mapping of its fields).
        data: the prepared split; moved to ``device`` if it is not there already.
        device: ``auto``, ``cpu``, ``cuda[:i]`` or ``mps``.
        seed: seeds the initial weights and the shuffling; same seed, same result on CPU.
        on_epoch_end: called with ``(epoch, metrics)``; returning True stops training.
        loader: ``memory`` indexes tensors on the device with shuffled index batches;
            ``dataloader`` fetches each batch from host tensors through a torch DataLoader
            (for data that does not fit on the device). Both see the same batches.

    Returns:
        The trained model (eval mode, on ``device``), per-epoch history and final metrics.
        A non-finite training loss stops training early with ``diverged=True``.
    """
    p = params if isinstance(params, TrainParams) else TrainParams.from_mapping(params)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    config = model_config(p, data)
    # Seed init and dropout without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return _fit(p, config, data, dev, seed, on_epoch_end, loader)


def _fit(
    p: TrainParams,
    config: ModelConfig,
    data: Prepared,
    dev: torch.device,
    seed: int,
    on_epoch_end: EpochHook | None,
    loader: Literal["memory", "dataloader"],
) -> TrainResult:
    model = TabularNet(config)
    model.set_scaling(data.x_mean_, data.x_std_, data.y_mean_, data.y_std_)
    model.to(dev).train()
    opt = _optimizer(p, model, dev)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    batch_size = min(p.batch_size, n)
    if loader == "memory":
        on_dev = data.to(dev)
        x_train, y_train, x_val, y_val = on_dev.x_train, on_dev.y_train, on_dev.x_val, on_dev.y_val_raw
    else:
        dataset = BatchDataset(data.x_train, data.y_train)
        x_val, y_val = data.x_val.to(dev), data.y_val_raw.to(dev)

    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    stop_reason: str | None = None
    diverged = False
    n_steps = 0
    total_steps = p.epochs * math.ceil(n / batch_size)
    weight = class_weights(data, dev)
    start = time.perf_counter()
    for epoch in range(p.epochs):
        index_batches = batches(n, batch_size, generator)
        step_iter: Iterator[tuple[torch.Tensor, torch.Tensor]]
        if loader == "memory":
            perm = torch.cat(index_batches).to(dev)  # one host->device copy per epoch
            step_iter = ((x_train[i], y_train[i]) for i in perm.split(batch_size))
        else:
            step_iter = loader_batches(dataset, index_batches, dev)
        loss_sum = torch.zeros((), device=dev)
        for xb, yb in step_iter:
            if p.schedule == "cosine":
                lr = p.lr * cosine_factor(n_steps, total_steps)
                opt.lr = lr
            loss = _loss(model, xb, yb, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # Accumulate on the device: no host sync per step.
            loss_sum += loss.detach() * len(xb)
            n_steps += 1
        train_loss = (loss_sum / n).item()  # the one sync per epoch
        record, stop_reason = epoch_record(
            epoch,
            train_loss,
            evaluate(model, x_val, y_val) if math.isfinite(train_loss) else {},
            task=data.task,
            y_std=data.y_std_,
            lr=p.lr,
        )
        if record is None:
            diverged = True
            break
        epoch_metrics = record
        history.append(epoch_metrics)
        metrics = epoch_metrics
        if on_epoch_end is not None and on_epoch_end(epoch, epoch_metrics):
            stop_reason = f"stopped by the epoch hook after epoch {epoch}"
            break
    model.eval()
    return TrainResult(
        model=model,
        history=history,
        metrics=metrics,
        stop_reason=stop_reason,
        diverged=diverged,
        n_steps=n_steps,
        seconds=time.perf_counter() - start,
    )
