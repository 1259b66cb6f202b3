"""``python -m lightning_rec {fit,test,predict,stack,export,federate} [key=value ...]`` (also ``lightning-rec``).

fit      train a model, checkpoint the best and last epochs, then test the best one
test     evaluate a checkpoint on the test split:      test ckpt_path=<file>  (or ckpt=<file>)
predict  write top-K recommendations per user (original ids): predict ckpt_path=<file> predict.k=10
stack    write a model twice as deep from a trained one: stack ckpt=<file> mode=adjacent|cross out=<file>
         (start training from it with: fit init_from=<file>)
export   write one net of a rocket checkpoint as a standalone model: export ckpt=<file> net=light out=<file>
federate federated training over simulated devices (Flower): federate federation.num_devices=4

Overrides follow Hydra: ``model=nextitnet data=ml-1m data.path=... trainer.max_epochs=50 logger=wandb``.
Add ``--cfg`` to print the composed config and exit.
``fit -m optimizer.lr=1e-3,2e-3 'seed=range(3)'`` runs a sweep: one run per combination, then a
summary table (see :mod:`lightning_rec.cli.sweep`); ``fit -m ... --cfg`` lists the trials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_rec.config import group_options, override_key, to_plain
from lightning_rec.errors import ConfigError, LightningRecError, check_int, is_int

COMMANDS = ("fit", "test", "predict", "stack", "export", "federate")


def _quiet() -> None:
    import pytorch_lightning  # noqa: F401  (its import installs warning filters; ours must come after)

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())


class _NoTips(logging.Filter):
    """Lightning's adverts for its cloud services ("💡 Tip: ... try installing litlogger") on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _precision_for(cfg: DictConfig) -> None:
    """Mixed precision is a GPU feature: on a CPU fall back to 32-bit instead of failing."""
    import torch
    from pytorch_lightning.utilities import rank_zero_info

    prec = str(cfg.trainer.get("precision", "32-true"))
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        rank_zero_info(f"trainer.accelerator={acc}: no GPU on this machine, using the CPU")
        cfg.trainer.accelerator = acc = "cpu"
    on_cpu = acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())
    if on_cpu and ("16" in prec):
        rank_zero_info(f"trainer.precision={prec} needs a GPU; using 32-true on the CPU")
        cfg.trainer.precision = "32-true"


def _instantiate_dict(conf: DictConfig | None, what: str) -> list:
    from hydra.utils import instantiate

    out = []
    for key, c in (conf or {}).items():
        if c is None:
            continue
        if not isinstance(c, DictConfig) or "_target_" not in c:
            hint = (f"select it with {what}={key}" if key in group_options(what) else
                    f"give its class with +{what}.{key}._target_=<module.Class>")
            raise ConfigError(f"{what}.{key}: has no _target_ (the class to build); {hint}")
        try:
            out.append(instantiate(c, _convert_="all"))
        except Exception as e:
            raise _unwrap(e, f"{what}.{key}") from None
    return out


def _unwrap(e: Exception, where: str) -> LightningRecError:
    """Hydra wraps errors raised by constructors; surface ours, summarise the rest in one line."""
    cause = e
    while cause is not None:
        if isinstance(cause, LightningRecError):
            return cause
        cause = cause.__cause__ or cause.__context__
    msg = " ".join(str(e).split())
    if "got an unexpected keyword argument" in msg:
        arg = msg.split("unexpected keyword argument")[-1].strip(" '\".")
        return ConfigError(f"{where}: no option '{arg}'")
    return ConfigError(f"{where}: {msg[:300]}")


def _build_datamodule(data_conf: dict[str, Any]):
    from lightning_rec.data import SeqDataModule

    conf = {k: v for k, v in data_conf.items() if k != "_target_"}
    try:
        return SeqDataModule(**conf)
    except TypeError as e:
        raise ConfigError(f"data: {e}") from None


def _model_class(arch: str | None):
    from lightning_rec.modules.seqrec import SeqRecModule
    from lightning_rec.methods.rocket.module import RocketModule

    return RocketModule if arch == "rocket" else SeqRecModule


def _build_model(model_conf: dict[str, Any], num_items: int):
    conf = {k: v for k, v in model_conf.items() if k != "_target_"}
    try:
        return _model_class(conf.get("arch"))(num_items=num_items, **conf)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None


