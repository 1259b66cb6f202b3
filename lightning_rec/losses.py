"""Next-item losses over the positions that have a target (padding excluded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "sampled_softmax", "bce")
NEG_SAMPLERS = ("uniform", "popularity")


def popularity_log_q(counts: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """log q(i) for negatives drawn with probability proportional to ``(count_i + 1) ** power``.

    counts (N + 1,) training occurrences per item id, row 0 padding (never drawn: log q = -inf).
    The +1 keeps items unseen in training drawable.
    """
    w = (counts.double().clamp(min=0) + 1.0) ** power
    w[0] = 0.0
    return (w / w.sum()).log().float()


def full_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue. hidden (M, d), weight (N+1, d), targets (M,)."""
    logits = hidden @ weight[1:].T  # (M, N): padding is never a class
    return F.cross_entropy(logits.float(), targets - 1)


def draw_negatives(n_items: int, num: int, device, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """``num`` negative ids in 1..n_items, uniform, or from ``exp(log_q)`` (with replacement)."""
    if log_q is None:
        return torch.randint(1, n_items + 1, (num,), device=device)
    return torch.multinomial(log_q.exp(), num, replacement=True).to(device)


def sampled_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int,
    log_q: torch.Tensor | None = None, correct: bool = True,
) -> torch.Tensor:
    """Softmax over the target and ``num_negatives`` negatives shared by the batch.

    Negatives are uniform, or drawn from ``exp(log_q)`` (N + 1,) when given; with ``correct``,
    log q of each candidate (target included) is subtracted from its logit (the sampled-softmax
    correction of Jean et al. 2015 / "logQ correction" of Yi et al. 2019), so that the loss
    estimates the full softmax instead of a popularity-discounted one. A negative that equals a
    row's target is masked out for that row.
    """
    n_items = weight.shape[0] - 1
    negs = draw_negatives(n_items, num_negatives, hidden.device, log_q)  # (K,)
    pos = (hidden * weight[targets]).sum(-1, keepdim=True)  # (M, 1)
    neg = hidden @ weight[negs].T  # (M, K)
    if log_q is not None and correct:
        lq = log_q.to(hidden.device)
        pos = pos - lq[targets][:, None].to(pos.dtype)
        neg = neg - lq[negs][None, :].to(neg.dtype)
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
