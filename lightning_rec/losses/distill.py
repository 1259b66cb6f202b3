"""Loss pieces for training a student next to a teacher: candidate logits, hint terms, chunking.

Used by :class:`~lightning_rec.methods.rocket.module.RocketModule` (booster and light net trained together)
and by a plain :class:`~lightning_rec.modules.seqrec.SeqRecModule` distilled from a frozen teacher;
:class:`~lightning_rec.methods.rocket.HintLossCallback` chooses the term, its weight and the gradient block.

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

from lightning_rec.losses import candidate_logits, chunked_sum, masked_ce

HINT_KINDS = ("mse", "mse_centered", "kl", "kl_l2", "mse+kl")


def hint_mse(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Rocket's hint: squared logit difference summed over the candidates, per row (m,)."""
    d = (zs.float() - zt.float()) ** 2
    if valid is not None:
        d = d * valid
    return d.sum(-1)


def hint_mse_centered(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Rocket's hint on zero-mean logits, per row (m,): each row's mean over its candidates is taken off
    both nets' logits first, so a shift that the softmax ignores costs nothing. Hinton et al. (2015, sec. 2.1)
    show that distillation at a high temperature is this matching of zero-mean logits."""
    zs, zt = zs.float(), zt.float()
    if valid is None:
        return hint_mse(zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True), None)
    zs, zt = torch.where(valid, zs, 0.0), torch.where(valid, zt, 0.0)
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    return hint_mse(zs - zs.sum(-1, keepdim=True) / n, zt - zt.sum(-1, keepdim=True) / n, valid)


def hint_kl(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Classic KD: T^2 * KL(softmax(zt / T) || softmax(zs / T)) per row (m,)."""
    zs, zt = zs.float() / temperature, zt.float() / temperature
    if valid is not None:
        zs, zt = zs.masked_fill(~valid, float("-inf")), zt.masked_fill(~valid, float("-inf"))
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    pt = lt.exp()
    if valid is not None:
        # 0 * (-inf - -inf) would be NaN, in the value and (through a where after it) in the gradient
        lt, ls = torch.where(valid, lt, 0.0), torch.where(valid, ls, 0.0)
    return (pt * (lt - ls)).sum(-1) * temperature**2


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
    log_q: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean student CE, teacher CE (when ``teacher_ce``) and hint over the rows, in chunks.

    hs/ht (m, d): student/teacher hidden states at the positions with a target; ws/wt (N+1, d)
    their scoring tables; ``log_q`` log-q-corrects sampled candidates for both nets (see
    :func:`~lightning_rec.losses.candidate_logits`). With ``hint.block`` the hint sees ``stopgrad(teacher logits)``, so
    parameters only the teacher uses get no gradient from it.
    """
    m = hs.shape[0]
    use_teacher = ht is not None and (teacher_ce or hint is not None)

    def piece(hs_c, ht_c, tg_c, ws_, wt_):
        zs, idx, valid = candidate_logits(hs_c, ws_, tg_c, negatives, log_q)
        out = [masked_ce(zs, idx, valid).sum()]
        if use_teacher:
            zt, _, _ = candidate_logits(ht_c, wt_, tg_c, negatives, log_q)
            out.append(masked_ce(zt, idx, valid).sum() if teacher_ce else zs.new_zeros(()))
            if hint is not None:
                out.append(hint.fn(zs, zt.detach() if hint.block else zt, valid).sum())
        return tuple(out)

    # Logits of one chunk at a time, recomputed in backward instead of kept for all rows.
    totals = chunked_sum(piece, (hs, ht if use_teacher else None, targets), (ws, wt if use_teacher else None),
                         chunk_rows)
    n = max(m, 1)
    out = {"student_ce": totals[0] / n}
    if use_teacher:
        if teacher_ce:
            out["teacher_ce"] = totals[1] / n
        if hint is not None:
            out["hint"] = totals[2] / n
    return out
