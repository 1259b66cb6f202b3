"""Ranking metrics from the target's rank, computed in item chunks.

NaN scores never help: a NaN target ranks last, a NaN candidate counts as scored higher.

Tie rule: ``rank = #items scored strictly higher + 0.5 * #other items scored equal``
(the expected rank under a random tie-break), so a constant model gets a chance-level
score rather than a perfect or a zero one. With ``seen`` given, items the user already
interacted with are excluded from the ranking, except the target itself.
HR@K = [rank < K], NDCG@K = 1/log2(rank + 2) if rank < K, MRR@K = 1/(rank + 1) if rank < K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScoreFn = Callable[[int, int], torch.Tensor]  # (start, end) -> scores of items start..end-1, (B, end - start)


def full_ranks(
    score_fn: ScoreFn,
    num_items: int,
    target: torch.Tensor,
    seen: torch.Tensor | None = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Rank of ``target`` (B,) among items ``1..num_items``; memory O(B * chunk_size).

    Args:
        score_fn: scores of a contiguous item range (column ``j`` is item ``start + j``).
        num_items: catalogue size; item 0 is padding and never ranked.
        target: (B,) target item per row.
        seen: (B, S) items to exclude per row (0 = padding); the target is never excluded.
        chunk_size: items scored at once.
    """
    B = target.shape[0]
    rows = torch.arange(B, device=target.device)
    bounds = [(c0, min(c0 + chunk_size, num_items + 1)) for c0 in range(1, num_items + 1, chunk_size)]
    # Pass 1: the target's own score, read from the same kernel that scores the other items
    # (a separate dot product can round differently and break exact ties).
    t_score = torch.empty(B, device=target.device)
    kept = None  # the last chunk scored, reused by pass 2 so one chunk never costs two matmuls
    for c0, c1 in bounds:
        in_c = (target >= c0) & (target < c1)
        if bool(in_c.any()):
            s = score_fn(c0, c1)
            t_score[in_c] = s[rows[in_c], target[in_c] - c0].float()
            kept = (c0, s)
    # Pass 2 (reverse order, starting with the kept chunk): count higher and tied items.
    higher = torch.zeros(B, device=target.device)
    ties = torch.zeros(B, device=target.device)
    for c0, c1 in reversed(bounds):
        if kept is not None and kept[0] == c0:
            s, kept = kept[1], None
        else:
            s = score_fn(c0, c1)
        s = torch.nan_to_num(s.float(), nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))  # NaN: higher; infs stay
        if seen is not None:
            local = seen - c0
            m = (local >= 0) & (local < c1 - c0) & (seen != target[:, None]) & (seen != 0)
            # NaN compares false both ways: an excluded item is neither higher nor tied, whatever
            # the target's score (-inf included).
            s[rows[:, None].expand_as(seen)[m], local[m]] = float("nan")
        in_c = (target >= c0) & (target < c1)
        # The target never counts against itself.
        s[rows[in_c], target[in_c] - c0] = float("nan")
        higher += (s > t_score[:, None]).sum(1)
        ties += (s == t_score[:, None]).sum(1)
    # A diverged model (NaN target score) must not look perfect: worst possible rank.
    return torch.where(torch.isnan(t_score), torch.full_like(higher, float(num_items)), higher + 0.5 * ties)


def sampled_ranks(target_score: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """Rank of the target (B,) among its sampled negatives (B, K), same tie rule."""
    t = target_score[:, None]
    neg = torch.nan_to_num(negative_scores.float(), nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    r = (neg > t).sum(1) + 0.5 * (neg == t).sum(1)
    return torch.where(torch.isnan(target_score), torch.full_like(r, float(neg.shape[1])), r)


def metrics_from_ranks(ranks: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-row HR@K, NDCG@K and MRR@K (B,) for every K, keyed ``hr@10`` etc."""
    out = {}
    ranks = ranks.float()
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.float()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), torch.zeros_like(ranks))
    return out


def topk_items(
    score_fn: ScoreFn, num_items: int, k: int, seen: torch.Tensor | None = None, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items (B, k) and scores over ``1..num_items``, excluding ``seen``, chunk by chunk.

    A row with fewer than ``k`` items left after the exclusion is filled with item 0 (padding) and
    score -inf; never with an excluded item.
    """
    best_s = best_i = None
    for c0 in range(1, num_items + 1, chunk_size):
        c1 = min(c0 + chunk_size, num_items + 1)
        s = score_fn(c0, c1).float().clone()
        B = s.shape[0]
        if seen is not None:
            local = seen - c0
            m = (local >= 0) & (local < c1 - c0) & (seen != 0)
            rows = torch.arange(B, device=s.device)[:, None].expand_as(seen)
            s[rows[m], local[m]] = float("-inf")
        ids = torch.arange(c0, c1, device=s.device).expand(B, -1)
        if best_s is not None:
            s, ids = torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1)
        kk = min(k, s.shape[1])
        best_s, pos = s.topk(kk, dim=1)
        best_i = ids.gather(1, pos)
    return best_i.masked_fill(torch.isneginf(best_s), 0), best_s
