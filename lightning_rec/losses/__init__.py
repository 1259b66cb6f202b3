"""Next-item losses over the positions that have a target (padding excluded).

Memory: with ``chunk_rows`` the losses that score a candidate set (full CE, sampled softmax) are computed
``chunk_rows`` positions at a time and no (positions x candidates) logit tensor is kept for the backward pass:
:func:`chunked_ce` is a fused linear + cross-entropy that keeps only each row's log-sum-exp and recomputes a
chunk's logits in backward, in one reused :class:`LogitBuffer`; the sampled losses recompute each chunk
through :func:`chunked_sum` (activation checkpointing). Peak memory is then ``chunk_rows x candidates`` floats
whatever the number of positions in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("ce", "sampled_softmax", "bce")
NEG_SAMPLERS = ("uniform", "popularity", "mixed")


def popularity_log_q(counts: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """log q(i) for negatives drawn with probability proportional to ``(count_i + 1) ** power``.

    counts (N + 1,) training occurrences per item id, row 0 padding (never drawn: log q = -inf).
    The +1 keeps items unseen in training drawable.
    """
    w = (counts.double().clamp(min=0) + 1.0) ** power
    w[0] = 0.0
    return (w / w.sum()).log().float()


def full_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None,
            buffer: LogitBuffer | None = None) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue. hidden (M, d), weight (N+1, d), targets (M,).

    ``chunk_rows``: the fused, row-chunked form (:func:`chunked_ce`); None: one (M, N) logit tensor.
    """
    if chunk_rows:
        return chunked_ce(hidden, weight[1:], targets - 1, int(chunk_rows), buffer).mean()
    logits = hidden @ weight[1:].T  # (M, N): padding is never a class
    return F.cross_entropy(logits.float(), targets - 1)


