"""Config -> objects: the one place that turns the composed config into a datamodule, model, trainer,
callbacks and loggers, each by its ``_target_`` (Hydra's convention)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lightning_rec.config import group_options
from lightning_rec.errors import ConfigError, LightningRecError
from lightning_rec.runs.checkpoint_io import AtomicCheckpointIO
from lightning_rec.runs.loggers import build_loggers

__all__ = ["build_callbacks", "build_datamodule", "build_loggers", "build_model", "build_trainer", "model_class", "precision_for", "unwrap"]


def precision_for(cfg: DictConfig) -> None:
    """Mixed precision is a GPU feature: on a CPU fall back to 32-bit instead of failing."""
    import torch
    from pytorch_lightning.utilities import rank_zero_info

    prec = str(cfg.trainer.get("precision", "32-true"))
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        rank_zero_info(f"trainer.accelerator={acc}: no GPU on this machine, using the CPU")
        cfg.trainer.accelerator = acc = "cpu"
    on_cpu = acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())
    if on_cpu and ("16" in prec):
        rank_zero_info(f"trainer.precision={prec} needs a GPU; using 32-true on the CPU")
        cfg.trainer.precision = "32-true"


def build_callbacks(conf: DictConfig | None, what: str) -> list:
    """The callbacks of ``conf`` (a dict keyed by name), each by its ``_target_``; a checkpoint callback's
    ``last_checkpoint`` (:class:`lightning_rec.callbacks.checkpoint.ModelCheckpoint`, ``save_last=true``)
    follows it, so ``last.ckpt`` holds the best-checkpoint state of the same epoch."""
    from hydra.utils import instantiate

    out = []
    for key, c in (conf or {}).items():
        if c is None:
            continue
        if not isinstance(c, DictConfig) or "_target_" not in c:
            hint = (f"select it with {what}={key}" if key in group_options(what) else
                    f"give its class with +{what}.{key}._target_=<module.Class>")
            raise ConfigError(f"{what}.{key}: has no _target_ (the class to build); {hint}")
        try:
            cb = instantiate(c, _convert_="all")
        except Exception as e:
            raise unwrap(e, f"{what}.{key}") from None
        out.append(cb)
        last = getattr(cb, "last_checkpoint", None)  # ModelCheckpoint(save_last=true): last.ckpt's own callback
        if last is not None:
            out.append(last)
    return out


def unwrap(e: Exception, where: str) -> LightningRecError:
    """Hydra wraps errors raised by constructors; surface ours, summarise the rest in one line."""
    cause = e
    while cause is not None:
        if isinstance(cause, LightningRecError):
            return cause
        cause = cause.__cause__ or cause.__context__
    msg = " ".join(str(e).split())
    if "got an unexpected keyword argument" in msg:
        arg = msg.split("unexpected keyword argument")[-1].strip(" '\".")
        return ConfigError(f"{where}: no option '{arg}'")
    return ConfigError(f"{where}: {msg[:300]}")


DATA_TARGET = "lightning_rec.data.SeqDataModule"
MODEL_TARGET = "lightning_rec.modules.SeqRecModule"
# the class of a checkpoint written before checkpoints recorded theirs (``model_target``), by its arch
ARCH_TARGETS = {"rocket": "lightning_rec.methods.rocket.RocketModule"}


def target_class(target: str, option: str):
    """The class a ``_target_`` names; a one-line error naming the option when it cannot be imported."""
    from hydra.utils import get_class

    try:
        return get_class(str(target))
    except Exception as e:
        raise ConfigError(f"{option}._target_={target}: cannot import it ({' '.join(str(e).split())[:200]})") from None


def build_datamodule(data_conf: dict[str, Any]):
    """The DataModule ``data._target_`` names (default :class:`~lightning_rec.data.SeqDataModule`)."""
    conf = dict(data_conf)
    cls = target_class(conf.pop("_target_", None) or DATA_TARGET, "data")
    try:
        return cls(**conf)
    except TypeError as e:
        raise ConfigError(f"data: {e}") from None


def model_target(conf: dict[str, Any]) -> str:
    """``_target_`` of a model config; for saved hyperparameters (no ``_target_``), the class their arch needs."""
    return str(conf.get("_target_") or ARCH_TARGETS.get(str(conf.get("arch")), MODEL_TARGET))


def model_class(ckpt: dict[str, Any]):
    """The LightningModule class of a checkpoint: the one it records, else the one its arch needs."""
    return target_class(ckpt.get("model_target") or model_target(ckpt.get("hyper_parameters") or {}), "model")


def build_model(model_conf: dict[str, Any], num_items: int):
    """The LightningModule ``model._target_`` names, for a catalogue of ``num_items``."""
    conf = dict(model_conf)
    cls = target_class(model_target(conf), "model")
    conf.pop("_target_", None)
    try:
        return cls(num_items=num_items, **conf)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None


def lines_without_a_terminal(callbacks: list, stream=None) -> list:
    """Without a terminal (a log file, CI, nohup), the redrawn TQDM bar becomes whole progress lines."""
    import sys

    from pytorch_lightning.callbacks import TQDMProgressBar

    from lightning_rec.callbacks.line_progress import LineProgressBar

    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return callbacks
    return [LineProgressBar() if type(c) is TQDMProgressBar else c for c in callbacks]


def build_trainer(cfg: DictConfig, run_dir: str, callbacks: list, loggers: list):
    from hydra.utils import instantiate

    precision_for(cfg)
    if cfg.trainer.get("use_distributed_sampler", False):
        raise ConfigError("trainer.use_distributed_sampler=true: the data module shards users over ranks itself "
                          "(exact resume, padded evaluation); Lightning's sampler would shard them twice. Leave it "
                          "false")
    if not cfg.trainer.get("enable_progress_bar", True):
        from pytorch_lightning.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks = lines_without_a_terminal(callbacks)
    try:
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False,
            default_root_dir=run_dir, plugins=[AtomicCheckpointIO()], _convert_="all",
        )
    except Exception as e:
        raise unwrap(e, "trainer") from None
    for cb in callbacks:  # callbacks that cannot work with this trainer say so before any worker starts
        if hasattr(cb, "validate_trainer"):
            cb.validate_trainer(trainer)
    return trainer
