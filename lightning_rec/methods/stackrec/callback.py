"""StackRec as a callback: double the model's depth at given epochs or steps."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_rec.errors import ConfigError
from lightning_rec.methods.stackrec.stacking import (
    PRESETS,
    check_stackable,
    index_map,
    is_copy,
    options,
    preservation_caveat,
    stack_module,
)


class StackingCallback(pl.Callback):
    """Doubles the number of blocks of NextItNet or SASRec during ``fit``.

    Stacks happen at the start of a listed epoch (``at_epochs``) or before a listed
    optimizer step (``at_steps``). After each: the optimizer is rebuilt (fresh, as the
    authors do, or with Adam moments copied to the copies), the learning-rate schedule
    continues from the current step, DDP is re-wrapped so new parameters are all-reduced,
    ``hparams.num_blocks`` is updated (every later checkpoint rebuilds the deep model), and
    the event is logged. Under top-k averaging (``trainer=topk``) a stack that falls inside a round ends that
    round first (its top-k selection and exchange, reason ``stack at <event>``), so the model stacked is the
    round's global model on every rank.

    Args:
        at_epochs: epochs (0-based) at whose start to stack.
        at_steps: global steps before which to stack.
        mode: ``adjacent`` (B0 B0 B1 B1) or ``cross`` (B0 B1 B0 B1).
        preset: ``function_preserving`` (default) or ``authors`` (fresh LayerNorms, all
            alphas 0, new output layer, positional dilations); flags below override it.
        copy_layernorm, copy_alpha, zero_new_alpha, keep_dilation, copy_head: see
            :class:`lightning_rec.methods.stackrec.stacking.StackOptions`.
        optimizer_state: ``fresh`` (new optimizer, moments reset) or ``keep_moments``
            (copied weights inherit their source's optimizer state). Either way the learning
            rate schedule goes on where it was; it does not restart.
        max_blocks: never grow beyond this depth.
    """

    def __init__(
        self,
        at_epochs: list[int] | None = None,
        at_steps: list[int] | None = None,
        mode: str = "adjacent",
        preset: str | None = "function_preserving",
        copy_layernorm: bool | None = None,
        copy_alpha: bool | None = None,
        zero_new_alpha: bool | None = None,
        keep_dilation: bool | None = None,
        copy_head: bool | None = None,
        optimizer_state: str = "fresh",
        max_blocks: int | None = None,
    ):
        self.at_epochs = sorted({int(e) for e in (at_epochs or [])})
        self.at_steps = sorted({int(s) for s in (at_steps or [])})
        if not self.at_epochs and not self.at_steps:
            raise ConfigError("callbacks.stacking: give at_epochs=[...] or at_steps=[...]")
        if any(e < 1 for e in self.at_epochs) or any(s < 1 for s in self.at_steps):
            raise ConfigError("callbacks.stacking: at_epochs/at_steps must be >= 1 (train the shallow model first)")
        if optimizer_state not in ("fresh", "keep_moments"):
            raise ConfigError(f"callbacks.stacking.optimizer_state: '{optimizer_state}' is not fresh or keep_moments")
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"callbacks.stacking.preset: '{preset}' is not one of {', '.join(PRESETS)}")
        self.opts = options(mode, preset, copy_layernorm=copy_layernorm, copy_alpha=copy_alpha,
                            zero_new_alpha=zero_new_alpha, keep_dilation=keep_dilation, copy_head=copy_head)
        self.optimizer_state = optimizer_state
        self.max_blocks = max_blocks
        self.done: list[str] = []  # events already applied ("epoch:5", "step:100"), kept in checkpoints
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.validate_trainer(trainer)
        encoder = getattr(pl_module, "encoder", None)
        if not getattr(pl_module, "stackable", True) or encoder is None or not hasattr(encoder, "blocks"):
            raise ConfigError(f"callbacks.stacking: applies to a single NextItNet or SASRec model, not to "
                              f"{type(pl_module).__name__} (model=rocket: stack one net after export)")
        check_stackable(encoder, self.opts)
        caveat = preservation_caveat(encoder, self.opts)
        if caveat:
            rank_zero_warn(caveat)

    @staticmethod
    def validate_trainer(trainer: pl.Trainer) -> None:
        """Fail early (the CLI calls this in the main process, before any worker starts)."""
        from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            # Spawned workers hand weights back with load_state_dict(strict=False): a model grown in
            # the workers would silently come back shallow in the main process.
            raise ConfigError("callbacks.stacking: does not work with trainer.strategy=ddp_spawn/ddp_notebook; "
                              "use trainer.strategy=ddp")

    # ------------------------------------------------------------------ triggers
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch
        if e in self.at_epochs and f"epoch:{e}" not in self.done:
            self._stack(trainer, pl_module, f"epoch:{e}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        s = trainer.global_step
        if s in self.at_steps and f"step:{s}" not in self.done:
            self._stack(trainer, pl_module, f"step:{s}")

    # ------------------------------------------------------------------ surgery
    def _stack(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> None:
        before = len(pl_module.encoder.blocks)
        if self.max_blocks is not None and 2 * before > self.max_blocks:
            rank_zero_info(f"stacking at {event} skipped: {2 * before} blocks would exceed max_blocks={self.max_blocks}")
            self.done.append(event)
            return
        finish_round = getattr(trainer.strategy, "finish_round", None)
        if finish_round is not None:
            # Top-k averaging: end the round first, so the model that is stacked is the global model chosen by the
            # round's top-k selection, not rank 0's local one (every rank reaches this event at the same step).
            finish_round(f"stack at {event}")
        old_state = self._param_states(trainer, pl_module) if self.optimizer_state == "keep_moments" else None
        old_sched = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        mapping = stack_module(pl_module, self.opts)
        self._rewrap_ddp(trainer)
        trainer.strategy.setup_optimizers(trainer)
        if old_state is not None:
            self._restore_moments(trainer, pl_module, old_state, mapping, before)
        self._continue_schedule(trainer, old_sched)
        n_params = sum(p.numel() for p in pl_module.parameters())
        after = len(pl_module.encoder.blocks)
        self.done.append(event)
        record = {"event": event, "from_blocks": before, "to_blocks": after, "params": n_params,
                  "step": trainer.global_step, "epoch": trainer.current_epoch, "mode": self.opts.mode}
        self.history.append(record)
        rank_zero_info(f"StackRec at {event}: {before} -> {after} blocks ({self.opts.mode}), "
                       f"{n_params:,} parameters; map {index_map(before, self.opts.mode)}; optimizer {self.optimizer_state}")
        for lg in trainer.loggers:
            lg.log_metrics({"stack/num_blocks": float(after), "stack/params": float(n_params)}, step=trainer.global_step)

    @staticmethod
    def _rewrap_ddp(trainer: pl.Trainer) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
            # DDP only all-reduces the parameters it saw when it was built; wrap the grown module anew
            # (its constructor also broadcasts rank 0's weights, so fresh parameters agree across ranks).
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        elif hasattr(strategy, "model_changed"):
            strategy.model_changed()  # top-k averaging: rank 0's grown model becomes everyone's global model

    @staticmethod
    def _continue_schedule(trainer: pl.Trainer, old: list[dict[str, Any]]) -> None:
        """Put the rebuilt schedulers where the old ones were, and their rates into the new optimizers
        (a new scheduler has set the rate of step 0; StepLR would otherwise build on it for good)."""
        configs = trainer.lr_scheduler_configs
        if len(configs) != len(old):
            return  # e.g. an SGD phase without a schedule after an optimizer switch
        for cfg, st in zip(configs, old):
            cfg.scheduler.load_state_dict(st)
            for group, lr in zip(cfg.scheduler.optimizer.param_groups, cfg.scheduler.get_last_lr()):
                group["lr"] = lr

    @staticmethod
    def _param_states(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
        by_id = {id(p): n for n, p in pl_module.named_parameters()}
        out = {}
        for opt in trainer.optimizers:
            for p, st in opt.state.items():
                if id(p) in by_id:
                    out[by_id[id(p)]] = copy.deepcopy(st)  # AdaShift keeps lists of tensors, not only tensors
        return out

    def _restore_moments(self, trainer, pl_module, old_state, mapping, before) -> None:
        for name, p in pl_module.named_parameters():
            src = name
            if name.startswith("encoder.blocks."):
                rest = name[len("encoder.blocks."):]
                i, tail = rest.split(".", 1)
                src = f"encoder.blocks.{mapping[int(i)]}.{tail}"
                fresh_ln = not self.opts.copy_layernorm and (".ln" in f".{tail}" or tail.startswith("ln"))
                # An alpha reset to 0 starts with fresh moments; one that keeps its value keeps its state.
                kept_alpha = self.opts.copy_alpha and not (self.opts.zero_new_alpha and is_copy(int(i), before, self.opts.mode))
                if fresh_ln or (tail.startswith("alpha") and not kept_alpha):
                    continue
            if name.startswith("output.") and not self.opts.copy_head:
                continue  # a re-initialised head starts with fresh moments
            st = old_state.get(src)
            if st is None:
                continue
            for opt in trainer.optimizers:
                if any(p is q for g in opt.param_groups for q in g["params"]):
                    opt.state[p] = copy.deepcopy(st)  # each copy gets its own state, never a shared list

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missed = [f"epoch:{e}" for e in self.at_epochs if f"epoch:{e}" not in self.done]
        missed += [f"step:{s}" for s in self.at_steps if f"step:{s}" not in self.done]
        if missed:  # e.g. at_steps beyond the run's last step: say so rather than end quietly shallow
            rank_zero_warn(f"callbacks.stacking: {', '.join(missed)} not reached (the run ended at step "
                           f"{trainer.global_step}, epoch {trainer.current_epoch}); the model has "
                           f"{len(pl_module.encoder.blocks)} blocks")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = list(state.get("done", []))
        self.history = list(state.get("history", []))
