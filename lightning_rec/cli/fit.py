"""``fit``: train (or resume) a model, checkpoint the best and last epochs, then test the best one."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_rec import runs
from lightning_rec.build import build_callbacks, build_datamodule, build_model, build_trainer
from lightning_rec.callbacks.metrics_printer import time_limit_stop
from lightning_rec.cli._checkpoint import (
    data_conf_from_checkpoint,
    eval_from_checkpoint,
    eval_overrides,
    keep_checkpoint_architecture,
)
from lightning_rec.cli._checks import (
    check_catalogue,
    check_eval_options,
    check_model_fits_data,
    check_monitor,
    check_trainer_options,
    monitor_for_protocol,
)
from lightning_rec.config import override_key, set_value, to_plain
from lightning_rec.errors import ConfigError, LightningRecError
from lightning_rec.runs.console import print_metrics
from lightning_rec.runs.loggers import finish_wandb, wandb_failed_on_error
from lightning_rec.runs.outputs import write_metrics


def fit(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train (or resume), then test the best checkpoint.

    Returns ``{"test": metrics, "run_dir", "best_ckpt", "monitor", "best_score", "epochs", "fit_seconds"}``,
    also written to ``<run_dir>/result.json``.
    """

    given = os.environ.get(runs.RUN_DIR_ENV)
    dist_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}
    try:
        return _fit(cfg, overrides)
    except BaseException as e:
        made = os.environ.get(runs.RUN_DIR_ENV)
        keys = {override_key(o) for o in overrides}
        fresh = made and not given and os.path.isdir(made) and not keys & {"ckpt_path", "run_dir"}
        written = [os.path.relpath(os.path.join(d, f), made) for d, _, files in os.walk(made) for f in files] if fresh else []
        # nothing written; or a bad option found while Lightning set up a new run: only its config, id maps and
        # the CSV logger's header, no metrics or checkpoints (a W&B run keeps its folder: it records the failure)
        setup_only = all(os.path.basename(f) in ("config.yaml", "id_maps.json", "hparams.yaml") for f in written)
        if fresh and (not written or (isinstance(e, LightningRecError) and setup_only)):
            import shutil

            shutil.rmtree(made, ignore_errors=True)  # a run that failed before training leaves no folder
            try:
                os.rmdir(os.path.dirname(made))  # nor an empty <runs_dir>/<name>/
            except OSError:
                pass
        raise
    finally:  # also after an error: a later command in this process (or its children) must not reuse the folder
        os.environ.pop(runs.RUN_DIR_ENV, None)
        release_process_group(dist_env)


