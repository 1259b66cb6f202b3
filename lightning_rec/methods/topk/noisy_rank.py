"""Make one rank of a distributed run noisy, to test robust averaging (``trainer=topk``)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError


class NoisyRankCallback(pl.Callback):
    """Corrupt the training of one rank: shuffled labels, or a learning rate scaled up.

    Args:
        rank: the global rank made noisy (no effect on the others, nor in one process).
        mode: ``shuffle_targets`` permutes the next-item targets of each batch among themselves
            (the rank learns from wrong labels); ``lr_scale`` multiplies its learning rate.
        lr_scale: the factor for ``mode=lr_scale``.
        seed: the permutation seed (per step, so runs repeat).
    """

    def __init__(self, rank: int = 0, mode: str = "shuffle_targets", lr_scale: float = 10.0, seed: int = 0):
        if mode not in ("shuffle_targets", "lr_scale"):
            raise ConfigError(f"callbacks.noisy_rank.mode={mode}: expected shuffle_targets or lr_scale")
        self.rank, self.mode, self.lr_scale, self.seed = int(rank), mode, float(lr_scale), int(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and not 0 <= self.rank < trainer.world_size:
            raise ConfigError(f"callbacks.noisy_rank.rank={self.rank}: this run has ranks 0..{trainer.world_size - 1}")
        rank_zero_info(f"noisy rank {self.rank}: {self.mode}" + (f" x{self.lr_scale}" if self.mode == "lr_scale" else ""))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.world_size == 1 or trainer.global_rank != self.rank:
            return
        if self.mode == "lr_scale":
            for opt in trainer.optimizers:  # each group once; groups of rebuilt optimizers (a stack, a switch) too
                for g in opt.param_groups:
                    if not g.get("_noisy"):
                        g["lr"] *= self.lr_scale
                        g["_noisy"] = True
                    if g.get("swats_phase") == "sgd" and not g.get("_noisy_sgd"):  # a group switched to SGD
                        g["swats_rate"] *= self.lr_scale  # (callbacks=swats) steps at its own rate
                        g["_noisy_sgd"] = True
            return
        targets = batch["targets"] = batch["targets"].clone()  # batches may be views of the dataset
        mask = targets != 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        values = targets[mask]
        targets[mask] = values[torch.randperm(values.numel(), generator=g).to(values.device)]
