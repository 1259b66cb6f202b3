"""Switch from an adaptive optimizer (Adam, AdamW, AdaShift) to SGD with momentum, per parameter group: SWATS or
scheduled."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError
from lightning_rec.methods.optim_switch.optim import PerGroupSwitch, SwatsEstimate, swats_gamma
from lightning_rec.modules.optim import build_optimizer, optimizer_target

MODES = ("auto", "scheduled")


class OptimizerSwitchCallback(pl.Callback):
    """Adaptive phase, then SGD with momentum, per parameter group, at steps that every DDP rank agrees on.

    During the adaptive phase the SWATS estimate runs for every parameter group: with the step
    ``p_k`` the optimizer actually took and the gradient ``g_k`` it took it from,
    ``gamma_k = (p.p) / (-p.g)`` and ``Lambda`` = bias-corrected EMA of ``gamma`` (rate ``beta2``).
    As in the reference implementation, each group switches on its own: its own criterion, at its own step, to SGD
    at its own rate, while the other groups go on with the adaptive optimizer and their moments
    (:class:`~lightning_rec.methods.optim_switch.optim.PerGroupSwitch`). Groups come from the module, e.g.
    ``optimizer.no_weight_decay=[...]`` makes a second, no-weight-decay group.

    Args:
        mode: ``auto`` (the SWATS rule: a group switches when its ``|Lambda - gamma_k| <= rtol * Lambda`` with
            ``Lambda > 0``, after ``min_steps``; every group at ``deadline_step`` / ``deadline_epoch`` at the
            latest) or ``scheduled`` (every group at ``at_step`` or at the start of ``at_epoch``).
        sgd_lr: the SGD rate; null uses each group's estimate ``Lambda``. As in SWATS, the SGD phase
            is ``v = momentum v + g; w -= (1 - momentum) rate v`` (torch's SGD with
            ``lr = (1 - momentum) rate``), so a long-run step equals an SGD step of ``rate``.
        momentum: SGD momentum; null uses the adaptive optimizer's beta1 (as SWATS does).
        nesterov: Nesterov momentum.
        beta2: EMA rate of the estimate; null uses the adaptive optimizer's beta2.
        rtol: relative tolerance of the convergence test (1e-6 in a public SWATS implementation).
        min_steps: no automatic switch before this many optimizer steps.
        keep_scheduler: a switched group's rate follows the configured LR scheduler from the switch on (scaled by
            its lr over its lr at the switch); default: constant. The scheduler goes on for the adaptive groups.
        lr_bounds: ``[low, high]`` safety bounds: an estimate outside them is clipped at the switch
            (and said). The projection ``gamma`` is noisy when steps and gradients are nearly
            orthogonal (sparse embedding gradients, AdaShift's decorrelated moments).

    Each group's phase, switch step and rate are saved in the checkpoint (the callback's state and the
    optimizer's groups, with the SGD momentum buffers and the adaptive moments of the groups not yet switched):
    a resumed run goes on exactly. Logged: ``optim/phase`` (the fraction of groups switched), ``optim/swats_lr``
    (group 0's estimate; ``optim/swats_lr_g<i>`` for group i > 0), ``optim/sgd_lr`` (group 0's rate) once switched.
    """

    def __init__(
        self,
        mode: str = "auto",
        at_step: int | None = None,
        at_epoch: int | None = None,
        sgd_lr: float | None = None,
        momentum: float | None = None,
        nesterov: bool = False,
        beta2: float | None = None,
        rtol: float = 1e-6,
        min_steps: int = 100,
        deadline_step: int | None = None,
        deadline_epoch: int | None = None,
        keep_scheduler: bool = False,
        lr_bounds: list[float] | tuple[float, float] | None = (1e-5, 10.0),
    ):
        if mode not in MODES:
            raise ConfigError(f"callbacks.optimizer_switch.mode={mode}: expected auto or scheduled")
        if mode == "scheduled" and at_step is None and at_epoch is None:
            raise ConfigError("callbacks.optimizer_switch: mode=scheduled needs at_step or at_epoch")
        if sgd_lr is not None and float(sgd_lr) <= 0:
            raise ConfigError(f"callbacks.optimizer_switch.sgd_lr={sgd_lr}: expected a positive number or null")
        self.mode, self.at_step, self.at_epoch = mode, at_step, at_epoch
        self.sgd_lr = None if sgd_lr is None else float(sgd_lr)
        self.momentum, self.nesterov, self.beta2, self.rtol = momentum, bool(nesterov), beta2, float(rtol)
        self.min_steps, self.deadline_step, self.deadline_epoch = int(min_steps), deadline_step, deadline_epoch
        self.keep_scheduler = bool(keep_scheduler)
        self.lr_bounds = None if lr_bounds is None else (float(lr_bounds[0]), float(lr_bounds[1]))
        if self.lr_bounds is not None and not 0 <= self.lr_bounds[0] < self.lr_bounds[1]:
            raise ConfigError(f"callbacks.optimizer_switch.lr_bounds={list(lr_bounds)}: expected [low, high], 0 <= low < high")
        # per parameter group (filled once the optimizer's groups are known)
        self.phases: list[str] = []                  # "adaptive" | "sgd"
        self.lrs: list[float | None] | None = None   # each group's SGD rate once switched
        self.switch_steps: list[int | None] = []
        self.momenta: list[float | None] = []
        self.switches = 0                            # switch events (groups switched at one step count once)
        self.estimates: list[SwatsEstimate] = []
        self._pending: set[int] = set()              # groups due with no positive estimate yet
        self._before: list[list[torch.Tensor] | None] | None = None
        self._converged: list[bool | None] | None = None  # the SWATS test of the last optimizer step, until batch end
        self._hook = self._hooked = self._pl_module = None  # the post-step hook on the optimizer being measured
        self._epochs_run = 0  # epochs this fit has started, for the end-of-run message

    # ------------------------------------------------------------------ per-group bookkeeping
    @property
    def phase(self) -> str:
        """``adaptive`` (no group switched), ``sgd`` (every group) or ``mixed``."""
        if not self.phases or all(p == "adaptive" for p in self.phases):
            return "adaptive"
        return "sgd" if all(p == "sgd" for p in self.phases) else "mixed"

    @property
    def switch_step(self) -> int | None:
        """The first group's switch step."""
        steps = [s for s in self.switch_steps if s is not None]
        return min(steps) if steps else None

    def _groups(self, n: int) -> None:
        if len(self.phases) != n:
            grow = n - len(self.phases)
            if grow < 0:
                raise ConfigError(f"callbacks.optimizer_switch: the optimizer has {n} parameter groups, the switch "
                                  f"state {len(self.phases)}")
            self.phases += ["adaptive"] * grow
            self.lrs = list(self.lrs or []) + [None] * (n - len(self.lrs or []))
            self.switch_steps += [None] * grow
            self.momenta += [None] * grow

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = optimizer_target(dict(pl_module.hparams.get("optimizer") or {}))
        if target == "torch.optim.SGD" and stage == "fit":  # kept possible: SWATS then recovers SGD's own rate
            rank_zero_info("callbacks.optimizer_switch with optimizer=sgd: the first phase is already SGD, so the switch "
                           "only re-estimates its rate; for SWATS use optimizer=adam, adamw or adashift")
        if not hasattr(pl_module, "set_optimizer_factory"):
            raise ConfigError(f"callbacks.optimizer_switch: {type(pl_module).__name__} has no set_optimizer_factory "
                              f"(the hook that lets this callback build the optimizer)")
        pl_module.set_optimizer_factory(self.build_optimizer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.teardown_hook()
        if hasattr(pl_module, "set_optimizer_factory"):
            pl_module.set_optimizer_factory(None)

    def build_optimizer(self, params, adaptive: dict[str, Any]):
        """The module's optimizer factory: the configured adaptive optimizer inside a
        :class:`PerGroupSwitch`, with the groups already switched (a resume, a rebuild after a stack) in the SGD
        phase, fresh momentum. The scheduler is kept (it drives the adaptive groups)."""
        opt = PerGroupSwitch(build_optimizer(adaptive, params), follow_schedule=self.keep_scheduler)
        if self.phases:
            self._groups(len(opt.param_groups))
        for i, ph in enumerate(self.phases):
            if ph == "sgd":
                opt.switch_group(i, self.lrs[i], self._momentum(opt.param_groups[i], i), self.nesterov)
        return opt, True

    def _momentum(self, group: dict, i: int) -> float:
        if i < len(self.momenta) and self.momenta[i] is not None:
            return float(self.momenta[i])
        if self.momentum is not None:
            return float(self.momentum)
        return float(group.get("betas", (0.9, 0.999))[0])

    def _beta2(self, pl_module) -> float:
        if self.beta2 is not None:
            return float(self.beta2)
        return float(dict(pl_module.hparams.optimizer).get("betas", (0.9, 0.999))[1])

    @staticmethod
    def _optimizer(trainer) -> PerGroupSwitch:
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt)  # Lightning's LightningOptimizer wraps torch's
        if not isinstance(opt, PerGroupSwitch):
            raise ConfigError(f"callbacks.optimizer_switch: the module's optimizer is {type(opt).__name__}, not the "
                              f"one this callback builds (its configure_optimizers must call the optimizer factory)")
        return opt

    # ------------------------------------------------------------------ estimate
    # The step is measured inside the optimizer's own step (a torch post-step hook): a strategy that moves the
    # weights after the optimizer (top-k averaging's exchange) must not enter gamma, and gradient accumulation
    # steps that make no update give no estimate.
    def _estimating(self) -> bool:
        return not (self.mode == "scheduled" and self.sgd_lr is not None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "sgd" or not self._estimating():
            return  # nothing to estimate: skip copying every parameter and gradient each step
        # Only the weights of the groups still adaptive: Lightning clips gradients after this hook, so the
        # gradient the step was taken from is read in the post-step hook (the optimizer leaves it in .grad).
        self._before = [None if g.get("swats_phase") == "sgd" else [p.detach().clone() for p in g["params"]]
                        for g in optimizer.param_groups]
        self._pl_module = pl_module
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._hooked is not inner:
            if self._hook is not None:
                self._hook.remove()
            self._hook = inner.register_step_post_hook(self._after_step)
            self._hooked = inner

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._before is None or self.phase == "sgd":
            return
        self._converged = self._measure(optimizer, self._pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "sgd":
            return
        n = len(self._optimizer(trainer).param_groups)
        self._groups(n)
        if self._estimating():
            converged = self._converged
            if converged is None:
                return  # no optimizer step since the snapshot (gradient accumulation)
            self._log_estimate(pl_module)
        else:
            converged = [False] * n
        self._converged = None
        step = trainer.global_step
        due, why = [], {}
        for i in range(n):
            if self.phases[i] == "sgd":
                due.append(False)
                continue
            if self.mode == "auto":
                criterion = bool(converged[i]) and step >= self.min_steps
                deadline = self.deadline_step is not None and step >= int(self.deadline_step)
                why[i] = "SWATS criterion met" if criterion else f"deadline step {self.deadline_step}"
            else:
                criterion, deadline = False, self.at_step is not None and step >= int(self.at_step)
                why[i] = f"scheduled at step {self.at_step}"
            due.append(bool(criterion or deadline or i in self._pending))
        due = trainer.strategy.broadcast(due, src=0)  # every rank switches the same groups at the same step
        groups = [i for i, d in enumerate(due) if d]
        if groups:
            self._switch(trainer, pl_module, "; ".join(sorted({why.get(i, "due") for i in groups})), groups)

    def _measure(self, opt, pl_module) -> list[bool | None]:
        """Feed the step just taken to each adaptive group's SWATS estimate; per group, whether it has settled
        (None for a group in the SGD phase)."""
        if len(self.estimates) != len(opt.param_groups):
            self.estimates += [SwatsEstimate(self._beta2(pl_module), self.rtol)
                               for _ in range(len(opt.param_groups) - len(self.estimates))]
        converged: list[bool | None] = []
        for est, g, before in zip(self.estimates, opt.param_groups, self._before):
            if before is None or g.get("swats_phase") == "sgd":
                converged.append(None)
                continue
            if len(before) != len(g["params"]):  # the model changed shape (a stack) since the snapshot
                converged.append(False)
                continue
            step = torch.cat([(p.detach() - b).flatten() for p, b in zip(g["params"], before)])
            grad = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in g["params"]])
            converged.append(est.update(swats_gamma(step, grad)))
        self._before = None
        return converged

    def _log_estimate(self, pl_module) -> None:
        for i, est in enumerate(self.estimates):
            if est.value is not None and (i >= len(self.phases) or self.phases[i] != "sgd"):
                pl_module.log("optim/swats_lr" + (f"_g{i}" if i else ""), float(est.value), on_step=True,
                              on_epoch=False, batch_size=1)
        frac = sum(p == "sgd" for p in self.phases) / max(len(self.phases), 1)
        pl_module.log("optim/phase", float(frac), on_step=True, on_epoch=False, batch_size=1)

    def teardown_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._hooked = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epochs_run = trainer.current_epoch + 1
        if self.phase == "sgd":
            return
        epoch = trainer.current_epoch
        if self.mode == "scheduled" and self.at_epoch is not None and epoch >= int(self.at_epoch):
            self._switch(trainer, pl_module, f"scheduled at epoch {self.at_epoch}")
        elif self.mode == "auto" and self.deadline_epoch is not None and epoch >= int(self.deadline_epoch):
            self._switch(trainer, pl_module, f"deadline epoch {self.deadline_epoch}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase == "sgd":
            return
        left = [i for i, p in enumerate(self.phases) if p != "sgd"] or [0]
        lams = [self.estimates[i].value if i < len(self.estimates) else None for i in left]
        est = ", ".join("none yet" if v is None else f"{v:.4g}" for v in lams)
        groups = "" if self.phase == "adaptive" else f"parameter group(s) {left} of {len(self.phases)}: "
        if self.mode == "auto":
            rank_zero_info(f"optimizer switch (auto): {groups}no switch in {trainer.global_step} steps; the adaptive "
                           f"phase ran to the end (SWATS estimate {est}; the rule needs it to settle within "
                           f"rtol={self.rtol:g} after min_steps={self.min_steps})"
                           + ("; its deadline passed with no positive estimate yet, and the switch was waiting "
                              "for one (or set callbacks.optimizer_switch.sgd_lr)" if self._pending else
                              "; its deadline was not reached" if self.deadline_epoch is not None
                              or self.deadline_step is not None else
                              ". Set callbacks.optimizer_switch.deadline_epoch or deadline_step to switch by a "
                              "given point"))
        else:
            when = f"step {self.at_step}" if self.at_step is not None else f"epoch {self.at_epoch}"
            rank_zero_info(f"optimizer switch (scheduled at {when}): {groups}not reached in {trainer.global_step} "
                           f"steps ({self._epochs_run} epochs); the adaptive phase ran to the end")

    # ------------------------------------------------------------------ switch
    def _switch(self, trainer, pl_module, why: str, groups: list[int] | None = None) -> None:
        """Switch ``groups`` (default: every group still adaptive) to SGD, each at its own rate."""
        opt = self._optimizer(trainer)
        self._groups(len(opt.param_groups))
        groups = [i for i in (range(len(self.phases)) if groups is None else groups) if self.phases[i] != "sgd"]
        rates: list[float | None] = []
        for i in groups:
            if self.sgd_lr is not None:
                rates.append(self.sgd_lr)
                continue
            lam = self.estimates[i].value if i < len(self.estimates) else None
            if lam is None or not lam > 0:
                rates.append(None)  # e.g. AdaShift's first n steps make no update, so no estimate yet
                continue
            if self.lr_bounds is not None:
                lo, hi = self.lr_bounds
                clipped = min(max(lam, lo), hi)
                if clipped != lam:
                    rank_zero_info(f"SWATS estimate {lam:.4g} of parameter group {i} is outside lr_bounds "
                                   f"[{lo:g}, {hi:g}]; using {clipped:.4g}")
                lam = clipped
            rates.append(lam)
        # Rank 0 decides for every rank, switch now or wait: under top-k averaging each rank's estimate is
        # its own, and a rank that stayed behind would miss this collective and hang the others.
        rates = trainer.strategy.broadcast(rates, src=0)
        step = int(trainer.global_step)
        switched = []
        for i, rate in zip(groups, rates):
            if rate is None:
                if i not in self._pending:
                    rank_zero_info(f"optimizer switch due ({why}) at step {step} for parameter group {i}, but it has "
                                   f"no positive SWATS estimate yet; switching it at the first step that has one "
                                   f"(or set callbacks.optimizer_switch.sgd_lr)")
                self._pending.add(i)
                continue
            mu = self._momentum(opt.param_groups[i], i)
            opt.switch_group(i, float(rate), mu, self.nesterov)
            self.phases[i], self.lrs[i], self.switch_steps[i], self.momenta[i] = "sgd", float(rate), step, mu
            self._pending.discard(i)
            switched.append(i)
        if not switched:
            return
        self.switches += 1
        n = len(self.phases)
        which = "every parameter group" if len(switched) == n and n > 1 else \
            ("" if n == 1 else f"parameter group(s) {switched} of {n}")
        rank_zero_info(f"optimizer switch at step {step} (epoch {trainer.current_epoch}, {why}): "
                       f"{which + ' to ' if which else ''}SGD with momentum "
                       f"{', '.join(f'{self.momenta[i]:g}' for i in switched)}, rate "
                       f"{', '.join(f'{self.lrs[i]:.4g}' for i in switched)} (torch lr = (1 - momentum) x rate)"
                       + ("" if self.phase == "sgd" else "; the other groups stay adaptive"))
        metrics = {"optim/switch_step": float(step)}
        if self.lrs[0] is not None:
            metrics["optim/sgd_lr"] = float(self.lrs[0])
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "phases": list(self.phases), "switch_step": self.switch_step,
                "switch_steps": list(self.switch_steps), "lrs": None if self.lrs is None else list(self.lrs),
                "momenta": list(self.momenta), "switches": self.switches, "pending": sorted(self._pending),
                "estimates": [e.state_dict() for e in self.estimates]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lrs = state.get("lrs")
        if "phases" in state:
            self.phases, self.switch_steps = list(state["phases"]), list(state["switch_steps"])
            self.momenta = list(state.get("momenta") or [None] * len(self.phases))
        else:  # written before per-group switching: every group in one phase
            n = len(lrs or state.get("estimates") or [0])
            self.phases = [state["phase"]] * n
            self.switch_steps = [state["switch_step"]] * n
            self.momenta = [None] * n
        self.lrs = None if lrs is None else list(lrs)
        self.switches = int(state.get("switches", 0))
        pending = state.get("pending", [])
        self._pending = set(range(len(self.phases) or 1)) if pending is True else set(pending or [])
        self.estimates = []
        for s in state.get("estimates", []):
            e = SwatsEstimate(s["beta2"], s["rtol"])
            e.load_state_dict(s)
            self.estimates.append(e)
