"""``test``: evaluate a checkpoint on the test split: ``test ckpt=<file>``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_rec.build import build_trainer
from lightning_rec.cli._checkpoint import load_for_eval
from lightning_rec.runs.console import print_metrics
from lightning_rec.runs.outputs import write_metrics


def rewrite(overrides: list[str]) -> list[str]:
    """``ckpt=`` as in stack and export: short for ``ckpt_path=``."""
    return ["ckpt_path=" + o.split("=", 1)[1] if o.split("=", 1)[0] == "ckpt" else o for o in overrides]


def test(cfg: DictConfig, overrides: list[str]) -> dict[str, float]:
    """Evaluate a checkpoint on the test split and print the metrics."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    path, dm, model = load_for_eval(cfg, overrides)
    trainer = build_trainer(cfg, os.path.dirname(os.path.abspath(path)), [], [])
    out = trainer.test(model, datamodule=dm, verbose=False)
    results = {k: float(v) for k, v in (out[0] if out else {}).items()}
    if trainer.is_global_zero:
        print_metrics("test", results, path)
        write_metrics(cfg.metrics_out, results)
    return results
