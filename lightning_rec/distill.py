"""Loss pieces for training a student next to a teacher: candidate logits, hint terms, chunking.

Used by :class:`~lightning_rec.rocket.RocketModule` (booster and light net trained together)
and by a plain :class:`~lightning_rec.module.SeqRecModule` distilled from a frozen teacher;
:class:`~lightning_rec.callbacks.HintLossCallback` chooses the term, its weight and the gradient block.

Logits are compared on the same candidate set as the loss: the whole catalogue (``loss=ce``) or
the target plus negatives shared by the batch (``loss=sampled_softmax``). Rows (positions with a
target) are processed in chunks whose logits are recomputed in the backward pass, so memory is
bounded by ``chunk_rows x candidates`` whatever the catalogue size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HINT_KINDS = ("mse", "kl", "kl_l2", "mse+kl")


def candidate_logits(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None):
    """Logits over the candidate set, the index of each row's target in it, and a validity mask.

    h (m, d), w (N+1, d), targets (m,) in 1..N. Full catalogue when ``negatives`` is None: logits
    (m, N), target index ``targets - 1``, no mask. Sampled: column 0 is the target, then the shared
    negatives (K,); a negative equal to the row's target is invalid (mask False).
    """
    if negatives is None:
        return h @ w[1:].T, targets - 1, None
    pos = (h * w[targets]).sum(-1, keepdim=True)
    logits = torch.cat([pos, h @ w[negatives].T], 1)
    valid = torch.cat([torch.ones_like(targets, dtype=torch.bool)[:, None], negatives[None, :] != targets[:, None]], 1)
    return logits, torch.zeros_like(targets), valid


def masked_ce(logits: torch.Tensor, target_idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-row softmax cross-entropy (m,), invalid candidates excluded."""
    logits = logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(logits, target_idx, reduction="none")


def hint_mse(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Rocket's hint: squared logit difference summed over the candidates, per row (m,)."""
    d = (zs.float() - zt.float()) ** 2
    if valid is not None:
        d = d * valid
    return d.sum(-1)


def hint_kl(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Classic KD: T^2 * KL(softmax(zt / T) || softmax(zs / T)) per row (m,)."""
    zs, zt = zs.float() / temperature, zt.float() / temperature
    if valid is not None:
        zs, zt = zs.masked_fill(~valid, float("-inf")), zt.masked_fill(~valid, float("-inf"))
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    kl = lt.exp() * (lt - ls)
    if valid is not None:
        kl = torch.where(valid, kl, torch.zeros_like(kl))  # 0 * (-inf - -inf) would be NaN
    return kl.sum(-1) * temperature**2


@dataclass
class HintSpec:
    """What to add to the student's loss. ``fn(zs, zt, valid) -> (m,)``; ``block`` detaches the teacher."""

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    weight: float
    block: bool = True
    student_ce_weight: float = 1.0


def joint_losses(
    hs: torch.Tensor,
    ws: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor | None = None,
    ht: torch.Tensor | None = None,
    wt: torch.Tensor | None = None,
    teacher_ce: bool = False,
    hint: HintSpec | None = None,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean student CE, teacher CE (when ``teacher_ce``) and hint over the rows, in chunks.

    hs/ht (m, d): student/teacher hidden states at the positions with a target; ws/wt (N+1, d)
    their scoring tables. With ``hint.block`` the hint sees ``stopgrad(teacher logits)``, so
    parameters only the teacher uses get no gradient from it.
    """
    m = hs.shape[0]
    use_teacher = ht is not None and (teacher_ce or hint is not None)

    def piece(hs_c, ht_c, tg_c, ws_, wt_):
        zs, idx, valid = candidate_logits(hs_c, ws_, tg_c, negatives)
        out = [masked_ce(zs, idx, valid).sum()]
        if use_teacher:
            zt, _, _ = candidate_logits(ht_c, wt_, tg_c, negatives)
            out.append(masked_ce(zt, idx, valid).sum() if teacher_ce else zs.new_zeros(()))
            if hint is not None:
                out.append(hint.fn(zs, zt.detach() if hint.block else zt, valid).sum())
        return tuple(out)

    rows = m if not chunk_rows or chunk_rows >= m else int(chunk_rows)
    totals = None
    for start in range(0, m, rows):
        sl = slice(start, start + rows)
        args = (hs[sl], ht[sl] if use_teacher else None, targets[sl], ws, wt if use_teacher else None)
        if rows < m and torch.is_grad_enabled():
            # Logits of one chunk at a time: recomputed in backward instead of kept for all rows.
            parts = checkpoint(piece, *args, use_reentrant=False)
        else:
            parts = piece(*args)
        totals = parts if totals is None else tuple(a + b for a, b in zip(totals, parts))
    n = max(m, 1)
    out = {"student_ce": totals[0] / n}
    if use_teacher:
        if teacher_ce:
            out["teacher_ce"] = totals[1] / n
        if hint is not None:
            out["hint"] = totals[2] / n
    return out
