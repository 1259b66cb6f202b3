"""Files a command writes besides checkpoints of a fit: metrics JSON, weights-only checkpoints (atomic)."""

from __future__ import annotations

import os
from typing import Any

from lightning_rec.runs.checkpoint_io import atomic_torch_save


def write_metrics(dest: str | None, results: dict[str, float]) -> None:
    if not dest:
        return
    import json

    tmp = f"{dest}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, dest)


def write_weights(model, src_ckpt: dict[str, Any], out_path: str, extra: dict[str, Any]) -> None:
    """A weights-only checkpoint (what ``test``, ``predict`` and ``init_from`` read), written atomically,
    carrying the source's data settings and id maps."""
    out = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
           "pytorch-lightning_version": src_ckpt.get("pytorch-lightning_version", ""), **extra}
    for key in ("datamodule_hyper_parameters", "datamodule_hparams_name", "SeqDataModule"):
        if key in src_ckpt:
            out[key] = src_ckpt[key]
        atomic_torch_save(out, out_path)
