"""One simulated device: its users' data only, local Lightning training, its state on its own disk.

A device keeps a full Lightning checkpoint of its last local training in ``state_dir`` (model,
optimizer, the optimizer-switch phase, epoch counter), so every round continues where the last
one stopped: Adam moments, the AdaShift -> SGD switch and the device's own model (federated
distillation never replaces it) persist across rounds, and across a restart of the federation.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_rec.errors import ConfigError
from lightning_rec.methods.federated.core import LabelLogitAccumulator, LabelLogits


def _quiet() -> None:
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _LoadWeights(pl.Callback):
    """Puts the global model into the module after Lightning restored the device's checkpoint."""

    def __init__(self, state: dict[str, torch.Tensor] | None):
        self.state = state

    def on_train_start(self, trainer, pl_module):
        if self.state is not None:
            pl_module.load_state_dict(self.state)


def check_local_callbacks(callbacks_conf: dict[str, Any]) -> None:
    """Refuse, before any round, callbacks that cannot work in local training: weight averaging (EMA/SWA).
    Each round replaces the weights with the global model; an average kept across rounds would mix the
    device's old weights into what it uploads."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging

    for name, conf in callbacks_conf.items():
        if conf and isinstance(instantiate(conf), (WeightAveraging, StochasticWeightAveraging)):
            raise ConfigError(f"federation.callbacks.{name}: weight averaging (EMA/SWA) does not apply to "
                              f"federated local training; drop it")


class Device:
    """Local training and evaluation of one device.

    Args:
        device_id: 0..N-1.
        users: indices of this device's users in the dataset.
        data_conf, model_conf: the ``data`` and ``model`` sections of the federation's config.
        local_epochs: epochs per round.
        state_dir: where the device keeps its checkpoint (``device_<id>.ckpt``).
        callbacks_conf: Lightning callbacks instantiated for local training (e.g. the optimizer switch).
        distill: settings of the distillation term (``weight``, ``temperature``, ``l2_weight``, ``top_m``).
        accelerator: Lightning accelerator for local training.
        eval_users: the users whose test items :meth:`evaluate` scores (default: the device's own);
            ``federation.holdout_users`` passes the held-out users.
    """

    def __init__(self, device_id: int, users: np.ndarray, data_conf: dict[str, Any], model_conf: dict[str, Any],
                 local_epochs: int, state_dir: str, callbacks_conf: dict[str, Any] | None = None,
                 distill: dict[str, Any] | None = None, accelerator: str = "cpu", seed: int = 0,
                 eval_users: np.ndarray | None = None):
        self.id, self.users = int(device_id), np.asarray(users)
        self.eval_users = None if eval_users is None or len(eval_users) == 0 else np.asarray(eval_users)
        self._eval_dm = None
        self.data_conf, self.model_conf = dict(data_conf), dict(model_conf)
        self.local_epochs, self.state_dir = int(local_epochs), state_dir
        self.callbacks_conf = dict(callbacks_conf or {})
        self.distill = dict(distill or {})
        self.accelerator, self.seed = accelerator, int(seed)
        self._dm = None
        self._template: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ pieces
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.state_dir, f"device_{self.id}.ckpt")

    def _datamodule_of(self, users: np.ndarray):
        from lightning_rec.data import SeqDataModule

        conf = {k: v for k, v in self.data_conf.items() if not k.startswith("_")}
        dm = SeqDataModule(**conf, users=users.tolist())
        dm.setup("fit")
        return dm

    def datamodule(self):
        """The device's own users (training, and evaluation unless ``eval_users`` is given)."""
        if self._dm is None:
            self._dm = self._datamodule_of(self.users)
        return self._dm

    def eval_datamodule(self):
        """The DataModule :meth:`evaluate` uses: the device's own users, or ``eval_users``."""
        if self.eval_users is None:
            return self.datamodule()
        if self._eval_dm is None:
            self._eval_dm = self._datamodule_of(self.eval_users)
        return self._eval_dm

    def build_model(self):
        from lightning_rec.build import build_model

        return build_model(copy.deepcopy(self.model_conf), self.datamodule().num_items)

    def template(self) -> dict[str, torch.Tensor]:
        """Names, shapes and dtypes of the model's state (built once per device)."""
        if self._template is None:
            self._template = self.build_model().state_dict()
        return self._template

    def _callbacks(self, teacher: LabelLogits | None) -> list[pl.Callback]:
        from hydra.utils import instantiate

        cbs = [instantiate(c) for c in self.callbacks_conf.values() if c]
        if teacher is not None and teacher.labels.numel():
            from lightning_rec.methods.rocket import HintLossCallback

            hint = HintLossCallback(kind="kl_l2", weight=float(self.distill.get("weight", 1.0)),
                                    temperature=float(self.distill.get("temperature", 1.0)),
                                    l2_weight=float(self.distill.get("l2_weight", 0.01)))
            hint.label_teacher = teacher
            cbs.append(hint)
        return cbs

    def _trainer(self, max_epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
        from lightning_rec.runs.checkpoint_io import AtomicCheckpointIO

        return pl.Trainer(
            accelerator=self.accelerator, devices=1, max_epochs=max_epochs, logger=False, callbacks=callbacks,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=self.state_dir,
            plugins=[AtomicCheckpointIO()],
        )

    def saved_epochs(self) -> int:
        if not os.path.exists(self.ckpt_path):
            return 0
        return int(torch.load(self.ckpt_path, map_location="cpu", weights_only=True).get("epoch", 0))  # epochs done

    # ------------------------------------------------------------------ a round
    def train(self, global_state: dict[str, torch.Tensor] | None, teacher: LabelLogits | None,
              upload_logits: bool, top_m: int = 100) -> dict[str, Any]:
        """Local epochs from the device's checkpoint (weights replaced by ``global_state`` when given).

        Returns ``{"state": weights, "upload": LabelLogits | None, "num_examples", "loss"}``.
        """
        os.makedirs(self.state_dir, exist_ok=True)
        _quiet()  # one federation log, not a Trainer banner per device and round
        pl.seed_everything(self.seed * 1009 + self.id, workers=True, verbose=False)
        dm = self.datamodule()
        model = self.build_model()
        done = self.saved_epochs()
        callbacks = self._callbacks(teacher) + [_LoadWeights(global_state)]
        trainer = self._trainer(done + self.local_epochs, callbacks)
        trainer.fit(model, datamodule=dm, ckpt_path=self.ckpt_path if done else None)
        trainer.save_checkpoint(self.ckpt_path)
        loss = trainer.callback_metrics.get("train/loss_epoch")
        out = {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "num_examples": int(len(dm.train_set)), "loss": float(loss) if loss is not None else float("nan"),
               "upload": self.label_logits(model, top_m) if upload_logits else None}
        return out

    @torch.no_grad()
    def label_logits(self, model, top_m: int) -> LabelLogits:
        """Per-label mean logits of the device's model over its training positions (top-M kept)."""
        model.eval()
        dm = self.datamodule()
        w = model.output_weight()[1:]  # (N, d): items 1..N
        acc = LabelLogitAccumulator(w.shape[0])
        for batch in dm.train_dataloader():
            h = model(batch["inputs"])
            mask = batch["targets"] != 0
            acc.add(h[mask] @ w.T, batch["targets"][mask])
        model.train()
        return acc.result(top_m)

    def evaluate(self, state: dict[str, torch.Tensor] | None = None, split: str = "test") -> dict[str, float]:
        """Full-ranking metrics of ``state`` (or the device's own model) on the ``split`` targets of its
        users, or of ``eval_users`` when given."""
        dm = self.eval_datamodule()
        model = self.build_model()
        if state is None:
            if not os.path.exists(self.ckpt_path):
                raise ConfigError(f"device {self.id}: no local model yet ({self.ckpt_path})")
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        _quiet()
        trainer = pl.Trainer(accelerator=self.accelerator, devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        fn = trainer.test if split == "test" else trainer.validate
        res = fn(model, datamodule=dm, verbose=False)
        return {k.split("/", 1)[1]: float(v) for k, v in res[0].items()} if res else {}
