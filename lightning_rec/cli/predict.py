"""``predict``: write the top-K recommendations per user (original ids) as TSV."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec import runs
from lightning_rec.build import build_trainer
from lightning_rec.cli._checkpoint import load_for_eval
from lightning_rec.cli._checks import positive_int
from lightning_rec.errors import ConfigError


def rewrite(overrides: list[str]) -> list[str]:
    """``ckpt=`` as in stack and export: short for ``ckpt_path=``."""
    return ["ckpt_path=" + o.split("=", 1)[1] if o.split("=", 1)[0] == "ckpt" else o for o in overrides]


def predict(cfg: DictConfig, overrides: list[str]) -> str:
    """Write the top-``predict.k`` unseen items for every user, with original ids, as TSV."""
    import pytorch_lightning as pl
    import torch


    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.predict.out and os.path.isdir(cfg.predict.out):
        raise ConfigError(f"predict.out={cfg.predict.out}: a folder; expected a file path, e.g. "
                          f"{os.path.join(cfg.predict.out, 'predictions.tsv')}")
    from lightning_rec.data.datamodule import SeqDataModule

    at = cfg.predict.get("at", "next")
    if at not in SeqDataModule.PREDICT_AT:
        raise ConfigError(f"predict.at={at}: expected one of {', '.join(SeqDataModule.PREDICT_AT)}")
    path, dm, model = load_for_eval(cfg, overrides)
    dm.predict_at = at
    k = positive_int(cfg.predict.k, "predict.k")
    if k > dm.num_items:
        raise ConfigError(f"predict.k={k}: expected 1..{dm.num_items} (the catalogue size)")
    out = cfg.predict.out or os.path.join(runs.run_dir_of(path) or os.path.dirname(os.path.abspath(path)), "predictions.tsv")
    if os.path.exists(out) and not cfg.predict.overwrite:
        raise ConfigError(f"predict.out={out}: file exists; choose another path or pass predict.overwrite=true")
    model.predict_k = k
    if not isinstance(cfg.predict.exclude_seen, bool):
        raise ConfigError(f"predict.exclude_seen={cfg.predict.exclude_seen!r}: expected true or false")
    model.predict_exclude_seen = cfg.predict.exclude_seen  # not the checkpoint's eval.exclude_seen
    if at != "next" and model.hparams.get("eval_protocol") == "sampled":
        print(f"note: the checkpoint's metrics were computed against sampled negatives (eval.protocol=sampled); "
              f"predict.at={at} ranks the whole catalogue", flush=True)
    if at != "next" and bool(model.hparams.get("exclude_seen", True)) != bool(cfg.predict.exclude_seen):
        print(f"note: predict.exclude_seen={cfg.predict.exclude_seen} differs from the checkpoint's "
              f"eval.exclude_seen={model.hparams.get('exclude_seen')}: the lists are not the rankings test scored",
              flush=True)
    if cfg.trainer.get("devices", 1) not in (1, "1", "auto"):
        print("predict runs on one device so that one process writes every user", flush=True)
    cfg.trainer.devices = 1
    cfg.trainer.strategy = "auto"
    trainer = build_trainer(cfg, os.path.dirname(os.path.abspath(out)) or ".", [], [])
    batches = trainer.predict(model, datamodule=dm)
    maps = dm.id_maps()
    users, items = maps["users"], maps["items"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    n = short = 0
    with open(tmp, "w") as f:
        held = at != "next"  # the held-out item the ranking was made for, as in test/validation
        f.write("user\trank\titem\tscore" + ("\theld_out" if held else "") + "\n")
        for b in batches:
            u, it, sc = b["user"].tolist(), b["items"].tolist(), b["scores"].to(torch.float32).tolist()
            for uu, row_i, row_s, t in zip(u, it, sc, b["target"].tolist()):
                got = [(i, s) for i, s in zip(row_i, row_s) if i != 0]  # 0: fewer than k unseen items left
                tail = f"\t{items[t]}\n" if held else "\n"
                for r, (i, s) in enumerate(got, start=1):
                    f.write(f"{users[uu]}\t{r}\t{items[i]}\t{s:.6g}{tail}")
                n += 1
                short += len(got) < k
    os.replace(tmp, out)
    note = f" ({short} of them have fewer than {k} unseen items, and get only those)" if short else ""
    where = {"next": "after each user's whole history", "test": "before each user's test item",
             "valid": "before each user's validation item"}[at]
    print(f"wrote top-{k} recommendations for {n} users ({where}) to {out}{note}", flush=True)
    return out
