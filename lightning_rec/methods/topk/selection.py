"""Which ranks' models a round averages: the ``k`` closest (L2) to the global model, and their mean.

At the end of a round each rank computes the L2 distance of its local model to the global model ``w``
(on the parameters ``distance_params`` names, all by default); the distances are all-gathered (one number
per rank), the ``k`` closest ranks are chosen (ties to the lower rank, so every rank chooses the same), and
one all-reduce of the chosen ranks' tensors (the others contribute zeros) gives their mean.
"""

from __future__ import annotations

import fnmatch

import torch

from lightning_rec.errors import ConfigError
from lightning_rec.methods.topk.metering import _CommMeter


def resolve_k(k: int | float, world: int, option: str = "trainer.strategy.k") -> int:
    """``k`` as a count of ranks: an int is a count, a float in (0, 1] a fraction of the ranks."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"{option}={k!r}: expected a number of ranks (int) or a fraction in (0, 1]")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ConfigError(f"{option}={k}: a fraction must be in (0, 1] (write an integer, e.g. k=3, for a count)")
        return max(1, min(world, int(round(k * world))))
    if not 1 <= k:
        raise ConfigError(f"{option}={k}: expected at least 1")
    return min(k, world)


def select_topk(distances: torch.Tensor, k: int) -> list[int]:
    """The ``k`` ranks with the smallest distance, ascending; ties go to the lower rank."""
    d = distances.detach().double().cpu()
    order = sorted(range(d.numel()), key=lambda r: (float(d[r]) if torch.isfinite(d[r]) else float("inf"), r))
    return sorted(order[:k])


def distance_mask(names: list[str], patterns: list[str] | None) -> list[bool]:
    """Which parameters (by name) the distance is measured on: those matching an fnmatch pattern (all: None)."""
    if not patterns:
        return [True] * len(names)
    mask = [any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in names]
    if not any(mask):
        raise ConfigError(f"trainer.strategy.distance_params={patterns}: match no parameter; "
                          f"names look like {names[:3]}")
    return mask


def distances_to_global(params: list[torch.Tensor], global_params: list[torch.Tensor], mask: list[bool],
                        world: int, meter: _CommMeter) -> torch.Tensor:
    """Every rank's L2 distance of its local model to the global one (float64, one per rank)."""
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p, g, m in zip(params, global_params, mask):
        if m:
            sq += (p.detach().double() - g.double()).pow(2).sum()
    if world > 1:
        return torch.stack(meter.all_gather(sq, world)).sqrt()
    return sq.sqrt().reshape(1)


def chosen_mean(tensors: list[torch.Tensor], chosen: list[int], rank: int, world: int,
                meter: _CommMeter) -> torch.Tensor:
    """Mean over the ``chosen`` ranks of each rank's ``tensors``, flattened: one all-reduce, bytes counted."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if world > 1:
        if rank not in chosen:
            flat.zero_()
        meter.all_reduce(flat)
    return flat.div_(len(chosen))


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (the inverse of concatenating them)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
