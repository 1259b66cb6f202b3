"""Switch from an adaptive optimizer (Adam, AdamW, AdaShift) to SGD with momentum: SWATS or scheduled."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError
from lightning_rec.methods.optim_switch.optim import SwatsEstimate, swats_gamma
from lightning_rec.modules.optim import optimizer_target

MODES = ("auto", "scheduled")


class OptimizerSwitchCallback(pl.Callback):
    """Adaptive phase, then SGD with momentum, at one step that every DDP rank agrees on.

    During the adaptive phase the SWATS estimate runs for every parameter group: with the step
    ``p_k`` the optimizer actually took and the gradient ``g_k`` it took it from,
    ``gamma_k = (p.p) / (-p.g)`` and ``Lambda`` = bias-corrected EMA of ``gamma`` (rate ``beta2``).

    Args:
        mode: ``auto`` (the SWATS rule: every group's ``|Lambda - gamma_k| <= rtol * Lambda`` with
            ``Lambda > 0``, after ``min_steps``; at ``deadline_step`` / ``deadline_epoch`` at the
            latest) or ``scheduled`` (at ``at_step`` or at the start of ``at_epoch``).
        sgd_lr: the SGD rate; null uses each group's estimate ``Lambda``. As in SWATS, the SGD phase
            is ``v = momentum v + g; w -= (1 - momentum) rate v`` (torch's SGD with
            ``lr = (1 - momentum) rate``), so a long-run step equals an SGD step of ``rate``.
        momentum: SGD momentum; null uses the adaptive optimizer's beta1 (as SWATS does).
        nesterov: Nesterov momentum.
        beta2: EMA rate of the estimate; null uses the adaptive optimizer's beta2.
        rtol: relative tolerance of the convergence test (1e-6 in a public SWATS implementation).
        min_steps: no automatic switch before this many optimizer steps.
        keep_scheduler: keep the configured LR scheduler in the SGD phase (default: constant rate).
        lr_bounds: ``[low, high]`` safety bounds: an estimate outside them is clipped at the switch
            (and said). The projection ``gamma`` is noisy when steps and gradients are nearly
            orthogonal (sparse embedding gradients, AdaShift's decorrelated moments).

    The phase, switch step and learning rates are saved in the checkpoint: a run resumed after the
    switch rebuilds SGD (its momentum restored), one resumed before it continues the adaptive
    phase with its estimate. Logged: ``optim/phase`` (0 adaptive, 1 SGD), ``optim/swats_lr``
    (group 0's estimate), ``optim/sgd_lr`` once switched.
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
        self.phase = "adaptive"
        self.switch_step: int | None = None
        self.switches = 0
        self.lrs: list[float] | None = None
        self.estimates: list[SwatsEstimate] = []
        self._before: list[list[torch.Tensor]] | None = None
        self._pending = False
        self._converged: list[bool] | None = None  # the SWATS test of the last optimizer step, until batch end
        self._hook = self._hooked = self._pl_module = None  # the post-step hook on the optimizer being measured
        self._epochs_run = 0  # epochs this fit has started, for the end-of-run message

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = optimizer_target(dict(pl_module.hparams.get("optimizer") or {}))
        if target == "torch.optim.SGD" and stage == "fit":  # kept possible: SWATS then recovers SGD's own rate
            rank_zero_info("callbacks.optimizer_switch with optimizer=sgd: the first phase is already SGD, so the switch "
                           "only re-estimates its rate; for SWATS use optimizer=adam, adamw or adashift")
        if not hasattr(pl_module, "set_optimizer_factory"):
            raise ConfigError(f"callbacks.optimizer_switch: {type(pl_module).__name__} has no set_optimizer_factory "
                              f"(the hook that lets this callback build the SGD phase)")
        pl_module.set_optimizer_factory(self.build_optimizer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.teardown_hook()
        if hasattr(pl_module, "set_optimizer_factory"):
            pl_module.set_optimizer_factory(None)

    def build_optimizer(self, params, adaptive: dict[str, Any]):
        """The module's optimizer factory: SWATS's SGD phase after the switch (also on a resume after it),
        else None (the configured adaptive optimizer).

        SGD phase: v = mu v + g, w -= (1 - mu) * rate * v, i.e. torch's lr = (1 - mu) * rate.
        """
        if self.phase != "sgd":
            return None
        sw = self.sgd_settings(adaptive)
        opt = torch.optim.SGD(params, lr=(1 - sw["momentum"]) * sw["lrs"][0],
                              weight_decay=float(adaptive.get("weight_decay", 0.0)),
                              momentum=sw["momentum"], nesterov=sw["nesterov"])
        return opt, sw["keep_scheduler"]

    def sgd_settings(self, adaptive: dict[str, Any]) -> dict[str, Any]:
        """What configure_optimizers needs to build the SGD phase."""
        betas = adaptive.get("betas", (0.9, 0.999))
        return {"lrs": list(self.lrs or []), "momentum": float(self.momentum if self.momentum is not None else betas[0]),
                "nesterov": self.nesterov, "keep_scheduler": self.keep_scheduler}

    def _beta2(self, pl_module) -> float:
        if self.beta2 is not None:
            return float(self.beta2)
        return float(dict(pl_module.hparams.optimizer).get("betas", (0.9, 0.999))[1])

    # ------------------------------------------------------------------ estimate
    # The step is measured inside the optimizer's own step (a torch post-step hook): a strategy that moves the
    # weights after the optimizer (top-k averaging's exchange) must not enter gamma, and gradient accumulation
    # steps that make no update give no estimate.
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase != "adaptive" or (self.mode == "scheduled" and self.sgd_lr is not None):
            return  # nothing to estimate: skip copying every parameter and gradient each step
        # Only the weights: Lightning clips gradients after this hook, so the gradient the step was taken
        # from is read in the post-step hook (the optimizer leaves it in .grad until the next zero_grad).
        self._before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        self._pl_module = pl_module
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps torch's
        if self._hooked is not inner:
            if self._hook is not None:
                self._hook.remove()
            self._hook = inner.register_step_post_hook(self._after_step)
            self._hooked = inner

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._before is None or self.phase != "adaptive":
            return
        self._converged = self._measure(optimizer, self._pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase != "adaptive":
            return
        estimating = not (self.mode == "scheduled" and self.sgd_lr is not None)
        converged = self._converged if estimating else []
        self._converged = None
        if converged is None:
            return  # no optimizer step since the snapshot (gradient accumulation)
        if estimating:
            self._log_estimate(pl_module)
        step = trainer.global_step
        if self.mode == "auto":
            criterion = all(converged) and step >= self.min_steps
            due = criterion or (self.deadline_step is not None and step >= int(self.deadline_step))
            why = "SWATS criterion met" if criterion else f"deadline step {self.deadline_step}"
        else:
            due = self.at_step is not None and step >= int(self.at_step)
            why = f"scheduled at step {self.at_step}"
        if trainer.strategy.broadcast(bool(due or self._pending), src=0):  # every rank switches at the same step
            self._switch(trainer, pl_module, why)

    def _measure(self, opt, pl_module) -> list[bool]:
        """Feed the step just taken to the SWATS estimates; per group, whether it has settled."""
        if len(self.estimates) != len(opt.param_groups):
            self.estimates = [SwatsEstimate(self._beta2(pl_module), self.rtol) for _ in opt.param_groups]
        converged = []
        for est, g, before in zip(self.estimates, opt.param_groups, self._before):
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
        lam = self.estimates[0].value if self.estimates else None
        if lam is not None:
            pl_module.log("optim/swats_lr", float(lam), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("optim/phase", 0.0, on_step=True, on_epoch=False, batch_size=1)

    def teardown_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._hooked = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epochs_run = trainer.current_epoch + 1
        if self.phase != "adaptive":
            return
        epoch = trainer.current_epoch
        if self.mode == "scheduled" and self.at_epoch is not None and epoch >= int(self.at_epoch):
            self._switch(trainer, pl_module, f"scheduled at epoch {self.at_epoch}")
        elif self.mode == "auto" and self.deadline_epoch is not None and epoch >= int(self.deadline_epoch):
            self._switch(trainer, pl_module, f"deadline epoch {self.deadline_epoch}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase != "adaptive":
            return
        lam = self.estimates[0].value if self.estimates else None
        est = "none yet" if lam is None else f"{lam:.4g}"
        if self.mode == "auto":
            rank_zero_info(f"optimizer switch (auto): no switch in {trainer.global_step} steps; the adaptive phase ran "
                           f"to the end (SWATS estimate {est}; the rule needs it to settle within rtol={self.rtol:g} "
                           f"after min_steps={self.min_steps})"
                           + ("; its deadline passed with no positive estimate yet, and the switch was waiting "
                              "for one (or set callbacks.optimizer_switch.sgd_lr)" if self._pending else
                              "; its deadline was not reached" if self.deadline_epoch is not None
                              or self.deadline_step is not None else
                              ". Set callbacks.optimizer_switch.deadline_epoch or deadline_step to switch by a "
                              "given point"))
        else:
            when = f"step {self.at_step}" if self.at_step is not None else f"epoch {self.at_epoch}"
            rank_zero_info(f"optimizer switch (scheduled at {when}): not reached in {trainer.global_step} steps "
                           f"({self._epochs_run} epochs); the adaptive phase ran "
                           f"to the end")

    # ------------------------------------------------------------------ switch
    def _switch(self, trainer, pl_module, why: str) -> None:
        n_groups = len(trainer.optimizers[0].param_groups)
        if self.sgd_lr is not None:
            lrs = [self.sgd_lr] * n_groups
        else:
            lrs = [e.value for e in self.estimates] if len(self.estimates) == n_groups else []
            if not lrs or any(v is None or not v > 0 for v in lrs):
                lrs = None  # e.g. AdaShift's first n steps make no update, so no estimate yet
            elif self.lr_bounds is not None:
                lo, hi = self.lr_bounds
                clipped = [min(max(x, lo), hi) for x in lrs]
                if clipped != lrs:
                    rank_zero_info(f"SWATS estimate {', '.join(f'{x:.4g}' for x in lrs)} is outside lr_bounds "
                                   f"[{lo:g}, {hi:g}]; using {', '.join(f'{x:.4g}' for x in clipped)}")
                lrs = clipped
        # Rank 0 decides for every rank, switch now or wait: under top-k averaging each rank's estimate is
        # its own, and a rank that stayed behind would miss this collective and hang the others.
        lrs = trainer.strategy.broadcast(lrs, src=0)
        if lrs is None:
            if not self._pending:
                rank_zero_info(f"optimizer switch due ({why}) at step {trainer.global_step}, but there is no positive "
                               f"SWATS estimate yet; switching at the first step that has one "
                               f"(or set callbacks.optimizer_switch.sgd_lr)")
            self._pending = True
            return
        lrs = [float(x) for x in lrs]
        self.phase, self.lrs, self.switch_step = "sgd", lrs, int(trainer.global_step)
        self.switches += 1
        trainer.strategy.setup_optimizers(trainer)  # configure_optimizers now builds SGD
        rank_zero_info(f"optimizer switch at step {self.switch_step} (epoch {trainer.current_epoch}, {why}): SGD with "
                       f"momentum {self.sgd_settings(dict(pl_module.hparams.optimizer))['momentum']}, "
                       f"rate {', '.join(f'{x:.4g}' for x in lrs)} (torch lr = (1 - momentum) x rate)")
        for lg in trainer.loggers:
            lg.log_metrics({"optim/switch_step": float(self.switch_step), "optim/sgd_lr": lrs[0]}, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "switch_step": self.switch_step, "lrs": self.lrs, "switches": self.switches,
                "pending": self._pending,
                "estimates": [e.state_dict() for e in self.estimates]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.switch_step, self.lrs = state["phase"], state["switch_step"], state["lrs"]
        self.switches = int(state.get("switches", 0))
        self._pending = bool(state.get("pending", False))
        self.estimates = []
        for s in state.get("estimates", []):
            e = SwatsEstimate(s["beta2"], s["rtol"])
            e.load_state_dict(s)
            self.estimates.append(e)