def release_process_group(env_before: dict[str, str | None]) -> None:
    """After a fit in this process: close the process group a DDP-family strategy opened, and put back the
    variables Lightning's launcher set (MASTER_ADDR/PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE). Left behind,
    a later fit in this process (a sweep, a notebook, a test) or its child processes would find the port
    taken, or take LOCAL_RANK for an external launch and wait forever for ranks nobody starts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass
class _Start:
    """Where a fit starts: its run folder and, when it resumes or starts from weights, what the checkpoint says."""

    run_dir: str
    ckpt_path: str | None = None  # the checkpoint to resume
    saved_model: dict | None = None  # its model hyperparameters
    saved_data_state: dict | None = None  # its catalogue
    averaged: bool = False  # it holds a weight average beside the raw weights
    data_conf: dict | None = None  # its data settings
    init_ckpt: dict | None = None  # init_from's checkpoint


def _fit(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    import pytorch_lightning as pl

    _check_options(cfg)
    start = _start(cfg, overrides)
    os.environ[runs.RUN_DIR_ENV] = start.run_dir  # DDP workers re-run this command; they must share the folder
    set_value(cfg, "run_dir", start.run_dir)
    set_value(cfg, "ckpt_path", start.ckpt_path)
    plain = to_plain(cfg)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(start.data_conf or plain["data"])
    dm.setup("fit")
    if start.ckpt_path:
        check_catalogue(start.saved_data_state, dm, f"checkpoint {start.ckpt_path}")
    model = _model(cfg, overrides, plain, start, dm)
    callbacks = build_callbacks(cfg.callbacks, "callbacks")
    _check_resumed_average(start, callbacks)
    loggers = runs.build_loggers(cfg.logger, start.run_dir, start.ckpt_path is not None)
    trainer = build_trainer(cfg, start.run_dir, callbacks, loggers)
    if trainer.is_global_zero:
        _record_start(cfg, plain, start, dm, model, loggers)
    with wandb_failed_on_error(loggers):  # a fit that raises does not leave its W&B run open
        out = _train_and_test(cfg, trainer, model, dm, start)
    finish_wandb(loggers)
    return out


def _check_options(cfg: DictConfig) -> None:
    """Before a run folder exists: a bad optimizer, scheduler, eval or trainer option leaves nothing behind."""
    from lightning_rec.modules.optim import check_training_options

    monitor_for_protocol(cfg)
    check_training_options(to_plain(cfg.optimizer), to_plain(cfg.scheduler), str(cfg.eval.protocol))
    check_eval_options(cfg)
    check_trainer_options(cfg)
    if cfg.ckpt_path is not None and cfg.get("init_from"):
        raise ConfigError("ckpt_path and init_from are exclusive: ckpt_path resumes a run, init_from starts a new one from weights")


def _start(cfg: DictConfig, overrides: list[str]) -> _Start:
    """The run folder: the resumed checkpoint's, the one the launcher handed down, run_dir=, or a new one."""
    init_ckpt = None
    if cfg.get("init_from"):
        init_ckpt = runs.load_checkpoint(runs.resolve_checkpoint(str(cfg.init_from), cfg.runs_dir, cfg.name, option="init_from"),
                                         "init_from")
        set_value(cfg, "model.arch", (init_ckpt.get("hyper_parameters") or {}).get("arch", cfg.model.arch))
    if cfg.ckpt_path is None:
        run_dir = os.environ.get(runs.RUN_DIR_ENV)
        if not run_dir and runs.external_launch():
            run_dir = runs.launched_run_dir(cfg.runs_dir, cfg.name, cfg.run_dir)
        elif not run_dir:
            run_dir = runs.claim_run_dir(cfg.run_dir) if cfg.run_dir else runs.new_run_dir(cfg.runs_dir, cfg.name)
        return _Start(run_dir, init_ckpt=init_ckpt)
    ckpt_path = runs.resolve_checkpoint(str(cfg.ckpt_path), cfg.runs_dir, cfg.name, prefer="last")
    ckpt = runs.load_checkpoint(ckpt_path)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ConfigError(f"ckpt_path={ckpt_path}: holds weights only (e.g. written by `stack`), not a training "
                          f"state to resume; start a new run from it with init_from={ckpt_path}")
    eval_from_checkpoint(cfg, ckpt, overrides)
    run_dir = os.environ.get(runs.RUN_DIR_ENV) or runs.run_dir_of(ckpt_path)
    if not run_dir:
        run_dir = (runs.launched_run_dir(cfg.runs_dir, cfg.name, None) if runs.external_launch()
                   else runs.new_run_dir(cfg.runs_dir, cfg.name))
    return _Start(run_dir, ckpt_path, ckpt.get("hyper_parameters"), ckpt.get("SeqDataModule"),
                  "current_model_state" in ckpt, data_conf_from_checkpoint(ckpt, cfg, overrides), init_ckpt)


def _model(cfg: DictConfig, overrides: list[str], plain: dict, start: _Start, dm):
    """The model: its architecture from the command line, or from the checkpoint it resumes or starts from."""
    from pytorch_lightning.utilities import rank_zero_info

    from lightning_rec.modules.transfer import architecture, load_initial_weights

    if start.saved_model is not None:
        # Architecture comes from the checkpoint (nanoGPT-style); the training settings from the command line.
        model_conf = dict(start.saved_model)
        model_conf.update({k: plain["model"][k] for k in ("optimizer", "scheduler", "compile") if k in plain["model"]})
        model_conf.update(eval_overrides(cfg))
        model_conf.pop("num_items", None)
    else:
        model_conf = dict(plain["model"])
    new_head = bool(model_conf.pop("new_head", False))
    match_item_ids = bool(model_conf.pop("match_item_ids", False))
    if start.init_ckpt is not None:
        model_conf.update(architecture(start.init_ckpt))  # depth, width, dilations... come from the checkpoint
    if start.saved_model is not None or start.init_ckpt is not None:
        keep_checkpoint_architecture(cfg, overrides, model_conf, start.ckpt_path or str(cfg.init_from),
                                     start.ckpt_path is not None)
    model = build_model(model_conf, dm.num_items)
    if start.init_ckpt is not None:
        rank_zero_info(load_initial_weights(model, start.init_ckpt, dm.id_maps()["items"], new_head, str(cfg.init_from),
                                            match_item_ids))
        start.init_ckpt = None  # the weights are in the model: free the checkpoint
    check_model_fits_data(model, dm)
    if model.hparams.arch == "rocket" and not any(f"/{n}/" in cfg.eval.monitor for n in ("light", "booster")):
        cfg.eval.monitor = cfg.eval.monitor.replace("val/", "val/light/", 1)  # the shipped net picks the best epoch
    check_monitor(cfg, model)
    return model