def _build_trainer(cfg: DictConfig, run_dir: str, callbacks: list, loggers: list):
    from hydra.utils import instantiate

    from lightning_rec.runs.checkpoint_io import AtomicCheckpointIO

    _precision_for(cfg)
    if cfg.trainer.get("use_distributed_sampler", False):
        raise ConfigError("trainer.use_distributed_sampler=true: the data module shards users over ranks itself "
                          "(exact resume, padded evaluation); Lightning's sampler would shard them twice. Leave it "
                          "false")
    if not cfg.trainer.get("enable_progress_bar", True):
        from pytorch_lightning.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    try:
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False,
            default_root_dir=run_dir, plugins=[AtomicCheckpointIO()], _convert_="all",
        )
    except Exception as e:
        raise _unwrap(e, "trainer") from None
    for cb in callbacks:  # callbacks that cannot work with this trainer say so before any worker starts
        if hasattr(cb, "validate_trainer"):
            cb.validate_trainer(trainer)
    return trainer


def _data_conf_from_checkpoint(ckpt: dict[str, Any], cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The data settings a checkpoint was trained with, updated by explicit ``data.*`` overrides.

    ``data=<name>`` on the command line replaces them with that dataset's config. The evaluation
    options come from ``cfg.eval``, which :func:`_eval_from_checkpoint` has set from the checkpoint.
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


def _eval_from_checkpoint(cfg: DictConfig, ckpt: dict[str, Any], overrides: list[str]) -> None:
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
    _monitor(cfg)


def _eval_overrides(cfg: DictConfig) -> dict[str, Any]:
    return {
        "eval_ks": list(cfg.eval.ks), "exclude_seen": bool(cfg.eval.exclude_seen),
        "eval_protocol": str(cfg.eval.protocol), "eval_chunk_size": int(cfg.eval.chunk_size),
    }


def _check_model_fits_data(model, dm) -> None:
    """Errors that would otherwise surface as tracebacks deep inside training."""
    hp = model.hparams
    archs = [hp[role]["arch"] for role in ("booster", "light")] if hp.arch == "rocket" else [hp.arch]
    if "sasrec" in archs and hp.max_len < dm.hparams.max_len:
        raise ConfigError(f"data.max_len={dm.hparams.max_len} is longer than the SASRec position table "
                          f"(model.max_len={hp.max_len}); set data.max_len<={hp.max_len}")


def _check_catalogue(saved: dict[str, Any] | None, dm, what: str) -> None:
    maps = (saved or {}).get("id_maps")
    if maps and maps["items"] != dm.id_maps()["items"]:
        raise ConfigError(
            f"{dm.source}: its item catalogue ({dm.num_items} items) differs from the one {what} was trained on "
            f"({len(maps['items']) - 1} items); use the same data and filters (data.path=, data.min_*)"
        )


def _check_monitor(cfg: DictConfig, model) -> None:
    names = [f"val/{n}" for n in model.metric_names]
    if cfg.eval.monitor not in names:
        raise ConfigError(f"eval.monitor={cfg.eval.monitor}: not a logged metric; expected one of {', '.join(names)}")


def _positive_int(value, option: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if v < 1 or str(value).strip() not in (str(v), f"{v}.0"):
        raise ConfigError(f"{option}={value}: expected a positive integer")
    return v


def _check_eval_options(cfg: DictConfig) -> None:
    """``eval.*`` values that would otherwise fail deep inside the first validation."""
    ks = cfg.eval.ks
    if not isinstance(ks, (list, tuple)) and not OmegaConf.is_list(ks) or not ks or any(
            not is_int(k, 1) for k in ks):
        raise ConfigError(f"eval.ks={ks}: expected a list of positive integers, e.g. [5,10,20]")
    check_int(cfg.eval.chunk_size, "eval.chunk_size", 1)  # eval.num_negatives: checked by the DataModule


def _check_trainer_options(cfg: DictConfig) -> None:
    for key in ("max_epochs", "max_steps"):
        if cfg.trainer.get(key) is not None:
            check_int(cfg.trainer[key], f"trainer.{key}", -1)  # -1: no limit


def _monitor(cfg: DictConfig) -> None:
    """Under ``eval.protocol=sampled`` the ranking metrics are logged as ``sampled_<metric>``: monitor that
    (``val/ndcg@10`` -> ``val/sampled_ndcg@10``, a rocket's ``val/light/ndcg@10`` -> ``val/light/sampled_ndcg@10``)."""
    head, _, metric = str(cfg.eval.monitor).rpartition("/")
    if (cfg.eval.protocol == "sampled" and head.split("/")[0] == "val"
            and metric.split("@")[0] in ("hr", "ndcg", "mrr")):
        cfg.eval.monitor = f"{head}/sampled_{metric}"


# ---------------------------------------------------------------------- fit
def _keep_checkpoint_architecture(cfg: DictConfig, overrides: list[str], model_conf: dict[str, Any], src: str,
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


def fit(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train (or resume), then test the best checkpoint.

    Returns ``{"test": metrics, "run_dir", "best_ckpt", "monitor", "best_score", "epochs", "fit_seconds"}``,
    also written to ``<run_dir>/result.json``.
    """
    from lightning_rec import runs

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
        _release_process_group(dist_env)


def _release_process_group(env_before: dict[str, str | None]) -> None:
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


def _fit(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    import time

    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info

    from lightning_rec import runs
    from lightning_rec.config import set_value

    _monitor(cfg)
    from lightning_rec.modules.seqrec import check_training_options

    # before a run folder exists: a bad optimizer, scheduler or eval option leaves nothing behind
    check_training_options(to_plain(cfg.optimizer), to_plain(cfg.scheduler), str(cfg.eval.protocol))
    _check_eval_options(cfg)
    _check_trainer_options(cfg)
    resuming = cfg.ckpt_path is not None
    if resuming and cfg.get("init_from"):
        raise ConfigError("ckpt_path and init_from are exclusive: ckpt_path resumes a run, init_from starts a new one from weights")
    ckpt_path = None
    saved_model = None
    saved_data_state = None
    averaged = False  # the checkpoint to resume holds a weight average beside the raw weights
    init_ckpt = None
    if cfg.get("init_from"):
        init_ckpt = runs.load_checkpoint(runs.resolve_checkpoint(str(cfg.init_from), cfg.runs_dir, cfg.name, option="init_from"),
                                         "init_from")
        set_value(cfg, "model.arch", (init_ckpt.get("hyper_parameters") or {}).get("arch", cfg.model.arch))
    if resuming:
        ckpt_path = runs.resolve_checkpoint(str(cfg.ckpt_path), cfg.runs_dir, cfg.name, prefer="last")
        ckpt = runs.load_checkpoint(ckpt_path)
        if "optimizer_states" not in ckpt or "loops" not in ckpt:
            raise ConfigError(f"ckpt_path={ckpt_path}: holds weights only (e.g. written by `stack`), not a training "
                              f"state to resume; start a new run from it with init_from={ckpt_path}")
        averaged = "current_model_state" in ckpt
        saved_model = ckpt.get("hyper_parameters")
        saved_data_state = ckpt.get("SeqDataModule")
        _eval_from_checkpoint(cfg, ckpt, overrides)
        run_dir = os.environ.get(runs.RUN_DIR_ENV) or runs.run_dir_of(ckpt_path)
        if not run_dir:
            run_dir = (runs.launched_run_dir(cfg.runs_dir, cfg.name, None) if runs.external_launch()
                       else runs.new_run_dir(cfg.runs_dir, cfg.name))
        data_conf = _data_conf_from_checkpoint(ckpt, cfg, overrides)
        del ckpt
    else:
        run_dir = os.environ.get(runs.RUN_DIR_ENV)
        if not run_dir and runs.external_launch():
            run_dir = runs.launched_run_dir(cfg.runs_dir, cfg.name, cfg.run_dir)
        elif not run_dir:
            run_dir = runs.claim_run_dir(cfg.run_dir) if cfg.run_dir else runs.new_run_dir(cfg.runs_dir, cfg.name)
        data_conf = None
    os.environ[runs.RUN_DIR_ENV] = run_dir  # DDP workers re-run this command; they must share the folder
    set_value(cfg, "run_dir", run_dir)
    set_value(cfg, "ckpt_path", ckpt_path)
    plain = to_plain(cfg)
    data_conf = data_conf or plain["data"]

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = _build_datamodule(data_conf)
    dm.setup("fit")
    if resuming:
        _check_catalogue(saved_data_state, dm, f"checkpoint {ckpt_path}")
    if saved_model is not None:
        # Architecture comes from the checkpoint (nanoGPT-style); the training settings from the command line.
        model_conf = dict(saved_model)
        model_conf.update({k: plain["model"][k] for k in ("optimizer", "scheduler", "compile") if k in plain["model"]})
        model_conf.update(_eval_overrides(cfg))
        model_conf.pop("num_items", None)
    else:
        model_conf = dict(plain["model"])
    new_head = bool(model_conf.pop("new_head", False))
    match_item_ids = bool(model_conf.pop("match_item_ids", False))
    if init_ckpt is not None:
        from lightning_rec.modules.transfer import architecture

        model_conf.update(architecture(init_ckpt))  # depth, width, dilations... come from the checkpoint
    if saved_model is not None or init_ckpt is not None:
        _keep_checkpoint_architecture(cfg, overrides, model_conf, ckpt_path or str(cfg.init_from), resuming)
    model = _build_model(model_conf, dm.num_items)
    if init_ckpt is not None:
        from lightning_rec.modules.transfer import load_initial_weights

        rank_zero_info(load_initial_weights(model, init_ckpt, dm.id_maps()["items"], new_head, str(cfg.init_from),
                                            match_item_ids))
        del init_ckpt
    _check_model_fits_data(model, dm)
    if model.hparams.arch == "rocket" and not any(f"/{n}/" in cfg.eval.monitor for n in ("light", "booster")):
        cfg.eval.monitor = cfg.eval.monitor.replace("val/", "val/light/", 1)  # the shipped net picks the best epoch
    _check_monitor(cfg, model)
    callbacks = _instantiate_dict(cfg.callbacks, "callbacks")
    if averaged:
        from pytorch_lightning.callbacks import WeightAveraging

        if not any(isinstance(c, WeightAveraging) for c in callbacks):
            # without it Lightning would resume training from the average, not from the raw weights
            raise ConfigError(f"ckpt_path={ckpt_path}: the run averaged its weights (EMA); resume it with the same "
                              f"callback, e.g. callbacks=ema, or start a new run from the average with "
                              f"init_from={ckpt_path}")
    loggers = runs.build_loggers(cfg.logger, run_dir, resuming)
    trainer = _build_trainer(cfg, run_dir, callbacks, loggers)

    if trainer.is_global_zero:
        cfg_file = os.path.join(run_dir, "config.yaml" if not resuming else f"config.resume-{runs.stamp()}.yaml")
        OmegaConf.save(cfg, cfg_file, resolve=True)
        dm.save_id_maps(os.path.join(run_dir, "id_maps.json"))
        for lg in loggers:
            lg.log_hyperparams(plain)
        n_params = sum(p.numel() for p in model.parameters())
        what = (model.describe() if hasattr(model, "describe")
                else f"{model.hparams.arch} x{model.hparams.num_blocks} blocks")
        dm.setup("fit")  # cached: the trainer's own setup call reuses it
        n_seq, n_tgt = len(dm.train_set), int((dm.train_set.targets != 0).sum())
        rank_zero_info(
            f"{'resuming' if resuming else 'run'} {run_dir}\n"
            f"data: {dm.source} | {dm.num_users} users, {dm.num_items} items | "
            f"training: {n_seq:,} sequences ({dm.hparams.train_windows} windows), {n_tgt:,} targets per epoch | "
            f"model: {what}, {n_params:,} parameters"
        )
    with _wandb_failed_on_error(loggers):  # a fit that raises does not leave its W&B run open
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - t0
        results: dict[str, float] = {}
        ckpt_cb = trainer.checkpoint_callback
        best = ckpt_cb.best_model_path if ckpt_cb else ""
        if cfg.test_after_fit and not trainer.interrupted:
            out = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
            results = {k: float(v) for k, v in (out[0] if out else {}).items()}
            if trainer.is_global_zero:
                _print_metrics("test", results, best)
                _write_metrics(cfg.metrics_out, results)
        if trainer.is_global_zero:
            rank_zero_info(f"run folder: {run_dir}")
        best_score = ckpt_cb.best_model_score if ckpt_cb is not None else None
        out = {
            "test": results, "run_dir": run_dir, "best_ckpt": best, "monitor": str(cfg.eval.monitor),
            "best_score": float(best_score) if best_score is not None else None,
            "epochs": trainer.current_epoch, "fit_seconds": fit_seconds,
        }
        if trainer.is_global_zero:  # the run's outcome, machine-readable (sweeps read it from child processes)
            tmp = os.path.join(run_dir, "result.json.tmp")
            with open(tmp, "w") as f:
                json.dump(out, f, indent=1)
            os.replace(tmp, os.path.join(run_dir, "result.json"))
    _finish_wandb(loggers)
    return out


def _wait_for_server(address: str, seconds: float) -> None:
    """Block until something listens at ``host:port`` (a server started just before its clients takes a while)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"federation.server_address={address}: expected host:port")
    deadline, said = time.monotonic() + seconds, False
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"federation.server_address={address}: no server answered within {seconds:g} s; start "
                                  f"`federate federation.engine=server` first (or raise federation.wait_for_server)") from None
            if not said:
                print(f"waiting for the federation server at {address} (up to {seconds:g} s)", flush=True)
                said = True
            time.sleep(1)


def _finish_wandb(loggers: list, exit_code: int = 0) -> None:
    """End this run's W&B run, so the next fit in this process (a sweep's next trial) starts its own."""
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=exit_code)


@contextlib.contextmanager
def _wandb_failed_on_error(loggers: list):
    """Mark the W&B run failed (exit code 1) and end it when the block raises; the error goes on."""
    try:
        yield
    except BaseException:
        try:
            _finish_wandb(loggers, exit_code=1)
        except Exception:  # never hide the real error behind a logging one
            pass
        raise


def _print_metrics(stage: str, metrics: dict[str, float], ckpt: str | None) -> None:
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    lines = [f"{stage} metrics" + (f" ({ckpt})" if ckpt else "") + ":"]
    lines += [f"  {k:<22} {metrics[k]:.4f}" for k in keys]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------- test / predict
def _load_for_eval(cfg: DictConfig, overrides: list[str]):
    from lightning_rec import runs

    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path: required, e.g. ckpt_path=runs/.../checkpoints/last.ckpt (or ckpt_path=last)")
    _check_eval_options(cfg)
    path = runs.resolve_checkpoint(str(cfg.ckpt_path), cfg.runs_dir, cfg.name)
    ckpt = runs.load_checkpoint(path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path}: not a lightning_rec checkpoint (no hyper_parameters/state_dict)")
    _eval_from_checkpoint(cfg, ckpt, overrides)
    dm = _build_datamodule(_data_conf_from_checkpoint(ckpt, cfg, overrides))
    dm.setup("test")
    _check_catalogue(ckpt.get("SeqDataModule"), dm, f"checkpoint {path}")
    if ckpt["hyper_parameters"].get("num_items") != dm.num_items:
        raise ConfigError(f"ckpt_path={path}: model has {ckpt['hyper_parameters'].get('num_items')} items, "
                          f"data {dm.source} has {dm.num_items}")
    cls = _model_class(ckpt["hyper_parameters"].get("arch"))
    model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **_eval_overrides(cfg))
    if _weights_choice(cfg) == "raw":
        if "current_model_state" not in ckpt:
            raise ConfigError(f"weights=raw: {path} holds one set of weights (it was not written with "
                              f"callbacks.ema); drop weights=raw")
        model.load_state_dict(ckpt["current_model_state"])
        print(f"evaluating the raw weights of {path} (weights=raw), not its weight average", flush=True)
    _check_model_fits_data(model, dm)
    return path, dm, model


