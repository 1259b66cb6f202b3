"""``stack``: write a model twice as deep from a trained one: ``stack ckpt=a.ckpt mode=adjacent out=b.ckpt``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec import runs
from lightning_rec.cli._checks import positive_int
from lightning_rec.errors import ConfigError
from lightning_rec.runs.outputs import write_weights

STACK_ALIASES = ("ckpt", "out", "mode", "preset", "times", "overwrite", "copy_layernorm", "copy_alpha", "zero_new_alpha",
                 "keep_dilation", "copy_head")


def rewrite(overrides: list[str]) -> list[str]:
    """``stack ckpt=... out=...`` is short for ``stack.ckpt=... stack.out=...``."""
    return [f"stack.{o}" if o.split("=", 1)[0] in STACK_ALIASES else o for o in overrides]


def stack(cfg: DictConfig, overrides: list[str]) -> str:
    """Write a deeper model from a trained checkpoint: ``stack ckpt=a.ckpt mode=adjacent out=b.ckpt``."""

    from lightning_rec.methods.stackrec.stacking import (
        check_stackable,
        describe,
        options,
        preservation_caveat,
        stack_module,
    )
    from lightning_rec.modules.seqrec import SeqRecModule

    sc = cfg.stack
    if not sc.ckpt or not sc.out:
        raise ConfigError("stack: needs ckpt=<trained.ckpt> and out=<deeper.ckpt> (and optionally mode=adjacent|cross)")
    src = runs.resolve_checkpoint(str(sc.ckpt), cfg.runs_dir, cfg.name, option="ckpt")
    if os.path.exists(sc.out) and not sc.overwrite:
        raise ConfigError(f"out={sc.out}: file exists; choose another path or pass overwrite=true")
    times = positive_int(sc.times, "times")
    ckpt = runs.load_checkpoint(src, "ckpt")
    if (ckpt.get("hyper_parameters") or {}).get("arch") == "rocket":
        raise ConfigError(f"ckpt={src}: a rocket checkpoint; export one net first (export ckpt=... net=light out=...)")
    model = SeqRecModule.load_from_checkpoint(src, map_location="cpu", weights_only=True)
    opts = options(sc.mode, sc.preset, copy_layernorm=sc.copy_layernorm, copy_alpha=sc.copy_alpha,
                   zero_new_alpha=sc.zero_new_alpha, keep_dilation=sc.keep_dilation, copy_head=sc.copy_head)
    check_stackable(model.encoder, opts, where="stack.")
    caveat = preservation_caveat(model.encoder, opts)
    if caveat:
        print(caveat, flush=True)
    before = len(model.encoder.blocks)
    for _ in range(times):
        stack_module(model, opts)
    write_weights(model, ckpt, sc.out, {"stacked_from": os.path.abspath(src),
                                         "stacking": describe(opts) | {"times": times}})
    n = sum(p.numel() for p in model.parameters())
    flags = ", ".join(f"{k}={str(sc[k]).lower()}" for k in STACK_ALIASES[6:] if sc[k] is not None)
    print(f"stacked {src}: {before} -> {len(model.encoder.blocks)} blocks ({sc.mode}, {sc.preset or 'custom'}"
          f"{' with ' + flags if flags else ''}), "
          f"{n:,} parameters -> {sc.out}", flush=True)
    return sc.out
