"""Run folders, checkpoint lookup and loggers.

A run lives in ``runs_dir/name/<timestamp>/``: ``config.yaml``, ``id_maps.json``,
``checkpoints/`` and the loggers' files. A new run never reuses an existing folder; a
resumed run (``ckpt_path=``) continues in the folder its checkpoint belongs to.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import socket
import time
import zipfile
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_rec.errors import ConfigError
from lightning_rec.runs.launch import env_rank, external_launch

RUN_DIR_ENV = "LIGHTNING_REC_RUN_DIR"  # handed to DDP worker processes so every rank uses one folder


def launched_run_dir(runs_dir: str, name: str, run_dir: str | None) -> str:
    """The shared folder of an externally launched run: rank 0 claims it, the others use it."""
    rank, launch_id = external_launch()  # type: ignore[misc]
    path = run_dir or os.path.join(runs_dir, name.replace("/", "_"), launch_id)
    if rank == 0:
        return claim_run_dir(path, f"launch id {launch_id} was used before; pass run_dir=<new folder> or give "
                                   f"torchrun a fresh --rdzv-id")
    os.makedirs(path, exist_ok=True)
    return path


def stamp() -> str:
    """The timestamp used in run folder and resume-config names."""
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def new_run_dir(runs_dir: str, name: str) -> str:
    """Create and return a fresh run folder; never returns one that already exists."""
    base = os.path.join(runs_dir, name.replace("/", "_"), stamp())
    path, i = base, 0
    while True:
        try:
            os.makedirs(path, exist_ok=False)
            return path
        except FileExistsError:
            i += 1
            path = f"{base}_{i}"
        except OSError as e:  # runs_dir under a file, read-only, ...
            raise ConfigError(f"runs_dir={runs_dir}: cannot create the run folder {path} ({e.strerror}); "
                              f"expected a writable folder") from None


def claim_run_dir(path: str, hint: str | None = None) -> str:
    """Use an explicit ``run_dir``: it must be new or empty, so no earlier run is overwritten."""
    if os.path.isdir(path) and os.listdir(path):
        hint = hint or (f"choose a new folder, or resume it with "
                        f"ckpt_path={os.path.join(path, 'checkpoints', 'last.ckpt')}")
        raise ConfigError(f"run_dir={path}: the folder already holds a run; {hint}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={path}: cannot create it ({e.strerror}); expected a new or empty writable folder") from None
    return path


def find_last_checkpoint(runs_dir: str, name: str | None = None, option: str = "ckpt_path",
                         word: str = "last") -> str:
    """The newest ``last.ckpt`` among the runs named ``name`` under ``runs_dir``.

    Never another name's: its architecture and data would silently replace the ones asked for."""
    if name:
        found = glob.glob(os.path.join(runs_dir, name.replace("/", "_"), "*", "checkpoints", "last*.ckpt"))
        if found:
            return max(found, key=os.path.getmtime)
    others = sorted({os.path.relpath(p, runs_dir).split(os.sep)[0]  # <runs_dir>/<name>/<stamp>/checkpoints/..
                     for p in glob.glob(os.path.join(runs_dir, "*", "*", "checkpoints", "last*.ckpt"))})
    hint = (f"runs with one: {', '.join(others[:8])}{' ...' if len(others) > 8 else ''}; pass name=<one of them> "
            f"or a checkpoint path" if others else "there are none; pass a checkpoint path")
    raise ConfigError(f"{option}={word}: no run named '{name}' under runs_dir={runs_dir} has checkpoints/last.ckpt "
                      f"({hint})")


def recorded_best(run_dir: str) -> str | None:
    """The best checkpoint a finished fit recorded in ``result.json``, looked for in this folder (the record is
    relative to where fit ran, and the folder may have moved); None when there is none."""
    result = os.path.join(run_dir, "result.json")
    if not os.path.isfile(result):
        return None
    with open(result) as f:
        best = json.load(f).get("best_ckpt")
    path = os.path.join(run_dir, "checkpoints", os.path.basename(best)) if best else None
    return path if path and os.path.isfile(path) else None