def _weights_choice(cfg: DictConfig) -> str:
    """``weights``: which weights of an EMA checkpoint test/predict use ('average' or 'raw')."""
    choice = cfg.get("weights", "average")
    if choice not in ("average", "raw"):
        raise ConfigError(f"weights={choice!r}: expected 'average' (the default) or 'raw'")
    return str(choice)


def test(cfg: DictConfig, overrides: list[str]) -> dict[str, float]:
    """Evaluate a checkpoint on the test split and print the metrics."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    path, dm, model = _load_for_eval(cfg, overrides)
    trainer = _build_trainer(cfg, os.path.dirname(os.path.abspath(path)), [], [])
    out = trainer.test(model, datamodule=dm, verbose=False)
    results = {k: float(v) for k, v in (out[0] if out else {}).items()}
    if trainer.is_global_zero:
        _print_metrics("test", results, path)
        _write_metrics(cfg.metrics_out, results)
    return results


def _write_metrics(dest: str | None, results: dict[str, float]) -> None:
    if not dest:
        return
    import json

    tmp = f"{dest}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, dest)


def predict(cfg: DictConfig, overrides: list[str]) -> str:
    """Write the top-``predict.k`` unseen items for every user, with original ids, as TSV."""
    import pytorch_lightning as pl
    import torch

    from lightning_rec import runs

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.predict.out and os.path.isdir(cfg.predict.out):
        raise ConfigError(f"predict.out={cfg.predict.out}: a folder; expected a file path, e.g. "
                          f"{os.path.join(cfg.predict.out, 'predictions.tsv')}")
    path, dm, model = _load_for_eval(cfg, overrides)
    k = _positive_int(cfg.predict.k, "predict.k")
    if k > dm.num_items:
        raise ConfigError(f"predict.k={k}: expected 1..{dm.num_items} (the catalogue size)")
    out = cfg.predict.out or os.path.join(runs.run_dir_of(path) or os.path.dirname(os.path.abspath(path)), "predictions.tsv")
    if os.path.exists(out) and not cfg.predict.overwrite:
        raise ConfigError(f"predict.out={out}: file exists; choose another path or pass predict.overwrite=true")
    model.predict_k = k
    if not isinstance(cfg.predict.exclude_seen, bool):
        raise ConfigError(f"predict.exclude_seen={cfg.predict.exclude_seen!r}: expected true or false")
    model.predict_exclude_seen = cfg.predict.exclude_seen  # not the checkpoint's eval.exclude_seen
    if cfg.trainer.get("devices", 1) not in (1, "1", "auto"):
        print("predict runs on one device so that one process writes every user", flush=True)
    cfg.trainer.devices = 1
    cfg.trainer.strategy = "auto"
    trainer = _build_trainer(cfg, os.path.dirname(os.path.abspath(out)) or ".", [], [])
    batches = trainer.predict(model, datamodule=dm)
    maps = dm.id_maps()
    users, items = maps["users"], maps["items"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    n = short = 0
    with open(tmp, "w") as f:
        f.write("user\trank\titem\tscore\n")
        for b in batches:
            u, it, sc = b["user"].tolist(), b["items"].tolist(), b["scores"].to(torch.float32).tolist()
            for uu, row_i, row_s in zip(u, it, sc):
                got = [(i, s) for i, s in zip(row_i, row_s) if i != 0]  # 0: fewer than k unseen items left
                for r, (i, s) in enumerate(got, start=1):
                    f.write(f"{users[uu]}\t{r}\t{items[i]}\t{s:.6g}\n")
                n += 1
                short += len(got) < k
    os.replace(tmp, out)
    note = f" ({short} of them have fewer than {k} unseen items, and get only those)" if short else ""
    print(f"wrote top-{k} recommendations for {n} users to {out}{note}", flush=True)
    return out


# ---------------------------------------------------------------------- stack
def _write_weights(model, src_ckpt: dict[str, Any], out_path: str, extra: dict[str, Any]) -> None:
    """A weights-only checkpoint (what ``test``, ``predict`` and ``init_from`` read), written atomically,
    carrying the source's data settings and id maps."""
    out = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
           "pytorch-lightning_version": src_ckpt.get("pytorch-lightning_version", ""), **extra}
    for key in ("datamodule_hyper_parameters", "datamodule_hparams_name", "SeqDataModule"):
        if key in src_ckpt:
            out[key] = src_ckpt[key]
    from lightning_rec.runs.checkpoint_io import atomic_torch_save

    atomic_torch_save(out, out_path)


