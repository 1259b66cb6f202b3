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


def candidate_logits(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None,
                     log_q: torch.Tensor | None = None):
    """Logits over the candidate set, the index of each row's target in it, and a validity mask.

    h (m, d), w (N+1, d), targets (m,) in 1..N. Full catalogue when ``negatives`` is None: logits
    (m, N), target index ``targets - 1``, no mask. Sampled: column 0 is the target, then the shared
    negatives (K,); a negative equal to the row's target is invalid (mask False). With ``log_q``
    (N + 1,), log q of each sampled candidate, target included, is subtracted from its logit (the
    sampled-softmax correction of Jean et al. 2015 / "logQ correction" of Yi et al. 2019), so the
    softmax over the candidates estimates the full one instead of a popularity-discounted one.
    """
    if negatives is None:
        return h @ w[1:].T, targets - 1, None
    pos = (h * w[targets]).sum(-1, keepdim=True)
    neg = h @ w[negatives].T
    if log_q is not None:
        lq = log_q.to(h.device)
        pos = pos - lq[targets][:, None].to(pos.dtype)
        neg = neg - lq[negatives][None, :].to(neg.dtype)
    logits = torch.cat([pos, neg], 1)
    valid = torch.cat([torch.ones_like(targets, dtype=torch.bool)[:, None], negatives[None, :] != targets[:, None]], 1)
    return logits, torch.zeros_like(targets), valid


def masked_ce(logits: torch.Tensor, target_idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-row softmax cross-entropy (m,), invalid candidates excluded."""
    logits = logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(logits, target_idx, reduction="none")


def sampled_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int,
    log_q: torch.Tensor | None = None, correct: bool = True,
) -> torch.Tensor:
    """Softmax over the target and ``num_negatives`` negatives shared by the batch.

    Negatives are uniform, or drawn from ``exp(log_q)`` (N + 1,) when given; with ``correct`` the
    logits are log q corrected (see :func:`candidate_logits`). A negative that equals a row's
    target is masked out for that row.
    """
    negs = draw_negatives(weight.shape[0] - 1, num_negatives, hidden.device, log_q)  # (K,)
    logits, idx, valid = candidate_logits(hidden, weight, targets, negs, log_q if correct else None)
    return masked_ce(logits, idx, valid).mean()


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
