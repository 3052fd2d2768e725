"""The bank's forward and backward pass, written out by hand (no autograd).

A bank step is a few dozen tiny kernels; autograd's graph building and engine, the
gradient buffers it allocates and a ``cat`` of every layer's gradient were a large share of it.
Here the forward keeps what the backward needs (each layer's input, pre-activation and
output), and the backward writes every layer's weight and bias gradient straight into the
bank's preallocated ``(K, P)`` gradient block (one ``cat``). The activation
derivatives are torch's own backward kernels (``torch.ops.aten.*_backward``), so each slot's
gradient is the one autograd gives ``train()``'s ``nn.Sequential``, up to float32 summation order.

Like ``train.py`` this module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACT_BACKWARD", "ACT_FORWARD", "LayerMask", "Tape", "backward", "forward", "layer_mask"]

aten = torch.ops.aten

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