STACK_ALIASES = ("ckpt", "out", "mode", "preset", "times", "overwrite", "copy_layernorm", "copy_alpha", "zero_new_alpha",
                 "keep_dilation", "copy_head")


def stack(cfg: DictConfig, overrides: list[str]) -> str:
    """Write a deeper model from a trained checkpoint: ``stack ckpt=a.ckpt mode=adjacent out=b.ckpt``."""

    from lightning_rec import runs
    from lightning_rec.modules.seqrec import SeqRecModule
    from lightning_rec.methods.stackrec.stacking import check_stackable, describe, options, preservation_caveat

    sc = cfg.stack
    if not sc.ckpt or not sc.out:
        raise ConfigError("stack: needs ckpt=<trained.ckpt> and out=<deeper.ckpt> (and optionally mode=adjacent|cross)")
    src = runs.resolve_checkpoint(str(sc.ckpt), cfg.runs_dir, cfg.name, option="ckpt")
    if os.path.exists(sc.out) and not sc.overwrite:
        raise ConfigError(f"out={sc.out}: file exists; choose another path or pass overwrite=true")
    times = _positive_int(sc.times, "times")
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
        model.stack(opts)
    _write_weights(model, ckpt, sc.out, {"stacked_from": os.path.abspath(src),
                                         "stacking": describe(opts) | {"times": times}})
    n = sum(p.numel() for p in model.parameters())
    flags = ", ".join(f"{k}={str(sc[k]).lower()}" for k in STACK_ALIASES[6:] if sc[k] is not None)
    print(f"stacked {src}: {before} -> {len(model.encoder.blocks)} blocks ({sc.mode}, {sc.preset or 'custom'}"
          f"{' with ' + flags if flags else ''}), "
          f"{n:,} parameters -> {sc.out}", flush=True)
    return sc.out


