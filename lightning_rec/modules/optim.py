"""Optimizer and LR scheduler from config, by ``_target_`` (Hydra's convention), and the schedules of the
``scheduler`` group.

``optimizer: {_target_: torch.optim.AdamW, lr: 1e-3, weight_decay: 0.01}`` builds
``torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)``; any optimizer class works.
``scheduler: {_target_: lightning_rec.modules.optim.warmup_cosine, warmup_steps: 100}`` builds
``warmup_cosine(optimizer, total_steps=<the run's steps>, warmup_steps=100)``, stepped per batch;
a schedule that takes ``total_steps`` gets the run's number of optimizer steps. ``_target_: null``: none.

``optimizer.no_weight_decay: ["*.bias", "*ln*"]`` (fnmatch patterns of parameter names) puts the matching
parameters in a second parameter group with ``weight_decay=0`` (:func:`parameter_groups`); null: one group.

Configs written before ``_target_`` (a ``name:`` key, e.g. in older checkpoints) are read through
:data:`OPTIMIZER_NAMES` and :data:`SCHEDULER_NAMES`.
"""

from __future__ import annotations

import logging

import inspect
import math
from typing import Any

import torch

from lightning_rec.errors import ConfigError

OPTIMIZER_NAMES = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD",
                   "adashift": "lightning_rec.methods.optim_switch.AdaShift"}
SCHEDULER_NAMES = {"none": None, "cosine": "lightning_rec.modules.optim.warmup_cosine",
                   "linear_warmup": "lightning_rec.modules.optim.linear_warmup",
                   "step": "torch.optim.lr_scheduler.StepLR"}


def _target(conf: dict[str, Any], names: dict[str, str | None], group: str, default: str | None) -> str | None:
    if "_target_" in conf:
        return conf["_target_"]
    name = conf.get("name")
    if name is None:
        return default
    if name not in names:
        raise ConfigError(f"{group}.name: unknown {group} '{name}'; expected one of {', '.join(names)} "
                          f"(or give {group}._target_=<module.Class>)")
    return names[name]


def _class(target: str, group: str):
    """The class or function ``target`` names. Hydra's get_class logs an error for a function before
    get_method finds it (scheduler=cosine printed one per lookup), so its logger is quiet here; a failed
    lookup is our one-line error alone."""
    from hydra.utils import get_class, get_method

    logger = logging.getLogger("hydra.utils")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        try:
            return get_class(target)
        except Exception:
            return get_method(target)
    except Exception as e:
        raise ConfigError(f"{group}._target_={target}: cannot import it ({' '.join(str(e).split())[:160]})") from None
    finally:
        logger.setLevel(level)


def _kwargs(conf: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in conf.items() if k not in ("_target_", "name", "no_weight_decay")}
    for key in ("lr", "weight_decay"):  # numbers from the command line may arrive as ints
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    if "betas" in out:
        out["betas"] = tuple(float(b) for b in out["betas"])
    return out


def optimizer_target(conf: dict[str, Any]) -> str:
    """The optimizer class a config names (``_target_``, or an older ``name``)."""
    return str(_target(dict(conf), OPTIMIZER_NAMES, "optimizer", "torch.optim.Adam"))


def parameter_groups(named_params, conf: dict[str, Any]) -> list:
    """The trainable parameters of ``named_params`` (``module.named_parameters()``) as ``build_optimizer`` takes
    them: a flat list, or with ``optimizer.no_weight_decay`` (fnmatch patterns of names) two groups, the rest and
    the matching parameters at ``weight_decay=0``."""
    import fnmatch

    named = [(n, p) for n, p in named_params if p.requires_grad]
    patterns = conf.get("no_weight_decay")
    if not patterns:
        return [p for _, p in named]
    if isinstance(patterns, str) or not all(isinstance(x, str) for x in patterns):
        raise ConfigError(f"optimizer.no_weight_decay={patterns!r}: expected a list of parameter name patterns, "
                          f"e.g. ['*.bias','*ln*']")
    patterns = list(patterns)
    plain = [p for n, p in named if not any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    free = [p for n, p in named if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    if not free:
        raise ConfigError(f"optimizer.no_weight_decay={patterns}: matches no parameter (names look like "
                          f"{', '.join(n for n, _ in named[:3])})")
    return ([{"params": plain}] if plain else []) + [{"params": free, "weight_decay": 0.0}]


def build_optimizer(conf: dict[str, Any], params) -> torch.optim.Optimizer:
    """The optimizer ``conf`` describes, over ``params``; a value it rejects becomes a one-line ConfigError."""
    target = optimizer_target(conf)
    cls = _class(target, "optimizer")
    params = list(params)
    if conf.get("no_weight_decay") and not any(isinstance(p, dict) for p in params):
        raise ConfigError(f"optimizer.no_weight_decay={list(conf['no_weight_decay'])}: this model builds its "
                          f"optimizer from unnamed parameters, so it takes no name patterns (a single model does)")
    try:
        return cls(params, **_kwargs(dict(conf)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer ({target}): {e} (options: {dict(conf)})") from None


def build_scheduler(conf: dict[str, Any], optimizer: torch.optim.Optimizer, total_steps):
    """The per-step LR scheduler ``conf`` describes (None: constant rate); ``total_steps``: an int or a
    function returning it (called only for a schedule that takes ``total_steps``)."""
    target = _target(dict(conf), SCHEDULER_NAMES, "scheduler", None)
    if target is None:
        return None
    fn = _class(str(target), "scheduler")
    kwargs = _kwargs(dict(conf))
    try:
        if "total_steps" in inspect.signature(fn).parameters:
            kwargs.setdefault("total_steps", max(int(total_steps() if callable(total_steps) else total_steps), 1))
        return fn(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"scheduler ({target}): {e} (options: {dict(conf)})") from None


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr at ``total_steps``."""
    warmup, total, floor = int(warmup_steps), int(total_steps), float(min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_warmup(optimizer, warmup_steps: int = 0):
    """Linear warm-up over ``warmup_steps``, then the configured rate."""
    warmup = int(warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup else 1.0)


def check_training_options(optimizer: dict[str, Any], scheduler: dict[str, Any], eval_protocol: str) -> None:
    """One-line errors for the options every module shares (built once on a dummy parameter)."""
    optimizer = dict(optimizer)
    patterns = optimizer.pop("no_weight_decay", None)
    if patterns and (isinstance(patterns, str) or not all(isinstance(x, str) for x in patterns)):
        raise ConfigError(f"optimizer.no_weight_decay={patterns!r}: expected a list of parameter name patterns, "
                          f"e.g. ['*.bias','*ln*']")
    opt = build_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))])
    build_scheduler(scheduler, opt, 1)
    if eval_protocol not in ("full", "sampled"):
        raise ConfigError(f"eval.protocol: '{eval_protocol}' is not one of full, sampled")
