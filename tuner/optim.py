"""The optimisers of ``train()``: torch's own update functions, held with their state.

``torch.optim.Optimizer`` imports ``torch._dynamo`` (for ``torch.compile``'s graph breaks) when
it is built and on every ``zero_grad`` and ``step``: 1.4-1.8 s on this project's 2-core machine,
the largest single part of a 1-trial launch (docs/performance.md, fixed cost), spent for a
compiler ``train()`` never uses. ``Adam/AdamW/SGD.step`` are thin wrappers around the public
functional updates ``torch.optim.adam.adam``, ``torch.optim.adamw.adamw`` and
``torch.optim.sgd.sgd``; ``Stepper`` calls those with the state the classes would keep, so the
arithmetic is torch's (tests/test_optim.py holds the weights bit-equal to ``torch.optim`` over
many steps, fused and not) and nothing of the compiler is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from tuner.config import OPTIMIZERS

__all__ = ["Stepper"]

_BETAS, _EPS, _MOMENTUM = (0.9, 0.999), 1e-8, 0.9  # torch's Adam defaults; train()'s SGD momentum


class Stepper:
    """``torch.optim.Adam`` / ``AdamW`` / ``SGD(momentum=0.9)`` over ``params``, one param group.

    ``lr`` may be changed between steps (a schedule sets it). ``fused`` as for torch's Adam
    (one kernel for the whole update; CPU and CUDA); None lets torch choose, as its classes do.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        kind: Literal["adam", "adamw", "sgd"],
        *,
        lr: float,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {kind!r}; choose one of {list(OPTIMIZERS)}")
        self.params = [p for p in params if p.requires_grad]
        self.kind, self.lr, self.weight_decay = kind, lr, weight_decay
        self.fused = fused if kind != "sgd" else None
        self._moments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._momentum: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        with_grad: list[int] = []
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            if p.grad is not None:
                with_grad.append(i)
                params.append(p)
                grads.append(p.grad)
        if self.kind == "sgd":
            buffers = [self._momentum[i] for i in with_grad]
            sgd(params, grads, buffers, weight_decay=self.weight_decay, momentum=_MOMENTUM, lr=self.lr,
                dampening=0.0, nesterov=False, maximize=False)
            for i, buf in zip(with_grad, buffers):  # sgd() creates a buffer on its first step
                self._momentum[i] = buf
            return
        if self._moments is None:
            self._moments = [self._zeros(p) for p in self.params]
        moments = [self._moments[i] for i in with_grad]
        update = adam if self.kind == "adam" else adamw
        update(params, grads, [m[0] for m in moments], [m[1] for m in moments], [], [m[2] for m in moments],
               fused=self.fused, amsgrad=False, beta1=_BETAS[0], beta2=_BETAS[1], lr=self.lr,
               weight_decay=self.weight_decay, eps=_EPS, maximize=False)

    def _zeros(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As Adam._init_group: the step count on the device (float32) when fused, else on the host.
        step = (torch.zeros((), dtype=torch.float32, device=p.device) if self.fused
                else torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                  else torch.float32))
        zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
        return zeros, torch.zeros_like(zeros), step