# ---------------------------------------------------------------------- export
EXPORT_ALIASES = ("ckpt", "net", "out", "overwrite", "latency_users")


def export(cfg: DictConfig, overrides: list[str]) -> str:
    """Write one net of a rocket checkpoint as a standalone model; print its size and latency."""
    import torch

    from lightning_rec import runs
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
    _write_weights(model, ckpt, ec.out, {"exported_from": {"ckpt": os.path.abspath(src), "net": ec.net}})
    users = _positive_int(ec.latency_users, "latency_users")
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


# ---------------------------------------------------------------------- entry point
def run(argv: list[str]) -> Any:
    """Run one command; raises :class:`LightningRecError` on bad input."""
    from lightning_rec.config import load_config

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}'; expected one of {', '.join(COMMANDS)} (see --help)")
    show_cfg = "--cfg" in rest
    multirun = any(a in ("-m", "--multirun") for a in rest)
    overrides = [a for a in rest if a not in ("--cfg", "-m", "--multirun")]
    if any(a.startswith("-") and not a.startswith("~") for a in overrides):
        flag = next(a for a in overrides if a.startswith("-"))
        raise ConfigError(f"unknown flag '{flag}'; commands take key=value overrides, --cfg and (fit) -m")
    if multirun:
        if command != "fit":
            raise ConfigError(f"-m (sweep) is for fit; `{command}` runs once")
        from lightning_rec.cli.sweep import run_sweep

        return run_sweep(overrides, show_only=show_cfg)
    if any(a.startswith("sweep.") for a in overrides):
        raise ConfigError("sweep.* options belong to sweeps: add -m (e.g. `fit -m sweep.dir=<sweep folder>`)")
    if command == "stack":  # `stack ckpt=... mode=... out=...` is short for stack.ckpt=...
        overrides = [f"stack.{o}" if o.split("=", 1)[0] in STACK_ALIASES else o for o in overrides]
    if command == "export":
        overrides = [f"export.{o}" if o.split("=", 1)[0] in EXPORT_ALIASES else o for o in overrides]
    if command in ("test", "predict"):  # `ckpt=` as in stack and export
        overrides = ["ckpt_path=" + o.split("=", 1)[1] if o.split("=", 1)[0] == "ckpt" else o for o in overrides]
    cfg = load_config(overrides)
    if _weights_choice(cfg) != "average" and command not in ("test", "predict"):
        raise ConfigError(f"weights={cfg.weights}: chooses the weights `test` and `predict` evaluate; "
                          f"`{command}` does not take it")
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return None
    return {"fit": fit, "test": test, "predict": predict, "stack": stack, "export": export,
            "federate": federate}[command](cfg, overrides)


