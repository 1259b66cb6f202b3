"""Grow the training data mid-fit (StackRec's continual-learning scenario)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError


class DataFractionCallback(pl.Callback):
    """At the start of epoch ``at_epochs[i]`` the DataModule switches to ``fractions[i]`` of the data.

    Pairs with ``data.fraction`` (nested, seeded subsets with the full catalogue): e.g. train on
    80% of each user's history, then on all of it from epoch 10, stacking at the same epoch.
    The new fraction is written into the DataModule's hyperparameters, so later checkpoints
    resume on the grown data.
    """

    def __init__(self, at_epochs: list[int], fractions: list[float]):
        if not at_epochs or len(at_epochs) != len(fractions):
            raise ConfigError("callbacks.data_fraction: at_epochs and fractions need the same, non-zero length")
        if any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"callbacks.data_fraction.fractions: expected numbers in (0, 1], got {fractions}")
        self.schedule = dict(zip((int(e) for e in at_epochs), (float(f) for f in fractions)))
        self.done: list[int] = []
        self._saved_reload: int | None = None
        self._resume_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nxt = trainer.current_epoch + 1
        if nxt in self.schedule and nxt not in self.done:
            self._switch(trainer, self.schedule[nxt])
            self.done.append(nxt)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The epoch the resumed run starts at. Checkpoints are written at validation end, before this
        # callback's epoch-end switch, so a due switch may be missing from the saved state.
        try:
            self._resume_epoch = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"])
        except (KeyError, TypeError):
            self._resume_epoch = int(checkpoint.get("epoch", -1)) + 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before any loader exists, make the data what an uninterrupted run would have at this epoch,
        # whatever data.fraction the command line gives.
        if self._resume_epoch is not None:
            for e in self.schedule:
                if e <= self._resume_epoch and e not in self.done:
                    self.done.append(e)
        if self.done:
            latest = self.schedule[max(self.done)]
            if trainer.datamodule is not None and trainer.datamodule.hparams.get("fraction") != latest:
                self._switch(trainer, latest)

    def _switch(self, trainer: pl.Trainer, fraction: float) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "hparams") or "fraction" not in dm.hparams:
            raise ConfigError("callbacks.data_fraction needs the lightning_rec SeqDataModule")
        old = dm.hparams.fraction
        dm.hparams.fraction = fraction
        dm.data, dm._built = None, False
        dm.setup("fit")
        # Lightning rebuilds loaders when this says so; restored once validation has reloaded too.
        self._saved_reload = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1
        rank_zero_info(f"data: fraction {old} -> {fraction} ({len(dm.train_set)} training sequences)")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_reload is not None and not trainer.sanity_checking:
            trainer.reload_dataloaders_every_n_epochs = self._saved_reload
            self._saved_reload = None

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = list(state.get("done", []))
