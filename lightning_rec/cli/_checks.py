"""Option checks shared by the commands: one-line errors before anything runs."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_rec.errors import ConfigError, check_int, is_int


def check_model_fits_data(model, dm) -> None:
    """Errors that would otherwise surface as tracebacks deep inside training."""
    hp = model.hparams
    archs = [hp[role]["arch"] for role in ("booster", "light")] if hp.arch == "rocket" else [hp.arch]
    if "sasrec" in archs and hp.max_len < dm.hparams.max_len:
        raise ConfigError(f"data.max_len={dm.hparams.max_len} is longer than the SASRec position table "
                          f"(model.max_len={hp.max_len}); set data.max_len<={hp.max_len}")


def check_catalogue(saved: dict[str, Any] | None, dm, what: str) -> None:
    maps = (saved or {}).get("id_maps")
    if maps and maps["items"] != dm.id_maps()["items"]:
        raise ConfigError(
            f"{dm.source}: its item catalogue ({dm.num_items} items) differs from the one {what} was trained on "
            f"({len(maps['items']) - 1} items); use the same data and filters (data.path=, data.min_*)"
        )


def check_monitor(cfg: DictConfig, model) -> None:
    names = [f"val/{n}" for n in model.metric_names]
    if cfg.eval.monitor not in names:
        raise ConfigError(f"eval.monitor={cfg.eval.monitor}: not a logged metric; expected one of {', '.join(names)}")


def positive_int(value, option: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1 or str(value).strip() not in (str(v), f"{v}.0"):
        raise ConfigError(f"{option}={value}: expected a positive integer")
    return v


def check_eval_options(cfg: DictConfig) -> None:
    """``eval.*`` values that would otherwise fail deep inside the first validation."""
    ks = cfg.eval.ks
    if not isinstance(ks, (list, tuple)) and not OmegaConf.is_list(ks) or not ks or any(
            not is_int(k, 1) for k in ks):
        raise ConfigError(f"eval.ks={ks}: expected a list of positive integers, e.g. [5,10,20]")
    check_int(cfg.eval.chunk_size, "eval.chunk_size", 1)  # eval.num_negatives: checked by the DataModule


def check_trainer_options(cfg: DictConfig) -> None:
    for key in ("max_epochs", "max_steps"):
        if cfg.trainer.get(key) is not None:
            check_int(cfg.trainer[key], f"trainer.{key}", -1)  # -1: no limit


def monitor_for_protocol(cfg: DictConfig) -> None:
    """Under ``eval.protocol=sampled`` the ranking metrics are logged as ``sampled_<metric>``: monitor that
    (``val/ndcg@10`` -> ``val/sampled_ndcg@10``, a rocket's ``val/light/ndcg@10`` -> ``val/light/sampled_ndcg@10``)."""
    head, _, metric = str(cfg.eval.monitor).rpartition("/")
    if (cfg.eval.protocol == "sampled" and head.split("/")[0] == "val"
            and metric.split("@")[0] in ("hr", "ndcg", "mrr")):
        cfg.eval.monitor = f"{head}/sampled_{metric}"
