"""Exponential moving average of the weights, evaluated, checkpointed and shipped instead of the raw weights.

Built on Lightning's :class:`~pytorch_lightning.callbacks.EMAWeightAveraging` (after every optimizer step
``w_ema <- decay * w_ema + (1 - decay) * w``; the first update copies ``w``). What it adds for this project:

* ``test`` after ``fit`` evaluates the averaged weights. Lightning's callback, when the best checkpoint is
  loaded for testing, puts the raw (non-averaged) weights back into the model; here a checkpoint loaded
  outside fitting keeps its ``state_dict``, which is the average, as ``test``/``predict``/``export`` read it.
* A StackRec stack changes the model's shape mid-fit: the average restarts from the stacked weights (its
  shape must match the model's for validation to swap them), also when resuming across a stack.
* Top-k model averaging keeps a different local model on each rank; an average of it would differ between
  ranks, so the combination is refused at setup.

Checkpoints hold the average as ``state_dict`` (what every command loads) and the raw weights as
``current_model_state``, so ``fit ckpt_path=`` resumes both exactly.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from torch.optim.swa_utils import AveragedModel

from lightning_rec.errors import ConfigError, check_int


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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_rec.distributed import TopKAveragingStrategy

        if isinstance(trainer.strategy, TopKAveragingStrategy):
            raise ConfigError("callbacks.ema: does not work with trainer=topk (each rank trains its own local "
                              "model between rounds); drop callbacks.ema or use trainer=ddp")
        super().setup(trainer, pl_module, stage)

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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._match_shape(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ready(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", self._latest_update_epoch))
