"""Communication metering: the bytes each rank hands to collectives (``comm/bytes``, cumulative).

Synchronous DDP (:class:`MeteredDDPStrategy`) and top-k averaging report communication the same way: the
payload one rank contributes, so the two can be compared per rank. Under DDP that is every gradient bucket
the all-reduce hook sees; under top-k every tensor the exchange gathers or reduces (:class:`_CommMeter`'s
``all_gather`` / ``all_reduce``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn

from lightning_rec.errors import ConfigError


class _CommMeter:
    """Bytes this rank handed to collectives. Also the state of the DDP all-reduce hook that counts them."""

    def __init__(self) -> None:
        self.bytes = 0

    def count(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()

    def all_gather(self, tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (this rank's counted)."""
        out = [torch.zeros_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor)
        self.count(tensor)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (this rank's payload counted)."""
        dist.all_reduce(tensor)
        self.count(tensor)
        return tensor


def _counting_allreduce(state: _CommMeter, bucket):
    """DDP communication hook: count the bucket's bytes, then all-reduce it as DDP's default hook does."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.count(bucket.buffer())
    return default_hooks.allreduce_hook(None, bucket)


def log_comm(strategy, nbytes: int, step: int) -> None:
    """Log ``comm/bytes`` from rank 0 to every logger of the strategy's trainer."""
    trainer = strategy.lightning_module.trainer
    if strategy.is_global_zero and trainer is not None:
        for lg in trainer.loggers:
            lg.log_metrics({"comm/bytes": float(nbytes)}, step=int(step))


class MeteredDDPStrategy(DDPStrategy):
    """Lightning's DDP, logging the gradient bytes each rank all-reduces (``comm/bytes``)."""

    strategy_name = "metered_ddp"

    def __init__(self, **kwargs: Any) -> None:
        if "ddp_comm_hook" in kwargs:
            raise ConfigError("trainer.strategy.ddp_comm_hook: MeteredDDPStrategy installs its own; use strategy=ddp")
        self.meter = _CommMeter()
        super().__init__(**kwargs)

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the module in DistributedDataParallel (no comm hook of Lightning's: none given)
        # Lightning registers comm hooks on CUDA only; gloo supports them too, and both need counting
        self.model.register_comm_hook(self.meter, _counting_allreduce)

    @property
    def comm_bytes(self) -> int:
        return self.meter.bytes

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        trainer = self.lightning_module.trainer
        if trainer is not None and (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            log_comm(self, self.meter.bytes, trainer.global_step + 1)
        return out

    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            log_comm(self, self.meter.bytes, trainer.global_step)
