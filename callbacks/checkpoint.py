"""Lightning's ModelCheckpoint, with ``last.ckpt`` written after every validation.

pytorch-lightning 2.6 writes ``last.ckpt`` only in a step where a top-k checkpoint was written,
so after an epoch that does not improve the monitored metric ``last.ckpt`` still holds the best
epoch, and ``fit ckpt_path=last`` would silently go back to it, losing the epochs since. This
subclass writes it whenever the parent did not.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Same options as Lightning's; ``save_last=True`` means the latest state, always."""

    _last_written_step = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _ensure_last(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.trainer.states import TrainerFn

        if (not self.save_last or trainer.sanity_checking or trainer.fast_dev_run
                or trainer.state.fn != TrainerFn.FITTING or self._last_written_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)
