"""The bank's forward and backward pass, written out by hand (no autograd), and its update.

A bank step is a few dozen tiny kernels; autograd's graph building and engine, the
gradient buffers it allocates and a ``cat`` of every layer's gradient were a large share of it.
Here the forward keeps what the backward needs (each layer's input, pre-activation and
output), and the backward writes every layer's weight and bias gradient straight into the
bank's preallocated ``(K, P)`` gradient block (one ``cat``). The activation
derivatives are torch's own backward kernels (``torch.ops.aten.*_backward``), so each slot's
gradient is the one autograd gives ``train()``'s ``nn.Sequential``, up to float32 summation order.

Like ``train.py`` this module imports torch (and numpy) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ACT_BACKWARD", "ACT_FORWARD", "LayerMask", "Tape", "backward", "forward", "layer_mask",
           "loss_and_grad", "step_scalars", "update"]

aten = torch.ops.aten
_BETA1, _BETA2, _EPS, _MOMENTUM = 0.9, 0.999, 1e-8, 0.9  # torch's Adam defaults, train()'s SGD momentum
_TINY = torch.finfo(torch.float32).tiny

# name -> f(z); the same functions as model.py's nn modules with their default arguments.
ACT_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "silu": F.silu,
}
# name -> f(grad of a, z, a) = grad of z: the kernels autograd calls for these modules.
ACT_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda g, z, a: aten.threshold_backward(g, a, 0),
    "tanh": lambda g, z, a: aten.tanh_backward(g, a),
    "sigmoid": lambda g, z, a: aten.sigmoid_backward(g, a),
    "gelu": lambda g, z, a: aten.gelu_backward(g, z),
    "leaky_relu": lambda g, z, a: aten.leaky_relu_backward(g, z, 0.01, False),
    "elu": lambda g, z, a: aten.elu_backward(g, 1.0, 1.0, 1.0, False, z),
    "silu": lambda g, z, a: aten.silu_backward(g, z),
}


# Which slots have a layer, as float masks (on, off) of shape (K, 1, 1): a product with a 0/1 mask
# is exact, and costs a fifth of torch.where's broadcast select on CPU.
LayerMask = tuple[torch.Tensor, torch.Tensor]


def layer_mask(on: torch.Tensor) -> LayerMask:
    """``(on, off)`` float masks from a ``(K, 1, 1)`` bool: which slots have the layer."""
    on_f = on.to(torch.float32)
    return on_f, 1.0 - on_f


@dataclass
class Tape:
    """What the backward needs from one forward: per hidden layer its input, z and a."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    a: list[torch.Tensor] = field(default_factory=list)
    last: torch.Tensor | None = None  # the output layer's input


def _apply(runs: list[tuple[str, int]], z: torch.Tensor, table: dict, *args: torch.Tensor) -> torch.Tensor:
    """One activation per contiguous run of slots (dim 0)."""
    if len(runs) == 1:
        return table[runs[0][0]](z, *args)
    parts = [t.split([n for _, n in runs]) for t in (z, *args)]
    return torch.cat([table[name](*(p[i] for p in parts)) for i, (name, _) in enumerate(runs)])


def forward(
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    n_layers: int,
    runs: list[tuple[str, int]],
    layer_on: list[LayerMask | None],
    tape: Tape | None = None,
) -> torch.Tensor:
    """``(K, B, n_in)`` -> ``(K, B, n_out)``. ``layer_on[l]``: the masks (``layer_mask``) where
    some slot has fewer than ``l + 1`` layers (layer l is then skipped for it), or None where all
    have it.
    Padded units need no mask: their weights are zero, so they add nothing downstream and their
    gradients are never applied (the update touches only the real entries)."""
    h = x
    for layer in range(n_layers):
        z = torch.baddbmm(w[f"b{layer}"], h, w[f"w{layer}"])
        a = _apply(runs, z, ACT_FORWARD)
        if tape is not None:
            tape.inputs.append(h)
            tape.z.append(z)
            tape.a.append(a)
        on = layer_on[layer]
        # a skipped layer passes h on: a * 1 + h * 0 is a, a * 0 + h * 1 is h, exactly
        h = a if on is None or layer == 0 else torch.addcmul(h * on[1], a, on[0])
    if tape is not None:
        tape.last = h
    return torch.baddbmm(w["bout"], h, w["wout"])


