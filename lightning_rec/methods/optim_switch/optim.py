"""Optimizers: AdaShift (Zhou et al., ICLR 2019) and the SWATS step-size estimate (Keskar & Socher, 2017).

AdaShift decorrelates the second moment from the current gradient: the first moment is the
beta1-weighted mean of the latest ``n`` gradients and the second moment an EMA of
``phi(g_{t-n}^2)``, the squared gradient that has just left that window. No update is made during
the first ``n`` steps (the window fills). ``phi`` is ``max`` (one value per tensor, the paper's
recommended spatial reduction), ``row_max`` (one value per row of a matrix, i.e. per item of an
embedding or output table; 1-D tensors as ``max``) or ``none`` (element-wise). ``second_moment="max_last_q"`` is the
paper's other wording: the EMA takes the element-wise largest of the last ``q`` shifted squared
gradients. ``second_moment="chen2021"`` is equation (11) of the federated-distillation paper (Chen, Zhang and Ma,
2021) taken literally, with its first moment (13):

    phi_z = max{R^2_{z-q}, ..., R^2_z}                       # element-wise, the current gradient included
    V_z   = beta2 V_{z-q} + (1 - beta2) phi_z               # the paper's mu1; V from q steps before
    M_z   = sum_{i<=q} beta1^i R_{z-i} / sum_{i<=q} beta1^i  # the paper's mu2; the same q + 1 gradients
    theta -= lr * M_z / (sqrt(V_z / (1 - beta2^k)) + eps)    # k: updates along V's chain z, z-q, z-2q, ...

It waits for ``q + 1`` gradients; ``reduction`` and ``bias_correction`` apply as to the other forms.

The update, for a parameter with ``k`` second-moment updates so far::

    m_t     = sum_{i<n} beta1^i g_{t-i} / sum_{i<n} beta1^i
    v_t     = beta2 v_{t-1} + (1 - beta2) phi(g_{t-n}^2)
    theta  -= lr * m_t / (sqrt(v_t / (1 - beta2^k)) + eps)       # bias correction as in Adam

The bias correction of ``v`` (on by default, ``bias_correction=False`` for the paper's raw form)
is our addition: with ``v_0 = 0`` and ``beta2 = 0.999`` the uncorrected first steps are ~30x
larger than intended. As Adam's, it counts updates per tensor: with ``reduction=row_max`` or
``none`` an entry (an item row) first seen late still takes a larger first step, up to about
``lr / sqrt(1 - beta2)``. Counting per entry instead was measured on ML-1M (docs/log/optim_switch.md,
2026-11-24 11:59) and did no better (test NDCG@10 0.1232 against 0.1251), so it is not done.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from lightning_rec.errors import ConfigError


class AdaShift(Optimizer):
    """AdaShift.

    Args:
        params: parameters or parameter groups.
        lr: step size (default 1e-2, the paper's setting for most experiments).
        betas: (beta1, beta2); beta1 weights the window, beta2 is the EMA rate of the second moment.
        n: window length (latest gradients in the first moment; shift of the second moment).
        reduction: ``max`` (phi = max over the tensor), ``row_max`` (max over each row: the paper's
            blocks taken as rows, so an item table gets one scale per item rather than one for all
            items, set by the most popular) or ``none`` (element-wise).
        second_moment: ``shifted`` (phi(g_{t-n}^2)), ``max_last_q`` (largest of the last ``q``) or ``chen2021``
            (the federated-distillation paper's equation (11), literally; ``n`` is not used, ``q`` is its window).
        q: see ``second_moment``.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        bias_correction: divide ``v`` by ``1 - beta2^k``.

    A parameter makes no update until one of its shifted gradients is non-zero (``k`` counts from
    there): behind a zero-initialised residual weight a block's first gradients are exactly 0, and
    dividing the newer gradients by ``sqrt(0) + eps`` would blow the weights up. With
    ``reduction=none`` or ``row_max`` an entry (row) whose ``v`` is still 0 does not move.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        n: int = 10,
        reduction: str = "max",
        second_moment: str = "shifted",
        q: int = 10,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
    ):
        if lr <= 0:
            raise ConfigError(f"optimizer.lr={lr}: expected a positive number")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"optimizer.betas={list(betas)}: expected two numbers in [0, 1)")
        if int(n) < 1 or int(q) < 1:
            raise ConfigError(f"optimizer.n={n}, optimizer.q={q}: expected positive integers")
        if reduction not in ("max", "row_max", "none"):
            raise ConfigError(f"optimizer.reduction={reduction}: expected max, row_max or none")
        if second_moment not in ("shifted", "max_last_q", "chen2021"):
            raise ConfigError(f"optimizer.second_moment={second_moment}: expected shifted, max_last_q or chen2021")
        defaults = dict(lr=lr, betas=tuple(betas), n=int(n), reduction=reduction, second_moment=second_moment,
                        q=int(q), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            n = group["n"]
            weights = [beta1**i for i in range(n)]  # weights[i] multiplies g_{t-i}
            norm = sum(weights)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if group["second_moment"] == "chen2021":
                    self._chen2021_step(p, g, state, group)
                    continue
                if not state:
                    state["window"] = []  # oldest first; at most n + 1 gradients while shifting
                    state["v"] = torch.zeros_like(p)
                    state["k"] = 0
                    if group["second_moment"] == "max_last_q":
                        state["shifted"] = []
                window = state["window"]
                window.append(g.detach().clone())
                if len(window) <= n:
                    continue  # the first n steps only fill the window
                old = window.pop(0)  # g_{t-n}
                sq = old * old
                # phi: one value per tensor or per row, kept small; v (full size) takes it by broadcasting
                if group["reduction"] == "max" or (group["reduction"] == "row_max" and p.dim() < 2):
                    sq = sq.amax()
                elif group["reduction"] == "row_max":
                    sq = sq.flatten(1).amax(1).view(-1, *([1] * (p.dim() - 1)))
                if group["second_moment"] == "max_last_q":
                    shifted = state["shifted"]
                    shifted.append(sq)
                    if len(shifted) > group["q"]:
                        shifted.pop(0)
                    sq = functools.reduce(torch.maximum, shifted)  # broadcasts: shapes as phi left them
                if state["k"] == 0 and not bool(sq.any()):
                    # No scale yet: every shifted gradient so far was exactly zero. It happens behind a
                    # zero-initialised residual weight (the block's gradients are 0 until alpha moves).
                    # Stepping now would divide the newer, non-zero gradients by eps; wait instead, as
                    # in the first n steps.
                    continue
                state["k"] += 1
                v = state["v"].mul_(beta2).add_(sq, alpha=1 - beta2)
                m = torch.zeros_like(p)
                for i, gi in enumerate(reversed(window)):  # gi = g_{t-i}
                    m.add_(gi, alpha=weights[i] / norm)
                vhat = v / (1 - beta2 ** state["k"]) if group["bias_correction"] else v
                step = m.div_(vhat.sqrt().add_(group["eps"]))
                step.masked_fill_(vhat == 0, 0.0)  # entries (rows) never seen non-zero: no scale, no step
                p.add_(step, alpha=-group["lr"])
        return loss

    @staticmethod
    def _reduce(sq: torch.Tensor, p: torch.Tensor, reduction: str) -> torch.Tensor:
        """phi's spatial reduction: one value per tensor (max), per row (row_max) or none."""
        if reduction == "max" or (reduction == "row_max" and p.dim() < 2):
            return sq.amax()
        if reduction == "row_max":
            return sq.flatten(1).amax(1).view(-1, *([1] * (p.dim() - 1)))
        return sq

    def _chen2021_step(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        """Equations (11) and (13) of the federated-distillation paper, literally (see the module's docstring)."""
        beta1, beta2 = group["betas"]
        q = group["q"]
        if not state:
            state["window"] = []  # R_{z-q} .. R_z, oldest first
            state["v_chain"] = []  # (V, k) of the last q steps, oldest first: V_{z-q} is the first when full
        window = state["window"]
        window.append(g.detach().clone())
        if len(window) > q + 1:
            window.pop(0)
        if len(window) <= q:
            return  # q + 1 gradients are needed
        phi = self._reduce(functools.reduce(torch.maximum, [r * r for r in window]), p, group["reduction"])
        chain = state["v_chain"]
        v_old, k_old = chain.pop(0) if len(chain) == q else (torch.zeros_like(p), 0)
        if k_old == 0 and not bool(phi.any()):
            chain.append((v_old, 0))  # no scale yet (every gradient in the window is 0): wait, keep the chain
            return
        v = v_old * beta2 + (1 - beta2) * phi
        k = k_old + 1
        chain.append((v, k))
        weights = [beta1**i for i in range(q + 1)]
        m = torch.zeros_like(p)
        for i, r in enumerate(reversed(window)):  # r = R_{z-i}
            m.add_(r, alpha=weights[i] / sum(weights))
        vhat = v / (1 - beta2**k) if group["bias_correction"] else v
        step = m.div_(vhat.sqrt().add_(group["eps"]))
        step.masked_fill_(vhat == 0, 0.0)
        p.add_(step, alpha=-group["lr"])


def swats_gamma(step: torch.Tensor, grad: torch.Tensor) -> float | None:
    """SWATS's projected SGD step size ``(p . p) / (-p . g)`` for an update ``p`` and gradient ``g``.

    ``None`` when ``p . g`` is 0 (no information). For ``p = -eta * g`` it is exactly ``eta``.
    """
    pg = float(torch.dot(step.flatten().double(), grad.flatten().double()))
    if pg == 0.0:
        return None
    return float(torch.dot(step.flatten().double(), step.flatten().double())) / -pg


class SwatsEstimate:
    """Bias-corrected EMA ``Lambda`` of the projected step sizes ``gamma_k`` of one parameter group.

    ``update(gamma)`` returns True when the SWATS rule says switch: ``k > 1``, ``Lambda > 0`` and
    ``|Lambda - gamma_k| <= rtol * |Lambda|`` (relative, as in a public reference implementation;
    the paper's absolute ``eps`` is ``rtol * |Lambda|`` here).
    """

    def __init__(self, beta2: float = 0.999, rtol: float = 1e-6):
        self.beta2, self.rtol = beta2, rtol
        self.ema, self.k, self.gamma = 0.0, 0, None

    @property
    def value(self) -> float | None:
        return self.ema / (1 - self.beta2**self.k) if self.k else None

    def update(self, gamma: float | None) -> bool:
        if gamma is None:
            return False
        self.k += 1
        self.gamma = gamma
        self.ema = self.beta2 * self.ema + (1 - self.beta2) * gamma
        lam = self.value
        return self.k > 1 and lam > 0 and abs(lam - gamma) <= self.rtol * abs(lam)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "k": self.k, "gamma": self.gamma, "beta2": self.beta2, "rtol": self.rtol}

    def load_state_dict(self, s: dict) -> None:
        self.ema, self.k, self.gamma = s["ema"], s["k"], s["gamma"]


class PerGroupSwitch(Optimizer):
    """An adaptive optimizer whose parameter groups switch to SGD with momentum one by one (SWATS per group).

    It wraps ``adaptive`` (Adam, AdamW, AdaShift, ...) and shares its parameter groups and state. A group in the
    SGD phase (``group["swats_phase"] == "sgd"``, set by :meth:`switch_group`) is left out of the adaptive step
    and takes SWATS's SGD step instead, with its own rate ``group["swats_rate"]``::

        v = momentum v + (g + weight_decay w);   w -= (1 - momentum) rate v     # torch SGD at lr (1 - momentum) rate

    (Nesterov: ``w -= (1 - momentum) rate (g' + momentum v)``.) ``weight_decay`` is the group's own (0 in a
    no-weight-decay group). The other groups keep their adaptive state and steps. With ``follow_schedule`` the
    rate is scaled by ``lr / lr at the switch`` (the group's lr, which an LR scheduler moves), else it is constant.
    Phases, rates and momentum buffers are in :meth:`state_dict`, so a checkpoint restores each group's phase.
    """

    def __init__(self, adaptive: Optimizer, follow_schedule: bool = False):
        self.adaptive, self.follow_schedule = adaptive, bool(follow_schedule)
        super().__init__(adaptive.param_groups, adaptive.defaults)  # the same group dicts as the adaptive optimizer
        self.state = adaptive.state
        for g in self.param_groups:
            g.setdefault("swats_phase", "adaptive")
            g.setdefault("swats_rate", None)

    def switch_group(self, index: int, rate: float, momentum: float, nesterov: bool = False) -> None:
        """Group ``index`` leaves the adaptive phase: SGD with momentum at ``rate`` from the next step on.
        Its adaptive state (moments, windows) is dropped."""
        g = self.param_groups[index]
        if g["swats_phase"] == "sgd":
            return
        g.update(swats_phase="sgd", swats_rate=float(rate), swats_momentum=float(momentum),
                 swats_nesterov=bool(nesterov), swats_lr0=float(g["lr"]))
        for p in g["params"]:
            self.state.pop(p, None)

    def phases(self) -> list[str]:
        return [g["swats_phase"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        adaptive = [g for g in groups if g["swats_phase"] != "sgd"]
        if adaptive:
            own = self.adaptive.param_groups
            self.adaptive.param_groups = adaptive  # the adaptive step sees only the groups still adaptive
            try:
                self.adaptive.step()
            finally:
                self.adaptive.param_groups = own
        for g in groups:
            if g["swats_phase"] == "sgd":
                self._sgd_step(g)
        return loss

    def _sgd_step(self, g: dict) -> None:
        mu, rate = g["swats_momentum"], g["swats_rate"]
        if self.follow_schedule and g["swats_lr0"] > 0:
            rate = rate * g["lr"] / g["swats_lr0"]
        wd = float(g.get("weight_decay") or 0.0)
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad if not wd else p.grad.add(p, alpha=wd)
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()  # as torch's SGD: v_1 = g_1
            else:
                buf.mul_(mu).add_(d)
            if g["swats_nesterov"]:
                d = d.add(buf, alpha=mu)
            else:
                d = buf
            p.add_(d, alpha=-(1 - mu) * rate)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # the base class replaced the group dicts and the state: hand the new ones to the adaptive optimizer
        # (its own __setstate__ would expect adaptive state for every parameter, not SGD's momentum buffers)
        self.adaptive.state, self.adaptive.param_groups = self.state, self.param_groups

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        adaptive = getattr(self, "adaptive", None)
        if adaptive is not None and adaptive.param_groups is not self.param_groups:
            param_group.setdefault("swats_phase", "adaptive")
            param_group.setdefault("swats_rate", None)
            for k, v in adaptive.defaults.items():
                param_group.setdefault(k, v)
            adaptive.param_groups.append(param_group)


__all__ = ["AdaShift", "PerGroupSwitch", "SwatsEstimate", "swats_gamma"]
