"""Progress as whole lines, for consoles that are not terminals (log files, CI, ``nohup``, SLURM).

A terminal progress bar redraws itself with carriage returns; in a file that leaves one long line, and the
per-epoch metric line ends up glued to it (``grep ^epoch`` finds nothing). Without a terminal, ``fit`` uses
this bar instead: a line every ``every_s`` seconds (and at the end of each stage), nothing else.
"""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar


class LineProgressBar(ProgressBar):
    """Prints ``train epoch 3: 120/300 batches (40%) | 12.0 it/s | loss=5.1234`` at most every ``every_s``
    seconds, and the validation and test passes when they end. Rank zero only; no carriage returns."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s = float(every_s)
        self._enabled = True
        self._last = 0.0
        self._t0 = 0.0

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _print(self, text: str) -> None:
        if self.is_enabled:
            print(text, file=sys.stderr, flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        total = self.total_train_batches
        if now - self._last < self.every_s or (isinstance(total, int) and batch_idx + 1 >= total):
            return  # the epoch's end is the metric line's (MetricsPrinter)
        self._last = now
        done = batch_idx + 1
        of = f"/{total} batches ({100 * done / total:.0f}%)" if isinstance(total, int) and total else " batches"
        metrics = self.get_metrics(trainer, pl_module)
        loss = metrics.get("train/loss_step", metrics.get("train/loss"))
        loss_text = f" | loss={float(loss):.4f}" if loss is not None else ""
        self._print(f"train epoch {trainer.current_epoch}: {done}{of} | {done / max(now - self._t0, 1e-9):.1f} it/s"
                    f"{loss_text}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._print(f"validation done (epoch {trainer.current_epoch}, step {trainer.global_step})")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print("test done")
