"""Samplers whose order is a pure function of (seed, epoch): exact resume, DDP sharding."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch`` and shards over DDP ranks.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed at epoch
    ``e`` sees the same order as an uninterrupted one, without touching global RNG.

    Args:
        n: dataset size.
        seed: base seed.
        shuffle: permute each epoch (training) or keep order (evaluation).
        pad: pad the shard so every rank gets the same count (training, keeps DDP in
            step); evaluation uses ``pad=False`` so no user is counted twice.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, pad: bool = True):
        self.n, self.seed, self.shuffle, self.pad = n, seed, shuffle, pad
        self.epoch = 0
        self.rank, self.world = _dist_info()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        if self.world > 1:
            if self.pad and self.n % self.world:
                extra = self.world - self.n % self.world
                idx = torch.cat([idx, idx[:extra]])
            idx = idx[self.rank :: self.world]
        return idx

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        if self.pad:
            return -(-self.n // self.world)
        return len(range(self.rank, self.n, self.world))
