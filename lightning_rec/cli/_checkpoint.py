"""What a command takes from a checkpoint: data and evaluation settings, architecture, the model to evaluate."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lightning_rec import runs
from lightning_rec.build import build_datamodule, model_class
from lightning_rec.cli._checks import (
    check_catalogue,
    check_eval_options,
    check_model_fits_data,
    monitor_for_protocol,
)
from lightning_rec.config import override_key, to_plain
from lightning_rec.errors import ConfigError


def data_conf_from_checkpoint(ckpt: dict[str, Any], cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The data settings a checkpoint was trained with, updated by explicit ``data.*`` overrides.

    ``data=<name>`` on the command line replaces them with that dataset's config. The evaluation
    options come from ``cfg.eval``, which :func:`eval_from_checkpoint` has set from the checkpoint.
    """

    composed = to_plain(cfg.data)
    if any(o.startswith("data=") for o in overrides) or "datamodule_hyper_parameters" not in ckpt:
        return composed
    saved = dict(ckpt["datamodule_hyper_parameters"])
    for dk in ("eval_protocol", "eval_negatives", "eval_sampler"):
        saved[dk] = composed[dk]
    for o in overrides:
        key = override_key(o)
        if key.startswith("data."):
            sub = key[len("data."):].split(".")[0]
            saved[sub] = composed.get(sub)
        elif key == "seed":
            saved["seed"] = composed["seed"]
    return saved


def eval_from_checkpoint(cfg: DictConfig, ckpt: dict[str, Any], overrides: list[str]) -> None:
    """How a checkpoint's run was evaluated is part of it (resume, test, predict): every ``eval.*`` setting
    not given on the command line comes from the checkpoint (protocol, ks, seen-item rule, negatives,
    monitored metric)."""
    from lightning_rec.config import set_value

    given = {override_key(o) for o in overrides}
    model_hp = ckpt.get("hyper_parameters") or {}
    data_hp = ckpt.get("datamodule_hyper_parameters") or {}
    sources = {"protocol": model_hp.get("eval_protocol"), "ks": model_hp.get("eval_ks"),
               "exclude_seen": model_hp.get("exclude_seen"), "chunk_size": model_hp.get("eval_chunk_size"),
               "num_negatives": data_hp.get("eval_negatives"), "negative_sampler": data_hp.get("eval_sampler")}
    for key, value in sources.items():
        if value is not None and f"eval.{key}" not in given:
            set_value(cfg, f"eval.{key}", list(value) if key == "ks" else value)
    if "eval.monitor" not in given:
        for name, state in (ckpt.get("callbacks") or {}).items():
            if name.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor"):
                set_value(cfg, "eval.monitor", state["monitor"])
                break
    monitor_for_protocol(cfg)


def eval_overrides(cfg: DictConfig) -> dict[str, Any]:
    return {
        "eval_ks": list(cfg.eval.ks), "exclude_seen": bool(cfg.eval.exclude_seen),
        "eval_protocol": str(cfg.eval.protocol), "eval_chunk_size": int(cfg.eval.chunk_size),
    }


def keep_checkpoint_architecture(cfg: DictConfig, overrides: list[str], model_conf: dict[str, Any], src: str,
                                  resuming: bool) -> None:
    """A resumed run, and one started with init_from, take the architecture from the checkpoint (a resume after
    a StackRec stack is deeper than its command line says). Overrides that ask for another are named in one
    line instead of being dropped silently, and the config saved with the run records what was built."""
    from pytorch_lightning.utilities import rank_zero_info

    from lightning_rec.config import set_value
    from lightning_rec.modules.transfer import ARCH_KEYS

    given = {override_key(o) for o in overrides}
    ignored = []
    for key in ARCH_KEYS:
        if key not in model_conf or key not in cfg.model:
            continue
        if to_plain(cfg.model[key]) != model_conf[key]:
            if f"model.{key}" in given:
                ignored.append(f"model.{key}={to_plain(cfg.model[key])} (it has {model_conf[key]})")
            set_value(cfg, f"model.{key}", model_conf[key])
    if ignored:
        how = ("a resumed run keeps its architecture; start a new run with init_from= to change it" if resuming else
               "init_from keeps the checkpoint's architecture; `stack` it to go deeper")
        rank_zero_info(f"{src}: the architecture comes from the checkpoint, so {', '.join(ignored)} "
                       f"{'is' if len(ignored) == 1 else 'are'} not used ({how})")


def load_for_eval(cfg: DictConfig, overrides: list[str]):

    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path: required, e.g. ckpt_path=runs/.../checkpoints/last.ckpt (or ckpt_path=last)")
    check_eval_options(cfg)
    path = runs.resolve_checkpoint(str(cfg.ckpt_path), cfg.runs_dir, cfg.name)
    ckpt = runs.load_checkpoint(path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path}: not a lightning_rec checkpoint (no hyper_parameters/state_dict)")
    eval_from_checkpoint(cfg, ckpt, overrides)
    dm = build_datamodule(data_conf_from_checkpoint(ckpt, cfg, overrides))
    dm.setup("test")
    check_catalogue(ckpt.get("SeqDataModule"), dm, f"checkpoint {path}")
    if ckpt["hyper_parameters"].get("num_items") != dm.num_items:
        raise ConfigError(f"ckpt_path={path}: model has {ckpt['hyper_parameters'].get('num_items')} items, "
                          f"data {dm.source} has {dm.num_items}")
    cls = model_class(ckpt)
    model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **eval_overrides(cfg))
    if weights_choice(cfg) == "raw":
        if "current_model_state" not in ckpt:
            raise ConfigError(f"weights=raw: {path} holds one set of weights (it was not written with "
                              f"callbacks.ema); drop weights=raw")
        model.load_state_dict(ckpt["current_model_state"])
        print(f"evaluating the raw weights of {path} (weights=raw), not its weight average", flush=True)
    check_model_fits_data(model, dm)
    return path, dm, model


def weights_choice(cfg: DictConfig) -> str:
    """``weights``: which weights of an EMA checkpoint test/predict use ('average' or 'raw')."""
    choice = cfg.get("weights", "average")
    if choice not in ("average", "raw"):
        raise ConfigError(f"weights={choice!r}: expected 'average' (the default) or 'raw'")
    return str(choice)
