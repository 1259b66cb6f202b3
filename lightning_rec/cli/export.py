"""``export``: write a serving bundle, ``export ckpt=m.ckpt format=onnx out=bundle/`` (any checkpoint; a rocket's
light net by default), or one net of a rocket checkpoint as a standalone model, ``export ckpt=r.ckpt net=light
out=l.ckpt``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec import runs
from lightning_rec.cli._checks import positive_int
from lightning_rec.errors import ConfigError
from lightning_rec.runs.outputs import write_weights

EXPORT_ALIASES = ("ckpt", "net", "out", "overwrite", "latency_users", "format", "index", "hnsw_m", "ef_construction",
                  "ef_search", "nlist", "nprobe", "recall_queries", "recall_k")


def rewrite(overrides: list[str]) -> list[str]:
    """``export ckpt=... out=...`` is short for ``export.ckpt=... export.out=...``."""
    return [f"export.{o}" if o.split("=", 1)[0] in EXPORT_ALIASES else o for o in overrides]


def export(cfg: DictConfig, overrides: list[str]) -> str:
    """A serving bundle (``format=onnx|pt2``), else one net of a rocket checkpoint as a standalone model."""
    if cfg.export.get("format") is not None:
        return export_bundle(cfg, overrides)
    return export_net(cfg)


def _source(cfg: DictConfig, needs: str, kind: str) -> tuple[str, dict]:
    """``(path, checkpoint)`` of ``ckpt=``, after the checks both exports share: ckpt and out given (else
    ``needs``), a known net, and no existing ``out`` (a ``kind``) unless overwrite=true."""
    ec = cfg.export
    if not ec.ckpt or not ec.out:
        raise ConfigError(needs)
    if ec.net not in ("light", "booster"):
        raise ConfigError(f"net={ec.net}: expected light or booster")
    src = runs.resolve_checkpoint(str(ec.ckpt), cfg.runs_dir, cfg.name, option="ckpt")
    if os.path.exists(ec.out) and not ec.overwrite:
        raise ConfigError(f"out={ec.out}: {kind} exists; choose another path or pass overwrite=true")
    return src, runs.load_checkpoint(src, "ckpt")


def export_bundle(cfg: DictConfig, overrides: list[str]) -> str:
    """Write the serving bundle folder ``out`` of a checkpoint (a rocket's ``net``, by default the light net)."""
    from lightning_rec.build import model_class
    from lightning_rec.config import override_key
    from lightning_rec.serving.bundle import FORMATS

    ec = cfg.export
    fmt = ec.format
    if fmt == "torchscript":
        raise ConfigError("format=torchscript: torch.jit is deprecated in torch 2.13 (it asks for torch.export); "
                          "use format=pt2 (torch.export, loaded with torch) or format=onnx (onnxruntime, no torch)")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: expected one of {', '.join(FORMATS)} (or leave it out: a light-net checkpoint)")
    src, ckpt = _source(cfg, f"export format={fmt}: needs ckpt=<file> and out=<bundle folder>", "folder")
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or not hp:
        raise ConfigError(f"ckpt={src}: not a lightning_rec checkpoint (no hyper_parameters/state_dict)")
    maps = (ckpt.get("SeqDataModule") or {}).get("id_maps")
    if not maps:
        raise ConfigError(f"ckpt={src}: holds no item id map (a checkpoint written by fit has one); a bundle "
                          f"answers in original ids and needs it")
    model = model_class(ckpt).load_from_checkpoint(src, map_location="cpu", weights_only=True)
    rocket = hp.get("arch") == "rocket"
    if rocket:
        model = model.export_net(ec.net)
    elif "export.net" in {override_key(o) for o in overrides}:  # net= was rewritten to export.net=
        raise ConfigError(f"net={ec.net}: {src} is a single model (net= chooses a rocket's net); drop net=")
    max_len = int((ckpt.get("datamodule_hyper_parameters") or {}).get("max_len") or model.hparams.max_len)
    opts = {k: ec.get(k) for k in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe")}
    info = {"net": ec.net if rocket else None, "source": {
        "ckpt": os.path.abspath(src), "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}}
    print(f"exporting {'the ' + ec.net + ' net of ' if rocket else ''}{src} as a bundle ({fmt})", flush=True)
    from lightning_rec.serving.write import write_bundle

    recall_q = positive_int(ec.recall_queries, "recall_queries")
    recall_k = positive_int(ec.recall_k, "recall_k")
    manifest = write_bundle(model, maps["items"], ec.out, fmt, max_len=max_len, index=ec.index, index_options=opts,
                            exclude_seen=bool(hp.get("exclude_seen", True)), info=info, overwrite=bool(ec.overwrite),
                            recall_queries=recall_q, recall_k=recall_k, seed=int(cfg.seed))
    size = sum(os.path.getsize(os.path.join(ec.out, f)) for f in os.listdir(ec.out))
    print(f"wrote {ec.out} ({size / 2**20:.1f} MiB: {manifest['arch']}, {manifest['num_items']:,} items, d="
          f"{manifest['d_model']}, histories up to {max_len}; encoder parity {manifest['parity_max_abs']:.1e})",
          flush=True)
    print(f"  in Python: from lightning_rec.serving import Bundle; Bundle.load('{ec.out}').recommend(history, k=10)",
          flush=True)
    print(f"  over HTTP: python -m lightning_rec serve bundle={ec.out}", flush=True)
    return ec.out


def export_net(cfg: DictConfig) -> str:
    """Write one net of a rocket checkpoint as a standalone model; print its size and latency."""
    import torch

    from lightning_rec.methods.rocket.module import RocketModule, net_parameters, scoring_latency

    ec = cfg.export
    src, ckpt = _source(cfg, "export: needs ckpt=<rocket.ckpt> and out=<light.ckpt> (and optionally net=light|booster)",
                        "file")
    if (ckpt.get("hyper_parameters") or {}).get("arch") != "rocket":
        raise ConfigError(f"ckpt={src}: not a rocket checkpoint (model=rocket); a single model is already standalone "
                          f"(format=onnx out=<folder> writes a serving bundle of it)")
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