def _check_resumed_average(start: _Start, callbacks: list) -> None:
    from pytorch_lightning.callbacks import WeightAveraging

    if start.averaged and not any(isinstance(c, WeightAveraging) for c in callbacks):
        # without it Lightning would resume training from the average, not from the raw weights
        raise ConfigError(f"ckpt_path={start.ckpt_path}: the run averaged its weights (EMA); resume it with the same "
                          f"callback, e.g. callbacks=ema, or start a new run from the average with "
                          f"init_from={start.ckpt_path}")


def _record_start(cfg: DictConfig, plain: dict, start: _Start, dm, model, loggers: list) -> None:
    """Rank zero: the run's config, id maps and hyperparameters on disk, and one line saying what trains on what."""
    from pytorch_lightning.utilities import rank_zero_info

    resuming = start.ckpt_path is not None
    cfg_file = os.path.join(start.run_dir, "config.yaml" if not resuming else f"config.resume-{runs.stamp()}.yaml")
    OmegaConf.save(cfg, cfg_file, resolve=True)
    dm.save_id_maps(os.path.join(start.run_dir, "id_maps.json"))
    for lg in loggers:
        lg.log_hyperparams(plain)
    n_params = sum(p.numel() for p in model.parameters())
    what = (model.describe() if hasattr(model, "describe")
            else f"{model.hparams.arch} x{model.hparams.num_blocks} blocks")
    dm.setup("fit")  # cached: the trainer's own setup call reuses it
    n_seq, n_tgt = len(dm.train_set), int((dm.train_set.targets != 0).sum())
    rank_zero_info(
        f"{'resuming' if resuming else 'run'} {start.run_dir}\n"
        f"data: {dm.source} | {dm.num_users} users, {dm.num_items} items | "
        f"training: {n_seq:,} sequences ({dm.hparams.train_windows} windows), {n_tgt:,} targets per epoch | "
        f"model: {what}, {n_params:,} parameters"
    )


def _train_and_test(cfg: DictConfig, trainer, model, dm, start: _Start) -> dict[str, Any]:
    """Fit, test the best checkpoint, and write the outcome to ``result.json``."""
    from pytorch_lightning.utilities import rank_zero_info

    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=start.ckpt_path)
    fit_seconds = time.perf_counter() - t0
    stop = time_limit_stop(trainer)
    complete = trainer.current_epoch - (1 if stop and stop[0] < stop[1] else 0)
    if stop and trainer.is_global_zero:
        limit = to_plain(cfg.trainer.max_time)
        where = (f"{stop[0]} of the {stop[1]} batches into epoch {complete}; the last checkpoint holds that partial "
                 f"epoch" if stop[0] < stop[1] else f"at the end of epoch {complete - 1}")
        rank_zero_info(f"trainer.max_time={limit} stopped the run at step {trainer.global_step}, {where} "
                       f"({complete} complete epochs)")
    early = _early_stop(trainer)
    if early and trainer.is_global_zero:
        rank_zero_info(early[1])
    results: dict[str, float] = {}
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb else ""
    if cfg.test_after_fit and not trainer.interrupted:
        out = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
        results = {k: float(v) for k, v in (out[0] if out else {}).items()}
        if trainer.is_global_zero:
            print_metrics("test", results, best)
            write_metrics(cfg.metrics_out, results)
    if trainer.is_global_zero:
        rank_zero_info(f"run folder: {start.run_dir}")
    best_score = ckpt_cb.best_model_score if ckpt_cb is not None else None
    out = {
        "test": results, "run_dir": start.run_dir, "best_ckpt": best, "monitor": str(cfg.eval.monitor),
        "best_score": float(best_score) if best_score is not None else None,
        "epochs": trainer.current_epoch, "fit_seconds": fit_seconds,
        "epochs_complete": complete, "stopped_by": "max_time" if stop else ("early_stopping" if early else None),
        "stopped_at_step": trainer.global_step if stop or early else None,
    }
    if trainer.is_global_zero:  # the run's outcome, machine-readable (sweeps read it from child processes)
        tmp = os.path.join(start.run_dir, "result.json.tmp")
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, os.path.join(start.run_dir, "result.json"))
    return out


def _early_stop(trainer) -> tuple[int, str] | None:
    """``(epoch, message)`` when an EarlyStopping callback (``callbacks=early_stopping``) ended the run."""
    from pytorch_lightning.callbacks import EarlyStopping

    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            best = float(cb.best_score)
            return cb.stopped_epoch, (
                f"early stopping: {cb.monitor} did not improve by more than {abs(cb.min_delta):g} for {cb.patience} "
                f"validations (best {best:.4f}); stopped after epoch {cb.stopped_epoch} at step {trainer.global_step}")
    return None
