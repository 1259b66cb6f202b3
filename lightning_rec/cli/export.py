"""``export``: write one net of a rocket checkpoint as a standalone model: ``export ckpt=r.ckpt net=light out=l.ckpt``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec import runs
from lightning_rec.cli._checks import positive_int
from lightning_rec.errors import ConfigError
from lightning_rec.runs.outputs import write_weights

EXPORT_ALIASES = ("ckpt", "net", "out", "overwrite", "latency_users")


def rewrite(overrides: list[str]) -> list[str]:
    """``export ckpt=... out=...`` is short for ``export.ckpt=... export.out=...``."""
    return [f"export.{o}" if o.split("=", 1)[0] in EXPORT_ALIASES else o for o in overrides]


def export(cfg: DictConfig, overrides: list[str]) -> str:
    """Write one net of a rocket checkpoint as a standalone model; print its size and latency."""
    import torch

    from lightning_rec.methods.rocket.module import RocketModule, net_parameters, scoring_latency

    ec = cfg.export
    if not ec.ckpt or not ec.out:
        raise ConfigError("export: needs ckpt=<rocket.ckpt> and out=<light.ckpt> (and optionally net=light|booster)")
    if ec.net not in ("light", "booster"):
        raise ConfigError(f"net={ec.net}: expected light or booster")
    src = runs.resolve_checkpoint(str(ec.ckpt), cfg.runs_dir, cfg.name, option="ckpt")
    if os.path.exists(ec.out) and not ec.overwrite:
        raise ConfigError(f"out={ec.out}: file exists; choose another path or pass overwrite=true")
    ckpt = runs.load_checkpoint(src, "ckpt")
    if (ckpt.get("hyper_parameters") or {}).get("arch") != "rocket":
        raise ConfigError(f"ckpt={src}: not a rocket checkpoint (model=rocket); a single model is already standalone")
    rocket = RocketModule.load_from_checkpoint(src, map_location="cpu", weights_only=True)
    nets = {name: rocket.export_net(name) for name in ("light", "booster")}
    model = nets[ec.net]
    write_weights(model, ckpt, ec.out, {"exported_from": {"ckpt": os.path.abspath(src), "net": ec.net}})
    users = positive_int(ec.latency_users, "latency_users")
    length = int((ckpt.get("datamodule_hyper_parameters") or {}).get("max_len") or rocket.hparams.max_len)
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(1, rocket.num_items + 1, (users, length), generator=gen)
    lat = {name: scoring_latency(m, items) for name, m in nets.items()}
    size = {name: net_parameters(m) for name, m in nets.items()}
    print(f"exported the {ec.net} net of {src} -> {ec.out}", flush=True)
    for name in ("light", "booster"):
        print(f"  {name:<8} {size[name]:>12,} parameters   {lat[name] * 1e3:8.1f} ms per batch of {users} users "
              f"(history length {length}, full ranking, CPU threads {torch.get_num_threads()})", flush=True)
    print(f"  light / booster: {size['light'] / size['booster']:.2f}x parameters, "
          f"{lat['light'] / lat['booster']:.2f}x latency", flush=True)
    return ec.out
