"""The local optimizers' state under top-k averaging: averaged over the chosen ranks (``average_state``), and
Adam's second moment taken for the all-rank batch (``second_moment=global_batch``).

``average_state`` (e.g. ``[exp_avg_sq]``): the named per-parameter state tensors (Adam's ``exp_avg`` /
``exp_avg_sq``) are averaged over the chosen ranks in each round, one more all-reduce of that many numbers
(counted in ``comm/bytes``). Off by default: the SPEC's method keeps optimizer state local.

``second_moment=global_batch``: DDP's Adam divides by the running mean of ``g^2`` for the gradient ``g`` of the
whole batch of all N ranks; a rank's local Adam divides by that of its own 1/N of the batch, whose noise term is
N times larger: ``E[g_r^2] = mu^2 + N s^2`` against ``mu^2 + s^2``. On parameters whose gradient is mostly noise
(rare items' embedding rows) local steps are then up to sqrt(N) times shorter. Here each local Adam step divides
by an estimate of the whole batch's second moment instead, ``v' = (v + (N - 1) m_hat^2) / N`` in bias-corrected
terms (the first moment ``m_hat`` estimates ``mu``), with no communication; the optimizer's own state is unchanged.
"""

from __future__ import annotations

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError
from lightning_rec.methods.topk.metering import _CommMeter
from lightning_rec.methods.topk.selection import chosen_mean, unflatten_into

SECOND_MOMENTS = ("local", "global_batch")


class StateAveraging:
    """Averages the ``names`` state tensors of the optimizers over the chosen ranks (in place)."""

    def __init__(self, names: list[str] | None) -> None:
        if names is not None and (isinstance(names, str) or not all(isinstance(x, str) for x in names)):
            raise ConfigError(f"trainer.strategy.average_state={names!r}: expected a list of optimizer state "
                              "names, e.g. [exp_avg_sq] or [exp_avg,exp_avg_sq] for Adam")
        self.names = list(names) if names else []
        self._names_seen = False  # the names were found in the optimizer once
        self._note_said = False

    def __call__(self, optimizers, chosen: list[int], rank: int, world: int, device, meter: _CommMeter) -> None:
        tensors: list[torch.Tensor] = []
        present: set[str] = set()
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:  # the same order on every rank
                    state = opt.state.get(p) or {}
                    present.update(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape)
                    tensors += [state[k] for k in self.names
                                if isinstance(state.get(k), torch.Tensor) and state[k].shape == p.shape]
        missing = sorted(set(self.names) - present)
        if present and missing:  # the optimizer has state, not by these names
            if not self._names_seen:
                raise ConfigError(f"trainer.strategy.average_state={self.names}: no optimizer state {missing}; "
                                  f"this optimizer keeps {sorted(present)}")
            if not self._note_said:  # the names were there before: the optimizer changed (a switch to SGD)
                rank_zero_info(f"top-k averaging: the optimizer now keeps {sorted(present)}, not {missing}; "
                               f"average_state averages only what is there")
                self._note_said = True
        elif present:
            self._names_seen = True
        if world == 1:
            return  # the mean of one rank is its own state
        # Every rank takes part, state or not, so a rank without any never leaves the others waiting.
        n = torch.tensor([sum(t.numel() for t in tensors)], dtype=torch.int64, device=device)
        sizes = meter.all_gather(n, world)  # a layout that differs between ranks would corrupt the all-reduce
        if len({int(x) for x in sizes}) != 1:
            raise RuntimeError(f"top-k averaging: ranks hold different optimizer state sizes {[int(x) for x in sizes]}")
        if not tensors:
            return  # no step taken yet, on any rank
        unflatten_into(chosen_mean(tensors, chosen, rank, world, meter), tensors)


class GlobalBatchSecondMoment:
    """``second_moment=global_batch`` around each local step: :meth:`before` the step, :meth:`after` it."""

    def __init__(self) -> None:
        self._adam_seen = False  # Adam state found once

    def before(self, optimizer, world: int) -> list | None:
        saved = global_batch_second_moment(getattr(optimizer, "_optimizer", optimizer), world)
        if saved is None:  # state, but not Adam's
            if not self._adam_seen:
                raise ConfigError("trainer.strategy.second_moment=global_batch: needs an Adam-type optimizer (state "
                                  "exp_avg and exp_avg_sq, no amsgrad); use optimizer=adam or adamw, or "
                                  "second_moment=local")
            return None  # a switch to SGD (callbacks=swats): nothing to correct from here on
        if saved:
            self._adam_seen = True
        return saved

    @staticmethod
    def after(saved: list | None) -> None:
        if saved:
            restore_second_moment(saved)


def global_batch_second_moment(optimizer: torch.optim.Optimizer, world: int) -> list | None:
    """Before a local Adam step: replace each ``exp_avg_sq`` ``v`` by the estimate for a batch ``world``
    times larger, ``(v + (world - 1) * bc2 * (m / bc1)^2) / world`` (``bc`` the bias corrections).

    Returns what :func:`restore_second_moment` needs to put the optimizer's own running ``v`` back after
    the step (``[]`` before the first step; None when the optimizer has state but not Adam's).
    """
    todo = []  # (state, v, m, step, betas) of every parameter with state; checked before anything changes
    for group in optimizer.param_groups:
        if group.get("swats_phase") == "sgd":
            continue  # a group switched to SGD (callbacks=swats): no second moment; the others may still be Adam
        for p in group["params"]:
            state = optimizer.state.get(p) or {}
            if not state:
                continue
            m, v, t, betas = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step"), group.get("betas")
            if (betas is None or group.get("amsgrad") or not isinstance(m, torch.Tensor)
                    or not isinstance(v, torch.Tensor) or v.shape != p.shape or t is None):
                return None
            todo.append((state, v, m, float(t), betas))
    saved: list[tuple[dict, torch.Tensor, float, float]] = []
    with torch.no_grad():
        for state, v, m, t, (b1, b2) in todo:
            if t < 1:
                continue
            bc1, bc2 = 1.0 - float(b1) ** t, 1.0 - float(b2) ** t
            # v - corrected = (world - 1) / world * (v - bc2 * (m / bc1)^2): one new tensor per parameter
            diff = torch.addcmul(v, m, m, value=-bc2 / bc1 ** 2).mul_((world - 1) / world)
            v.sub_(diff)
            saved.append((state, diff, float(b2), t))
    return saved


def restore_second_moment(saved: list[tuple[dict, torch.Tensor, float, float]]) -> None:
    """After the step: Adam updated ``v' = b2 * corrected + (1 - b2) g^2``; its own would be ``v' + b2 * diff``.
    A parameter the step skipped (no gradient this step, or a skipped step: its ``step`` count did not
    move) gets its ``v`` back unchanged."""
    with torch.no_grad():
        for state, diff, b2, t in saved:  # Adam updates exp_avg_sq in place: the same tensor as before the step
            state["exp_avg_sq"].add_(diff, alpha=b2 if float(state["step"]) != t else 1.0)
