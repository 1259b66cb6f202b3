"""SVRG for the local steps of top-k averaging (``svrg=true``).

At the start of each round the snapshot ``w~ = w`` (the global model) and its gradient ``mu`` are
computed: ``mu`` is averaged over ``svrg_batches`` batches drawn at random from the training set on each
rank (seeded by epoch, round and rank) and all-reduced over the ranks. Every local step then follows
``g_i(w) - g_i(w~) + mu``: the snapshot gradient is taken on the same batch, with the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_rec.errors import ConfigError
from lightning_rec.methods.topk.metering import _CommMeter
from lightning_rec.methods.topk.selection import chosen_mean, unflatten_into


def snapshot_gradient(module, params: list[torch.nn.Parameter], snapshot: list[torch.Tensor],
                      batch) -> list[torch.Tensor | None]:
    """Gradient of ``module.train_loss(batch)`` at the snapshot weights (None for a frozen parameter)."""
    saved = [p.data for p in params]
    try:
        for p, g in zip(params, snapshot):
            p.data = g
        loss = module.train_loss(batch)
        trainable = [p for p in params if p.requires_grad]  # a frozen parameter has no gradient to correct
        grads = iter(torch.autograd.grad(loss, trainable, allow_unused=True))
    finally:
        for p, s in zip(params, saved):
            p.data = s
    out = [next(grads) if p.requires_grad else None for p in params]
    return [None if g is None else g.detach() for g in out]


class SnapshotGradient:
    """The SVRG state of one rank: this round's snapshot gradient ``mu`` and the batch of the current step."""

    def __init__(self, enabled: bool = False, batches: int = 4) -> None:
        if not isinstance(batches, int) or batches < 1:
            raise ConfigError(f"trainer.strategy.svrg_batches={batches!r}: expected a positive integer")
        self.enabled, self.batches = bool(enabled), batches
        self.mu: list[torch.Tensor] | None = None  # this round's; None: computed at the round's first step
        self.batch: Any = None  # the training batch of the step in progress

    @staticmethod
    def check(trainer, precision_plugin) -> None:
        """Refuse the settings SVRG's per-step correction cannot work with."""
        if int(getattr(trainer, "accumulate_grad_batches", 1)) > 1:
            raise ConfigError("trainer.strategy.svrg=true: does not work with trainer.accumulate_grad_batches>1 (its "
                              "correction is per optimizer step); use a larger data.batch_size instead")
        if getattr(precision_plugin, "scaler", None) is not None:
            raise ConfigError("trainer.strategy.svrg=true: does not work with trainer.precision=16-mixed (the loss "
                              "scale would shrink its correction); use bf16-mixed or 32-true")

    def compute_mu(self, module, params: list[torch.nn.Parameter], snapshot: list[torch.Tensor], *, seed: int,
                   device, rank: int, world: int, meter: _CommMeter) -> None:
        """``mu``: the snapshot gradient on ``batches`` random training batches, averaged over them and the ranks."""
        loader = module.trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
        bs = getattr(loader, "batch_size", None) or 1
        if ds is None or not hasattr(ds, "__getitems__"):
            raise ConfigError("trainer.strategy.svrg=true: needs this project's training set (a map-style dataset "
                              "with __getitems__)")
        g = torch.Generator().manual_seed(seed)
        total: list[torch.Tensor | None] | None = None
        for _ in range(self.batches):
            idx = torch.randint(0, len(ds), (bs,), generator=g).tolist()
            batch = {k: v.to(device) for k, v in ds.__getitems__(idx).items()}
            grads = snapshot_gradient(module, params, snapshot, batch)
            total = grads if total is None else [a if b is None else (b if a is None else a + b)
                                                 for a, b in zip(total, grads)]
        mu = [torch.zeros_like(p) if t is None else t / self.batches for p, t in zip(params, total)]
        if world > 1:
            unflatten_into(chosen_mean(mu, list(range(world)), rank, world, meter), mu)
        self.mu = mu

    def closure(self, closure: Callable[[], Any], module, params: list[torch.nn.Parameter],
                snapshot: list[torch.Tensor]) -> Callable[[], Any]:
        """``closure`` with each gradient corrected to ``g(w) - g(w~) + mu`` on the current batch."""
        def wrapped():
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            snap = snapshot_gradient(module, params, snapshot, self.batch)
            torch.set_rng_state(rng)  # same dropout masks for both gradients
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            loss = closure()
            with torch.no_grad():
                for p, s, m in zip(params, snap, self.mu):
                    if p.grad is None:
                        continue
                    if s is not None:
                        p.grad.sub_(s)
                    p.grad.add_(m)
            return loss

        return wrapped

    # -- checkpoints: mid-round, this round's mu (the same on every rank) resumes with the round
    def state(self) -> list[torch.Tensor] | None:
        return None if self.mu is None else [m.detach().cpu().clone() for m in self.mu]

    def load(self, mu: list[torch.Tensor] | None, global_params: list[torch.Tensor]) -> None:
        if self.enabled and mu is not None and len(mu) == len(global_params):
            self.mu = [m.to(g.device, g.dtype) for m, g in zip(mu, global_params)]
