"""Next-item losses over the positions that have a target (padding excluded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "sampled_softmax", "bce")


def full_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue. hidden (M, d), weight (N+1, d), targets (M,)."""
    logits = hidden @ weight[1:].T  # (M, N): padding is never a class
    return F.cross_entropy(logits.float(), targets - 1)


def sampled_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int
) -> torch.Tensor:
    """Softmax over the target and ``num_negatives`` uniform negatives shared by the batch.

    A negative that equals a row's target is masked out for that row.
    """
    n_items = weight.shape[0] - 1
    negs = torch.randint(1, n_items + 1, (num_negatives,), device=hidden.device)  # (K,)
    pos = (hidden * weight[targets]).sum(-1, keepdim=True)  # (M, 1)
    neg = hidden @ weight[negs].T  # (M, K)
    neg = neg.masked_fill(negs[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos, neg], 1).float()
    return F.cross_entropy(logits, torch.zeros_like(targets))


def bce_one_negative(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The original SASRec loss: binary CE on the target and one uniform negative per position.

    Negatives are uniform over the catalogue and redrawn (shifted) where they hit the target.
    """
    n_items = weight.shape[0] - 1
    negs = torch.randint(1, n_items + 1, targets.shape, device=hidden.device)
    negs = torch.where(negs == targets, negs % n_items + 1, negs)
    pos = (hidden * weight[targets]).sum(-1).float()
    neg = (hidden * weight[negs]).sum(-1).float()
    return (F.softplus(-pos) + F.softplus(neg)).mean()