# ---------------------------------------------------------------------- federate
def federate(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Federated training over simulated devices with Flower (see :mod:`lightning_rec.methods.federated`).

    Returns ``{"run_dir", "history": [per-round dicts], "final": last round's metrics}``.
    """
    import numpy as np
    import torch

    from lightning_rec import runs
    from lightning_rec.methods.federated import split_devices, split_holdout
    from lightning_rec.methods.federated.device import Device, check_local_callbacks
    from lightning_rec.methods.federated.flower import STRATEGIES, _flwr, build_strategy, make_client

    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy={fed.strategy}: expected one of {', '.join(STRATEGIES)}")
    if fed.engine not in ("simulation", "server", "client"):
        raise ConfigError(f"federation.engine={fed.engine}: expected simulation, server or client")
    for key in ("rounds", "local_epochs", "num_devices", "top_m"):
        if not isinstance(fed[key], int) or fed[key] < 1:
            raise ConfigError(f"federation.{key}={fed[key]}: expected a positive integer")
    check_local_callbacks(to_plain(fed.callbacks) or {})
    fl = _flwr()
    plain = to_plain(cfg)
    data_conf, model_conf = plain["data"], dict(plain["model"])
    for key in ("new_head", "match_item_ids"):
        model_conf.pop(key, None)
    if model_conf.get("arch") == "rocket":
        raise ConfigError("federate: model=rocket is not supported; devices train model=sasrec or model=nextitnet")
    full = _build_datamodule(data_conf)
    enc = full.load()
    kept, holdout = split_holdout(enc.num_users, float(fed.holdout_users), cfg.seed)
    if fed.num_devices > len(kept):
        raise ConfigError(f"federation.num_devices={fed.num_devices}: expected at most {len(kept)}, the users left "
                          f"for devices after federation.holdout_users={fed.holdout_users}")
    parts = [kept[p] for p in split_devices(len(kept), fed.num_devices, cfg.seed, fed.skew, fed.alpha,
                                            np.asarray(enc.lengths)[kept])]

    resume_state, start_round = None, 0
    if fed.engine == "client":  # a device keeps its state in its own folder; resume is the server's business
        run_dir = cfg.run_dir or os.path.join(cfg.runs_dir, f"federate-device{fed.device}")
        os.makedirs(run_dir, exist_ok=True)
    elif fed.resume:
        run_dir = str(fed.resume)
        last = os.path.join(run_dir, "federation_last.pt")
        if not os.path.exists(last):
            raise ConfigError(f"federation.resume={run_dir}: no federation_last.pt there (not a federation run folder)")
        resume_state = torch.load(last, map_location="cpu", weights_only=False)
        if resume_state["kind"] != fed.strategy:
            raise ConfigError(f"federation.resume: that run used strategy={resume_state['kind']}, not {fed.strategy}")
        start_round = int(resume_state["round"])
    else:
        run_dir = runs.claim_run_dir(cfg.run_dir) if cfg.run_dir else runs.new_run_dir(
            cfg.runs_dir, f"federate-{fed.strategy}-{cfg.data.name}")
    from lightning_rec.config import set_value

    set_value(cfg, "run_dir", run_dir)
    if fed.engine != "client" and not fed.resume:
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
        with open(os.path.join(run_dir, "devices.json"), "w") as f:
            json.dump({"num_users": int(enc.num_users), "devices": [[int(u) for u in p] for p in parts],
                       "holdout": [int(u) for u in holdout]}, f)
    state_dir = os.path.join(run_dir, "devices")
    _precision_for(cfg)  # no GPU: the CPU, as for fit
    accelerator = str(cfg.trainer.accelerator)
    fail: dict[int, tuple[int, ...]] = {}
    crash: dict[int, tuple[int, ...]] = {}
    for spec in fed.fail or []:
        m = re.fullmatch(r"(\d+):(\d+)(:crash)?", str(spec))
        if not m:
            raise ConfigError(f"federation.fail: '{spec}' is not device:round or device:round:crash "
                              f"(e.g. \"1:2\")")
        if m[3] and fed.engine not in ("client", "server"):
            raise ConfigError(f"federation.fail: '{spec}': a crash (process exit) is for deployment "
                              f"(engine=client); use device:round to make local training fail")
        target = crash if m[3] else fail
        target[int(m[1])] = target.get(int(m[1]), ()) + (int(m[2]),)
    callbacks_conf = to_plain(fed.callbacks) or {}

    def device(d: int) -> Device:
        if not 0 <= d < len(parts):
            raise ConfigError(f"federation.device={d}: expected 0..{len(parts) - 1}")
        return Device(d, parts[d], data_conf, model_conf, fed.local_epochs, state_dir, callbacks_conf,
                      to_plain(fed.distill), accelerator, cfg.seed, eval_users=holdout)

    if fed.engine == "client":
        if fed.device is None:
            raise ConfigError("federation.device: engine=client needs the device this process is (0..N-1)")
        client = make_client(device, int(fed.device), fail.get(int(fed.device), ()), crash.get(int(fed.device), ()))
        _wait_for_server(str(fed.server_address), float(fed.get("wait_for_server", 120)))
        fl.client.start_client(server_address=fed.server_address, client=client.to_client(), insecure=True)
        return {"run_dir": run_dir, "history": [], "final": {}}

    torch.manual_seed(cfg.seed)
    # the test population: held-out users (on no device) when federation.holdout_users > 0, else every user
    everyone = Device(-1, holdout if len(holdout) else np.arange(enc.num_users), data_conf, model_conf, 1, state_dir,
                      accelerator=accelerator)
    initial = {k: v.detach().clone() for k, v in everyone.build_model().state_dict().items()}
    loggers = runs.build_loggers(cfg.logger, run_dir, bool(fed.resume))
    logger = loggers[0] if loggers else None
    if logger is not None and not fed.resume:
        logger.log_hyperparams(plain)
    strategy = build_strategy(
        fed.strategy, num_devices=fed.num_devices, initial_state=initial,
        evaluate_global=lambda state: everyone.evaluate(state, "test"), run_dir=run_dir, k=fed.k, top_m=fed.top_m,
        min_fit_fraction=fed.min_fit_fraction, start_round=start_round, resume_state=resume_state, logger=logger)
    if start_round == 0 and fed.engine != "client":  # round 0: the initial model, the baseline to improve on
        m0 = {f"test_{k.replace('@', '_at_')}": v for k, v in everyone.evaluate(initial, "test").items()}
        strategy.history.append({"round": 0, "bytes_down": 0, "bytes_up": 0, "total_bytes": 0, **m0})
        print(f"round 0 (initial model): test NDCG@10 {m0.get('test_ndcg_at_10', float('nan')):.4f}", flush=True)
    rounds = fed.rounds - start_round
    print(f"federation {run_dir}: {fed.strategy}, {fed.num_devices} devices "
          f"({', '.join(str(len(p)) for p in parts)} users), rounds {start_round + 1}..{fed.rounds}, "
          f"{fed.local_epochs} local epoch(s), engine {fed.engine}; test metrics on "
          f"{f'{len(holdout)} held-out users' if len(holdout) else 'every user'}", flush=True)
    if rounds > 0:
        config = fl.server.ServerConfig(num_rounds=rounds)
        if fed.engine == "server":
            fl.server.start_server(server_address=fed.server_address, config=config, strategy=strategy)
        else:
            _simulate(fl, device, strategy, config, fed.num_devices, fail)
    for lg in loggers:
        lg.finalize("success")
    final = strategy.history[-1] if strategy.history else {}
    print(f"federation finished: round {final.get('round', 0)} of {fed.rounds}; final test NDCG@10 "
          f"{final.get('test_ndcg_at_10', float('nan')):.4f}; {strategy.bytes_down / 1e6:.1f} MB down, "
          f"{strategy.bytes_up / 1e6:.1f} MB up; run folder: {run_dir}", flush=True)
    return {"run_dir": run_dir, "history": strategy.history, "final": final}


def _simulate(fl, device, strategy, config, num_devices: int, fail: dict[int, tuple[int, ...]]) -> None:
    """Flower's simulation engine (Ray backend), one ClientApp for every device."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents
    from flwr.simulation import run_simulation

    from lightning_rec.methods.federated.flower import make_client

    def client_fn(context):
        d = int(context.node_config["partition-id"])
        return make_client(device, d, fail.get(d, ())).to_client()

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=config)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=num_devices,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, min(num_devices, os.cpu_count() or 1)),
                                                 "include_dashboard": False, "log_to_driver": True}})


def main(argv: list[str] | None = None) -> None:
    _quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except LightningRecError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... --help | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
