"""The outer step: how the global model moves toward the mean of the chosen models.

Options ``outer_lr``, ``outer_momentum``, ``outer_nesterov`` (defaults 1, 0: the new global model is the
plain mean). Otherwise the mean ``m`` is treated as a step, not a destination: with the pseudo-gradient
``delta = w - m`` and a momentum buffer ``b`` (zero at the start and after a stack),
``b <- mu * b + delta`` and ``w <- w - outer_lr * (delta + mu * b)`` (Nesterov) or
``w <- w - outer_lr * b`` (heavy ball). This is the outer step of DiLoCo (Douillard et al. 2023, outer lr
0.7, Nesterov momentum 0.9); every rank computes it from the same all-reduced mean, so it costs no
communication. The buffer is kept in checkpoints.
"""

from __future__ import annotations

import torch

from lightning_rec.errors import ConfigError


class OuterStep:
    """The outer optimizer of top-k averaging; its momentum buffers are the same on every rank."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = True) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"trainer.strategy.outer_lr={lr!r}: expected a positive number (1: the plain mean)")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ConfigError(f"trainer.strategy.outer_momentum={momentum!r}: expected a number in [0, 1)")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.buffers: list[torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the momentum (with the global model: start, resume without buffers, stack)."""
        self.buffers = None

    def __call__(self, i: int, w: torch.Tensor, mean: torch.Tensor, global_params: list[torch.Tensor]) -> torch.Tensor:
        """The new global value of parameter ``i`` from its old ``w`` and the chosen models' mean."""
        if self.lr == 1.0 and self.momentum == 0.0:
            return mean
        delta = w - mean  # pseudo-gradient
        if self.momentum:
            if self.buffers is None:
                self.buffers = [torch.zeros_like(x) for x in global_params]
            buf = self.buffers[i]
            buf.mul_(self.momentum).add_(delta)
            delta = delta + self.momentum * buf if self.nesterov else buf.clone()
        return w - self.lr * delta

    # -- checkpoints
    def state(self) -> list[torch.Tensor] | None:
        return None if self.buffers is None else [b.detach().cpu().clone() for b in self.buffers]

    def load(self, buffers: list[torch.Tensor] | None, global_params: list[torch.Tensor]) -> None:
        """Take saved buffers back if they fit the global model (a stack since then: they do not)."""
        if buffers is not None and [tuple(b.shape) for b in buffers] == [tuple(g.shape) for g in global_params]:
            self.buffers = [b.to(g.device, g.dtype) for b, g in zip(buffers, global_params)]
