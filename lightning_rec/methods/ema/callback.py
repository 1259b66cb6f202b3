"""Exponential moving average of the weights, evaluated, checkpointed and shipped instead of the raw weights.

Built on Lightning's :class:`~pytorch_lightning.callbacks.EMAWeightAveraging` (after every optimizer step
``w_ema <- decay * w_ema + (1 - decay) * w``; the first update copies ``w``). What it adds for this project:

* ``test`` after ``fit`` evaluates the averaged weights. Lightning's callback, when the best checkpoint is
  loaded for testing, puts the raw (non-averaged) weights back into the model; here a checkpoint loaded
  outside fitting keeps its ``state_dict``, which is the average, as ``test``/``predict``/``export`` read it.
* A StackRec stack changes the model's shape mid-fit: the average restarts from the stacked weights (its
  shape must match the model's for validation to swap them), also when resuming across a stack.
* Under top-k model averaging (``trainer=topk``) each rank trains its own local model between rounds, so an
  average of it would differ between ranks. There the average follows the global model instead: it is updated
  right after each round's exchange, when every rank holds the same weights, as ``w_ema <- decay^n * w_ema +
  (1 - decay^n) * w_global`` with ``n`` the optimizer steps since its last update (so ``decay`` keeps its
  per-step meaning: 0.995 spans about 200 steps under DDP and under top-k alike). It starts from the model
  every rank starts from (with ``start_step``: the first global model at or after it) and costs no
  communication. The strategy is found by its public round hook, not by its class (this package does not
  import the top-k package): a strategy with ``add_round_listener(fn)`` calls ``fn(step)`` on every rank after
  each round, when the module is the global model, and has ``round``, ``global_params`` and ``finish_round()``
  (see :mod:`lightning_rec.methods.topk.rounds`).

Checkpoints hold the average as ``state_dict`` (what every command loads) and the raw weights as
``current_model_state``, so ``fit ckpt_path=`` resumes both exactly.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from torch.optim.swa_utils import AveragedModel

from lightning_rec.errors import ConfigError, check_int

ROUND_HOOK = "add_round_listener"  # the public method of a strategy that averages models in rounds (trainer=topk)
# Lightning's WeightAveraging keeps these privately; tests/methods/test_lightning_private.py checks they still exist
LIGHTNING_PRIVATE = ("_average_model", "_latest_update_step", "_latest_update_epoch", "_device", "_use_buffers",
                     "_kwargs")


class EMACallback(EMAWeightAveraging):
    """Validate, checkpoint and test an exponential moving average of the weights.

    Args:
        decay: weight of the old average per optimizer step, in (0, 1); the average spans about
            ``1 / (1 - decay)`` steps (0.995: 200 steps).
        start_step: first optimizer step (0-based) that updates the average; until then validation,
            checkpoints and the end of training see the current weights.
        every_n_steps: update every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.995, start_step: int = 0, every_n_steps: int = 1) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay!r}: expected a number in (0, 1), e.g. 0.995")
        check_int(start_step, "callbacks.ema.start_step", 0)
        check_int(every_n_steps, "callbacks.ema.every_n_steps", 1)
        super().__init__(decay=float(decay), use_buffers=True, update_every_n_steps=int(every_n_steps),
                         update_starting_at_step=int(start_step))
        self.decay = float(decay)
        self._topk = None  # a strategy that averages models in rounds (trainer=topk), or None (set in setup)
        self._round_seen: int | None = None  # trainer=topk: the strategy's round the average last looked at
        self._fit_trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rounds = callable(getattr(trainer.strategy, ROUND_HOOK, None))
        self._topk = trainer.strategy if rounds else None
        if self._topk is not None and self.update_every_n_steps != 1:
            raise ConfigError(f"callbacks.ema.every_n_steps={self.update_every_n_steps}: under trainer=topk the "
                              "average updates once a round (every trainer.strategy.h steps); leave it at 1")
        super().setup(trainer, pl_module, stage)
        if self._topk is not None:
            self._fit_trainer = trainer
            getattr(self._topk, ROUND_HOOK)(self._after_round)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._topk is not None and callable(getattr(self._topk, "remove_round_listener", None)):
            self._topk.remove_round_listener(self._after_round)
        super().teardown(trainer, pl_module, stage)

    # -- trainer=topk: the average of the global model, updated at each round's exchange
    def _fold_in(self, pl_module: pl.LightningModule, step: int) -> None:
        """Fold the module (the global model: every rank holds it) into the average with decay ** (steps since
        the last update, ``step`` the optimizer steps taken); the first update copies, as Lightning's EMA does."""
        avg = self._average_model
        keep = self.decay ** max(1, step - self._latest_update_step)
        with torch.no_grad():
            pairs = zip(itertools.chain(avg.module.parameters(), avg.module.buffers()),
                        itertools.chain(pl_module.parameters(), pl_module.buffers()))
            for a, c in pairs:
                if int(avg.n_averaged) == 0 or not a.is_floating_point():
                    a.copy_(c)
                else:
                    a.mul_(keep).add_(c.to(a.device), alpha=1.0 - keep)
        avg.n_averaged += 1
        self._latest_update_step = step

    def _after_round(self, step: int) -> None:
        """The strategy's round listener: after an exchange every rank holds the global model; fold it in."""
        pl_module = self._fit_trainer.lightning_module if self._fit_trainer is not None else None
        if pl_module is None or self._average_model is None:
            return
        self._match_shape(pl_module)
        self._round_seen = self._topk.round
        if step - 1 >= (self.update_starting_at_step or 0):
            self._fold_in(pl_module, step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._topk is None:
            return
        if self._round_seen is None:
            self._round_seen = self._topk.round  # rounds before this one (a resume's) are in the restored average
        avg = self._average_model
        if avg is not None and int(avg.n_averaged) == 0 and trainer.global_step == 0 and not self.update_starting_at_step:
            # a fresh start: every rank starts from the same (global) model, so the average starts there, as
            # Lightning's starts from the weights after the first step, not at the end of the first round. On a
            # resume (or with start_step) the first exchange at or after start_step makes the first copy, as it
            # would have without the interruption; a mid-round module here is this rank's local model
            self._fold_in(pl_module, trainer.global_step)

    # -- the average follows the model's shape (StackRec), and is the model itself until its first update
    def _match_shape(self, pl_module: pl.LightningModule) -> None:
        """After a stack the average restarts from the current weights (every optimizer step: kept cheap)."""
        avg = self._average_model
        if avg is None or [p.shape for p in avg.module.parameters()] == [p.shape for p in pl_module.parameters()]:
            return
        self._average_model = AveragedModel(model=pl_module, device=self._device or pl_module.device,
                                            use_buffers=self._use_buffers, **self._kwargs)
        rank_zero_info("EMA: the model changed shape (a stack); the weight average restarts from the current weights")

    def _ready(self, pl_module: pl.LightningModule) -> None:
        """Before the average is used (validation, a checkpoint, the end of training): until its first update
        (before start_step, or right after a stack) it is the current weights, not the copy made at setup."""
        self._match_shape(pl_module)
        avg = self._average_model
        if avg is not None and int(avg.n_averaged) == 0:
            with torch.no_grad():
                for a, c in zip(avg.module.state_dict().values(), pl_module.state_dict().values()):
                    a.copy_(c)
                if self._topk is not None and self._topk.global_params is not None:
                    # mid-round the module is this rank's local model; the average stands for the global one
                    for a, g in zip(avg.module.parameters(), self._topk.global_params):
                        if a.shape == g.shape:
                            a.copy_(g)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._match_shape(pl_module)
        if self._topk is not None:
            return  # updated by the strategy's round listener
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._topk is not None and trainer.state.fn == TrainerFn.FITTING:
            self._match_shape(pl_module)  # the strategy ended the round before validation (its listener ran)
        self._ready(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._topk is not None:  # this hook runs before the strategy's: end its last round here
            self._topk.finish_round()  # its listener folds the global model in
            self._match_shape(pl_module)
        self._ready(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._ready(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            checkpoint["ema"] = {"decay": self.decay}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # test/validate/predict: the checkpoint's state_dict (the average) is the model
        # resuming: the module already has the checkpoint's depth; the average must too before it loads
        was = (checkpoint.get("ema") or {}).get("decay")
        if was is not None and float(was) != self.decay:
            rank_zero_info(f"EMA: the checkpoint's average was kept with decay {was}; it continues with "
                           f"callbacks.ema.decay={self.decay} from here")
        self._match_shape(pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch,
                "round_seen": self._round_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", self._latest_update_epoch))
        self._round_seen = state_dict.get("round_seen")