class LogitBuffer:
    """One float32 scratch tensor reused for every chunk's logits, step after step.

    A (chunk x catalogue) tensor is far above the allocator's reuse sizes: allocated afresh each chunk it is
    mapped and unmapped each time, which costs page faults (system time) on every step. Only
    :func:`chunked_ce` writes it, and nothing in it outlives one forward or backward call.
    """

    def __init__(self):
        self._t: torch.Tensor | None = None

    def get(self, rows: int, cols: int, device) -> torch.Tensor:
        n = rows * cols
        t = self._t
        if t is None or t.numel() < n or t.device != torch.device(device):
            t = self._t = None  # drop the old one before allocating the new one
            t = self._t = torch.empty(n, dtype=torch.float32, device=device)
        return t[:n].view(rows, cols)

    def release(self) -> None:
        self._t = None


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-row CE of ``h @ w.T`` (M, C) against column ``col`` (M,), chunk_rows rows at a time.

    Keeps h, w, col and each row's log-sum-exp for backward (no M x C tensor); backward recomputes a chunk's
    logits, turns them into ``softmax - onehot`` in place and accumulates ``grad_h`` and ``grad_w`` from it.
    Computed in float32 (inputs of another dtype are cast; their gradients are cast back).
    """

    @staticmethod
    def forward(ctx, h, w, col, chunk_rows, buffer):
        with torch.autocast(h.device.type, enabled=False):
            h32, w32 = h.float(), w.float()
            m, c = h.shape[0], w.shape[0]
            rows = min(chunk_rows, max(m, 1))
            buf = buffer.get(rows, c, h.device) if buffer is not None else None
            lse = torch.empty(m, dtype=torch.float32, device=h.device)
            picked = torch.empty(m, dtype=torch.float32, device=h.device)
            for s in range(0, m, rows):
                e = min(s + rows, m)
                z = torch.mm(h32[s:e], w32.T, out=buf[: e - s]) if buf is not None else h32[s:e] @ w32.T
                picked[s:e] = z.gather(1, col[s:e, None]).squeeze(1)
                mx = z.amax(1, keepdim=True)
                lse[s:e] = z.sub_(mx).exp_().sum(1).log_().add_(mx.squeeze(1))
            ctx.save_for_backward(h, w, col, lse)
            ctx.chunk_rows, ctx.buffer = rows, buffer
        return lse - picked

    @staticmethod
    def backward(ctx, grad_rows):
        h, w, col, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            h32, w32 = h.float(), w.float()
            m, c = h.shape[0], w.shape[0]
            rows, buffer = ctx.chunk_rows, ctx.buffer
            buf = buffer.get(rows, c, h.device) if buffer is not None else None
            grad_rows = grad_rows.float()
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            gh = torch.empty_like(h32) if need_h else None
            gw = torch.zeros_like(w32) if need_w else None
            for s in range(0, m, rows):
                e = min(s + rows, m)
                z = torch.mm(h32[s:e], w32.T, out=buf[: e - s]) if buf is not None else h32[s:e] @ w32.T
                p = z.sub_(lse[s:e, None]).exp_()  # softmax
                p.scatter_add_(1, col[s:e, None], torch.full((e - s, 1), -1.0, device=p.device))
                p.mul_(grad_rows[s:e, None])
                if need_h:
                    torch.mm(p, w32, out=gh[s:e])
                if need_w:
                    gw.addmm_(p.T, h32[s:e])
        return (None if gh is None else gh.to(h.dtype)), (None if gw is None else gw.to(w.dtype)), None, None, None


def chunked_ce(h: torch.Tensor, w: torch.Tensor, col: torch.Tensor, chunk_rows: int,
               buffer: LogitBuffer | None = None) -> torch.Tensor:
    """Fused linear + cross-entropy: per-row ``-log softmax(h @ w.T)[col]`` (M,), with memory bounded by
    ``chunk_rows x C`` (w (C, d), col (M,) in 0..C-1): logits are never kept for the backward pass."""
    return _ChunkedLinearCE.apply(h, w, col, int(chunk_rows), buffer)


def chunked_sum(piece: Callable[..., tuple[torch.Tensor, ...]], rows: tuple, shared: tuple,
                chunk_rows: int | None) -> tuple[torch.Tensor, ...]:
    """``piece(*row_args_chunk, *shared)`` summed over row chunks of ``rows`` (tensors of M rows, or None).

    Each chunk runs under activation checkpointing (recomputed in backward) when gradients are on, so only
    one chunk's intermediate tensors (e.g. its logits) exist at a time. ``chunk_rows`` None or >= M: one call.
    """
    m = next(r.shape[0] for r in rows if r is not None)
    step = m if not chunk_rows or chunk_rows >= m else int(chunk_rows)
    totals = None
    for start in range(0, max(m, 1), max(step, 1)):
        args = tuple(None if r is None else r[start:start + step] for r in rows) + tuple(shared)
        if step < m and torch.is_grad_enabled():
            parts = checkpoint(piece, *args, use_reentrant=False)
        else:
            parts = piece(*args)
        totals = parts if totals is None else tuple(a + b for a, b in zip(totals, parts))
    return totals


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
    log_q: torch.Tensor | None = None, correct: bool = True, chunk_rows: int | None = None,
) -> torch.Tensor:
    """Softmax over the target and ``num_negatives`` negatives shared by the batch.

    Negatives are uniform, or drawn from ``exp(log_q)`` (N + 1,) when given; with ``correct`` the
    logits are log q corrected (see :func:`candidate_logits`). A negative that equals a row's
    target is masked out for that row. ``chunk_rows``: computed that many rows at a time (:func:`chunked_sum`).
    """
    negs = draw_negatives(weight.shape[0] - 1, num_negatives, hidden.device, log_q)  # (K,)
    lq = log_q if correct else None

    def piece(h, t, w):
        logits, idx, valid = candidate_logits(h, w, t, negs, lq)
        return (masked_ce(logits, idx, valid).sum(),)

    return chunked_sum(piece, (hidden, targets), (weight,), chunk_rows)[0] / max(targets.shape[0], 1)


def mixed_candidates(targets: torch.Tensor, n_items: int, num_uniform: int) -> tuple[torch.Tensor, ...]:
    """The shared candidates of mixed negative sampling: the batch's distinct targets, then ``num_uniform``
    uniform draws from 1..n_items.

    Returns ``ids`` (C,), ``log_q`` (C,) and ``dup`` (C,) bool. An in-batch candidate's log q is the log of
    its in-batch sampling probability, ``log(count in targets / M)`` (M = len(targets): each target is one
    draw from the training distribution); a uniform one's is ``log(1 / n_items)``. ``dup`` marks a uniform
    draw that repeats an in-batch item or an earlier uniform draw (each item is a candidate once).
    """
    m = targets.shape[0]
    inb, counts = torch.unique(targets, return_counts=True)
    uni = torch.randint(1, n_items + 1, (num_uniform,), device=targets.device)
    ids = torch.cat([inb, uni])
    log_q = torch.cat([(counts.double() / max(m, 1)).log().float(),
                       torch.full((num_uniform,), -math.log(n_items), device=targets.device)])
    # first occurrence of each id among all candidates (in-batch ids come first and are distinct)
    _, inv = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((int(inv.max()) + 1 if ids.numel() else 0,), ids.numel(), device=ids.device, dtype=torch.long)
    first = first.scatter_reduce(0, inv, pos, reduce="amin")
    dup = pos != first[inv]
    return ids, log_q, dup


def mixed_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_uniform: int, correct: bool = True,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Sampled softmax over mixed negatives: the batch's own targets plus ``num_uniform`` uniform items.

    Mixed negative sampling (Yang et al., WWW 2020) with the logQ correction of Yi et al. (RecSys 2019):
    with ``correct``, every candidate's logit (the row's target included, itself an in-batch item) has its
    log sampling probability subtracted (:func:`mixed_candidates`). For each row, the candidate equal to its
    target (its in-batch copy, or a uniform draw) and duplicate draws are masked; the target is column 0.
    """
    ids, log_q, dup = mixed_candidates(targets, weight.shape[0] - 1, num_uniform)
    inb, counts = torch.unique(targets, return_counts=True)
    pos_lq = (counts.double() / max(targets.shape[0], 1)).log().float()[torch.searchsorted(inb, targets)]
    if not correct:
        log_q, pos_lq = torch.zeros_like(log_q), torch.zeros_like(pos_lq)

    def piece(h, t, plq, w):
        pos = (h * w[t]).sum(-1, keepdim=True) - plq[:, None].to(h.dtype)
        neg = h @ w[ids].T - log_q[None, :].to(h.dtype)
        valid = torch.cat([torch.ones_like(t, dtype=torch.bool)[:, None], (ids[None, :] != t[:, None]) & ~dup[None, :]], 1)
        return (masked_ce(torch.cat([pos, neg], 1), torch.zeros_like(t), valid).sum(),)

    return chunked_sum(piece, (hidden, targets, pos_lq), (weight,), chunk_rows)[0] / max(targets.shape[0], 1)


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
