"""One line of metrics per epoch on the console (rank zero), next to the progress bar."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class MetricsPrinter(pl.Callback):
    """Prints ``epoch N | step S | train/loss=... val/ndcg@10=... | 12.3s`` after each epoch.

    Printed at the end of the training epoch, when that epoch's train loss and its
    validation (which Lightning runs before the epoch closes) are both known.

    Args:
        keys: metric names to print when present.
    """

    def __init__(self, keys: list[str] | None = None):
        self.keys = list(keys or ["train/loss_epoch", "val/ndcg@10", "val/hr@10", "val/sampled_ndcg@10", "val/sampled_hr@10",
                                   "val/light/ndcg@10", "val/booster/ndcg@10"])
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        parts = [f"{k.replace('_epoch', '')}={float(m[k]):.4f}" for k in self.keys if k in m]
        took = f" | {time.perf_counter() - self._t0:.1f}s" if self._t0 is not None else ""
        cut = time_limit_stop(trainer)
        cut = f" | cut short by trainer.max_time after {cut[0]} of {cut[1]} batches" if cut and cut[0] < cut[1] else ""
        rank_zero_info(f"epoch {trainer.current_epoch} | step {trainer.global_step} | {' '.join(parts)}{took}{cut}")


def time_limit_stop(trainer: pl.Trainer) -> tuple[int, int] | None:
    """``(batches run, batches per epoch)`` of the epoch ``trainer.max_time`` stopped, or None if it did not."""
    from pytorch_lightning.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    left = timer.time_remaining() if timer is not None else None
    if left is None or left > 0:
        return None
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    total = trainer.num_training_batches
    return int(done), int(total) if total != float("inf") else int(done)
