"""Learning curve against training wall-clock time, for speed-up comparisons."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytorch_lightning as pl


class Timeline(pl.Callback):
    """Appends one JSON line per validation: training seconds so far, epoch, step, depth, metrics.

    Training seconds count only the training batches (forward, backward, optimizer), so runs
    that validate equally often compare fairly. Written to ``<run_dir>/timeline.jsonl``.
    """

    def __init__(self, path: str | None = None, keys: list[str] | None = None):
        self.path = path
        self.keys = keys or ["val/ndcg@10", "val/hr@10"]
        self.train_seconds = 0.0
        self._t: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if self._t is not None:
            self.train_seconds += time.perf_counter() - self._t
            self._t = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        row = {"train_seconds": round(self.train_seconds, 3), "epoch": trainer.current_epoch,
               "step": trainer.global_step, "num_blocks": len(getattr(pl_module, "encoder", None).blocks) if hasattr(pl_module, "encoder") else None}
        row.update({k: float(m[k]) for k in self.keys if k in m})
        path = self.path or os.path.join(trainer.default_root_dir, "timeline.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