def backward(
    tape: Tape,
    w: dict[str, torch.Tensor],
    grad: torch.Tensor,
    d_out: torch.Tensor,
    runs: list[tuple[str, int]],
    layer_on: list[LayerMask | None],
) -> None:
    """Write every parameter's gradient into ``grad`` (``(K, P)``, laid out as ``w``: layer by
    layer, weight then bias), given the gradient of the summed per-slot losses with respect to
    the outputs ``d_out``. Each product lands in a fresh contiguous tensor and one ``cat`` writes
    them all: torch's batched GEMM on CPU needs a contiguous result (into a strided view of the
    block it falls back to one small GEMM per slot)."""
    assert tape.last is not None
    K = d_out.shape[0]
    parts = [d_out.sum(1), torch.bmm(tape.last.transpose(1, 2), d_out).view(K, -1)]  # bias, weight
    n_layers = len(tape.z)
    dh = torch.bmm(d_out, w["wout"].transpose(1, 2)) if n_layers else d_out
    for layer in range(n_layers - 1, -1, -1):
        on = layer_on[layer] if layer else None
        da = dh if on is None else dh * on[0]
        dz = _apply(runs, da, ACT_BACKWARD, tape.z[layer], tape.a[layer])
        parts += [dz.sum(1), torch.bmm(tape.inputs[layer].transpose(1, 2), dz).view(K, -1)]
        if layer:
            dh_in = torch.bmm(dz, w[f"w{layer}"].transpose(1, 2))
            dh = dh_in if on is None else torch.addcmul(dh_in, dh, on[1])
    torch.cat(parts[::-1], 1, out=grad)  # built from the output back: w0, b0, ..., wout, bout


def loss_and_grad(
    out: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, task: str, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's mean loss over its batch rows (``rows``: ``(K, b)`` bool) as ``train()``'s
    (MSE, or cross-entropy, with per-row class weights ``weight`` where they are balanced), and
    the gradient of their sum with respect to the outputs ``out``."""
    if task == "regression":
        err = torch.where(rows, out - y, 0.0)
        scale = 1.0 / rows.sum(1).clamp_min(1)[:, None]
        return (err * err).sum(1) * scale[:, 0], (2 * err * scale).unsqueeze(-1)
    n_out = out.shape[-1]
    per_row = F.cross_entropy(out.reshape(-1, n_out), y.reshape(-1), reduction="none").view(y.shape)
    # cross_entropy(weight=w)'s mean, per slot: sum(w_y * loss) / sum(w_y) over its rows
    w_rows = rows.to(out.dtype) if weight is None else weight
    w_rows = w_rows / w_rows.sum(1, keepdim=True).clamp_min(1e-30)
    d_out = (torch.softmax(out, -1) - F.one_hot(y, n_out).to(out.dtype)) * w_rows.unsqueeze(-1)
    return (per_row * w_rows).sum(1), d_out


def step_scalars(lr: np.ndarray, step: np.ndarray, wd_decoupled: np.ndarray) -> np.ndarray:
    """Per slot, ``(K, 4)`` float32: lr, Adam's step size and sqrt of its second bias correction
    at optimizer step ``step`` (counted from 1), and AdamW's decay factor."""
    safe = np.maximum(step, 1)
    scalars = np.stack([lr, lr / (1 - _BETA1**safe), np.sqrt(1 - _BETA2**safe), 1 - lr * wd_decoupled], 1)
    return scalars.astype(np.float32)


def update(
    p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor, *, sgd: bool,
    decoupled: bool
) -> None:
    """torch's SGD(momentum) or Adam / AdamW (``decoupled``: some slot decays its weights) step
    of a ``(K, P)`` block in place, with ``step_scalars``' per-slot values (``(K, 4)``)."""
    lr, step_size, bc2_sqrt, decay = scalars[:, 0:1], scalars[:, 1:2], scalars[:, 2:3], scalars[:, 3:4]
    if sgd:
        m.mul_(_MOMENTUM).add_(grad)
        p.addcmul_(m, lr, value=-1.0)
        return
    if decoupled:
        p.mul_(decay)
    m.lerp_(grad, 1 - _BETA1)
    v.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
    # sqrt of 0.0 takes ~15x as long as of a normal float on CPUs seen here (padded and free
    # entries are 0): clamped to the smallest normal float the denominator is the same float,
    # since sqrt(tiny) / bc2_sqrt is far below half an ulp of eps.
    denom = v.clamp_min(_TINY).sqrt_().div_(bc2_sqrt).add_(_EPS)
    p.addcdiv_(m * step_size, denom, value=-1.0)
