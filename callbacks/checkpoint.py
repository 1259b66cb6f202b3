"""Lightning's ModelCheckpoint, with ``last.ckpt`` written after every validation (or training epoch).

pytorch-lightning 2.6 writes ``last.ckpt`` only in a step where a top-k checkpoint was written,
so after an epoch that does not improve the monitored metric ``last.ckpt`` still holds the best
epoch, and ``fit ckpt_path=last`` would silently go back to it, losing the epochs since. Here
``save_last=True`` hands ``last.ckpt`` to a second, public-API checkpoint callback,
:class:`LastCheckpoint` (no monitor, one file named ``last``, every epoch), which
:func:`lightning_rec.build.build_callbacks` puts right after this one. Both write through the
trainer's checkpoint IO (atomic: :mod:`lightning_rec.runs.checkpoint_io`).
"""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from lightning_rec.errors import ConfigError


class LastCheckpoint(_LightningModelCheckpoint):
    """``last.ckpt`` in ``dirpath``: the latest state, written whenever the best-checkpoint callback could save.

    Lightning's own options, fixed to: no monitor, one file, named ``last`` (no version suffix), every epoch, at
    the training epoch's end (after that epoch's validation, if it has one; also in epochs without validation,
    e.g. with ``check_val_every_n_epoch=2``) unless ``save_on_train_epoch_end=false`` is given.
    """

    def __init__(self, dirpath=None, every_n_train_steps: int | None = None, train_time_interval=None,
                 save_on_train_epoch_end: bool | None = None, save_weights_only: bool = False) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_epochs=1, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval,
                         save_on_train_epoch_end=True if save_on_train_epoch_end is None else save_on_train_epoch_end,
                         save_weights_only=save_weights_only, auto_insert_metric_name=False,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # its own key: a best-checkpoint callback with monitor=null would otherwise share ModelCheckpoint's
        return f"LastCheckpoint{{'dirpath': {self.dirpath!r}}}" if self.dirpath else "LastCheckpoint"


class ModelCheckpoint(_LightningModelCheckpoint):
    """Same options as Lightning's; ``save_last=True`` means the latest state, always.

    Attributes:
        last_checkpoint: the :class:`LastCheckpoint` that writes ``last.ckpt`` (None with ``save_last=False``);
            whoever builds the trainer's callbacks adds it after this one.
    """

    def __init__(self, *args, save_last: bool | None = None, **kwargs) -> None:
        if save_last not in (None, True, False):
            raise ConfigError(f"callbacks.model_checkpoint.save_last={save_last!r}: expected true or false")
        super().__init__(*args, save_last=False, **kwargs)
        self.last_checkpoint = LastCheckpoint(
            dirpath=kwargs.get("dirpath", args[0] if args else None),
            every_n_train_steps=kwargs.get("every_n_train_steps"),
            train_time_interval=kwargs.get("train_time_interval"),
            save_on_train_epoch_end=kwargs.get("save_on_train_epoch_end"),
            save_weights_only=bool(kwargs.get("save_weights_only", False)),
        ) if save_last else None