def find_best_checkpoint(runs_dir: str, name: str | None = None, option: str = "ckpt_path") -> str:
    """The best checkpoint (as ``result.json`` records it) of the newest run named ``name`` that wrote a
    checkpoint (the newest file in its ``checkpoints/``; with or without ``last.ckpt``, which
    ``callbacks.model_checkpoint.save_last=false`` leaves out). Never an older run's: that would silently be
    another model."""
    runs = {}
    if name:
        for ck in glob.glob(os.path.join(runs_dir, name.replace("/", "_"), "*", "checkpoints", "*.ckpt")):
            run = os.path.dirname(os.path.dirname(ck))
            runs[run] = max(runs.get(run, 0.0), os.path.getmtime(ck))
    if not runs:
        find_last_checkpoint(runs_dir, name, option, word="best")  # says which names have runs
    run = max(runs, key=runs.get)
    path = recorded_best(run)
    if path is None:
        raise ConfigError(f"{option}=best: the newest run named '{name}' ({run}) has no recorded best checkpoint "
                          f"(a fit that did not finish, or one with no monitored metric); pass {option}=last or a "
                          f"checkpoint path")
    return path


def resolve_checkpoint(ckpt_path: str, runs_dir: str, name: str | None, prefer: str = "best",
                       option: str = "ckpt_path") -> str:
    """A checkpoint file from ``last``, ``best``, a file, or a run folder (its best checkpoint, as recorded in
    ``result.json``, or with ``prefer="last"`` its ``last.ckpt``: what a resume wants). ``option`` is the
    setting the path came from, named in errors."""
    if ckpt_path == "last":
        return find_last_checkpoint(runs_dir, name, option)
    if ckpt_path == "best":
        if prefer == "last":
            raise ConfigError(f"{option}=best: a resume continues from where the run stopped; use {option}=last "
                              f"(or init_from=best to start a new run from the best weights)")
        return find_best_checkpoint(runs_dir, name, option)
    if os.path.isdir(ckpt_path):
        last = os.path.join(ckpt_path, "checkpoints", "last.ckpt")
        best = recorded_best(ckpt_path) if prefer == "best" else None
        for path in (best, last):
            if path and os.path.isfile(path):
                rank_zero_info(f"{option}={ckpt_path}: a run folder; using {path}")
                return path
        raise ConfigError(f"{option}={ckpt_path}: a folder without checkpoints/last.ckpt; give a run folder or "
                          f"a .ckpt file")
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"{option}={ckpt_path}: no such checkpoint file")
    return ckpt_path


def run_dir_of(ckpt_path: str) -> str | None:
    """The run folder a checkpoint was written into (``<run>/checkpoints/x.ckpt``)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(folder) == "checkpoints":
        return os.path.dirname(folder)
    return None


def load_checkpoint(path: str, option: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) on the CPU; ``option`` names the setting in errors."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # a text file, a CSV, ...
        raise ConfigError(f"{option}={path}: not a checkpoint (expected a .ckpt written by lightning_rec; this file "
                          f"is not a torch archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickle of arbitrary objects, which is never loaded
        raise ConfigError(f"{option}={path}: not a lightning_rec checkpoint (it holds Python objects beyond "
                          f"tensors and plain values)") from None
    except Exception as e:
        raise ConfigError(f"{option}={path}: not a readable lightning_rec checkpoint ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{option}={path}: not a lightning_rec checkpoint (a torch file, but with no state_dict; "
                          f"expected a .ckpt written by fit, stack or export)")
    return ckpt


from lightning_rec.runs.console import print_metrics, quiet  # noqa: E402  (public helpers of this package)
from lightning_rec.runs.loggers import build_loggers, finish_wandb, wandb_failed_on_error  # noqa: E402

__all__ = ["build_loggers", "env_rank", "external_launch", "finish_wandb", "print_metrics", "quiet", "wandb_failed_on_error"]
