"""tuner.optim.Stepper is torch.optim's arithmetic without torch.optim's compiler import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT
from tuner.optim import Stepper


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _torch_optimizer(kind: str, params, lr: float, wd: float, fused: bool | None) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


@pytest.mark.parametrize("fused", [True, None])
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_stepper_matches_torch_optim_bit_for_bit(kind: str, fused: bool | None) -> None:
    ours, theirs = _net(1), _net(1)
    a = Stepper(ours.parameters(), kind, lr=0.05, weight_decay=0.01, fused=fused)
    b = _torch_optimizer(kind, theirs.parameters(), 0.05, 0.01, fused)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        lr = 0.05 * (1 - step / 40)  # a schedule changes the rate between steps
        a.lr = lr
        for group in b.param_groups:
            group["lr"] = lr
        for net, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    moved = [not torch.equal(p, q) for p, q in zip(ours.parameters(), _net(1).parameters())]
    assert all(moved)  # the comparison below is of trained weights, not of two untouched nets
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_a_parameter_without_gradient_is_left_alone() -> None:
    net = _net(2)
    frozen = net[0].bias.detach().clone()
    opt = Stepper(net.parameters(), "adam", lr=0.1)
    torch.nn.functional.mse_loss(net(torch.ones(4, 3)), torch.zeros(4, 1)).backward()
    net[0].bias.grad = None
    opt.step()
    assert torch.equal(net[0].bias, frozen)
    assert not torch.equal(net[2].bias, _net(2)[2].bias)


def test_unknown_optimizer_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lbfgs'; choose one of \['adam', 'adamw', 'sgd'\]"):
        Stepper(_net(0).parameters(), "lbfgs", lr=0.1)  # type: ignore[arg-type]


def test_training_does_not_import_the_compiler() -> None:
    # torch.optim's classes import torch._dynamo (1.4-1.8 s here) on construction and every step.
    code = textwrap.dedent(
        """
        import sys
        from tests.conftest import CARS
        from tuner.data import load_table, prepare, select_columns
        from tuner.train import train
        x, y, names = select_columns(load_table(CARS), "mpg", ["wt", "hp"])
        data = prepare(x, y, feature_names=names, target="mpg", fraction=0.2, seed=0)
        for optimizer in ("adam", "adamw", "sgd"):
            train({"lr": 0.01, "epochs": 3, "batch_size": 8, "hidden_size": 4, "optimizer": optimizer},
                  data)
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
