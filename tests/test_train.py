from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import CARS
from tuner.data import Prepared, load_table, prepare, select_columns
from tuner.model import Checkpoint
from tuner.train import TrainParams, evaluate, resolve_device, train


def _prepared(features: list[str] | None, seed: int = 0) -> tuple[Prepared, np.ndarray, np.ndarray]:
    x, y, names = select_columns(load_table(CARS), "mpg", features)
    return prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=seed), x, y


@pytest.fixture(scope="module")
def wt() -> tuple[Prepared, np.ndarray, np.ndarray]:
    return _prepared(["wt"])


@pytest.fixture(scope="module")
def allcols() -> Prepared:
    return _prepared(None)[0]


def _raw_line(model: torch.nn.Module, d: Prepared) -> tuple[float, float]:
    """Intercept and slope of the trained linear model in the raw units of wt and mpg."""
    w, b = model.core.weight.item(), model.core.bias.item()
    slope = w * d.y_std_ / d.x_std_[0]
    return d.y_mean_ + b * d.y_std_ - slope * d.x_mean_[0], slope


@pytest.mark.parametrize("lr", [0.05, 0.3])
def test_linear_model_lands_on_least_squares(wt: tuple[Prepared, np.ndarray, np.ndarray], lr: float) -> None:
    d, x, y = wt
    result = train(TrainParams(lr=lr, epochs=300, batch_size=32, hidden_size=0), d, device="cpu", seed=0)
    design = np.c_[np.ones(len(d.train_index)), x[d.train_index]]
    (a_ls, b_ls), *_ = np.linalg.lstsq(design, y[d.train_index], rcond=None)
    intercept, slope = _raw_line(result.model, d)
    assert intercept == pytest.approx(a_ls, rel=0.01)
    assert slope == pytest.approx(b_ls, rel=0.01)
    assert isinstance(result.model.core, torch.nn.Linear)


def test_linear_model_on_all_rows_gives_the_published_line() -> None:
    x, y, names = select_columns(load_table(CARS), "mpg", ["wt"])
    # validation of one row only: train on 31 of 32 rows, then compare with lstsq on those rows
    d = prepare(x, y, feature_names=names, target="mpg", fraction=0.01, seed=0)
    result = train(dict(lr=0.1, epochs=300, batch_size=64, hidden_size=0), d, device="cpu")
    (a_ls, b_ls), *_ = np.linalg.lstsq(np.c_[np.ones(31), x[d.train_index]], y[d.train_index], rcond=None)
    intercept, slope = _raw_line(result.model, d)
    assert (intercept, slope) == (pytest.approx(a_ls, rel=1e-3), pytest.approx(b_ls, rel=1e-3))
    # and the published all-rows line (37.285, -5.344) is within a few percent of that
    assert (intercept, slope) == (pytest.approx(37.285, rel=0.03), pytest.approx(-5.344, rel=0.03))


def test_history_and_metrics_are_per_epoch_in_target_units(allcols: Prepared) -> None:
    r = train(dict(lr=0.01, epochs=4, batch_size=8, hidden_size=8, activation="tanh"), allcols, device="cpu")
    assert len(r.history) == 4 and r.epochs_run == 4
    assert set(r.history[0]) == {"rmse", "mae", "r2", "train_rmse"}
    assert r.metrics == r.history[-1]
    assert r.n_steps == 4 * 4  # 26 training rows in batches of 8
    # the returned metrics are the returned model's, computed from raw inputs
    raw_val = torch.as_tensor(allcols.x_val.numpy() * allcols.x_std_ + allcols.x_mean_, dtype=torch.float32)
    pred = r.model(raw_val)
    rmse = torch.sqrt(((pred - allcols.y_val_raw) ** 2).mean()).item()
    assert rmse == pytest.approx(r.metrics["rmse"], rel=1e-4)


def test_same_seed_same_result_other_seed_other_result(allcols: Prepared) -> None:
    p = dict(lr=0.01, epochs=3, batch_size=8, hidden_size=8, activation="relu", n_layers=2, dropout=0.1)
    a, b = train(p, allcols, device="cpu", seed=7), train(p, allcols, device="cpu", seed=7)
    c = train(p, allcols, device="cpu", seed=8)
    assert a.history == b.history
    assert a.history != c.history


def test_memory_and_dataloader_paths_train_identically(allcols: Prepared) -> None:
    p = dict(lr=0.02, epochs=3, batch_size=4, hidden_size=16, activation="gelu")
    fast = train(p, allcols, device="cpu", seed=1, loader="memory")
    slow = train(p, allcols, device="cpu", seed=1, loader="dataloader")
    assert [h["rmse"] for h in fast.history] == pytest.approx([h["rmse"] for h in slow.history], rel=1e-6)


def test_epoch_hook_sees_every_epoch_and_can_stop(allcols: Prepared) -> None:
    seen: list[int] = []

    def hook(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append(epoch)
        return epoch == 2

    r = train(dict(lr=0.01, epochs=10, batch_size=8, hidden_size=4), allcols, device="cpu", on_epoch_end=hook)
    assert seen == [0, 1, 2] and r.epochs_run == 3
    assert r.stop_reason == "stopped by the epoch hook after epoch 2" and not r.diverged


def test_diverging_learning_rate_stops_at_the_first_non_finite_loss(allcols: Prepared) -> None:
    r = train(dict(lr=1e6, epochs=50, batch_size=4, hidden_size=32, optimizer="sgd", schedule="constant"), allcols, device="cpu")
    assert r.diverged
    assert r.stop_reason is not None and r.stop_reason.startswith("non-finite")
    assert r.epochs_run < 50
    assert all(np.isfinite(list(h.values())).all() for h in r.history)


def test_checkpoint_round_trip_rebuilds_the_same_model(allcols: Prepared) -> None:
    r = train(dict(lr=0.01, epochs=2, batch_size=8, hidden_size=8, n_layers=2), allcols, device="cpu")
    ck = Checkpoint(r.model.config, r.model.state_dict())
    rebuilt = Checkpoint.from_payload(ck.to_payload()).build()
    x = torch.randn(5, allcols.n_features)
    torch.testing.assert_close(rebuilt(x), r.model(x))
    again = evaluate(rebuilt, allcols.x_val, allcols.y_val_raw)
    assert again["rmse"] == pytest.approx(r.metrics["rmse"], rel=1e-6)


def test_unknown_device_lists_the_available_ones() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match=r"device 'cuda:7' is not available here; available: \['cpu'"):
        resolve_device("cuda:7")


def test_unknown_parameter_is_refused(allcols: Prepared) -> None:
    with pytest.raises(ValueError, match=r"unknown training parameter\(s\) \['momentum'\]"):
        train(dict(lr=0.1, epochs=1, batch_size=8, hidden_size=0, momentum=0.9), allcols, device="cpu")
