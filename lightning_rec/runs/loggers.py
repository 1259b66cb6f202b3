"""Loggers of a run: CSV, W&B (offline when there is no network, resumed by its saved id)."""

from __future__ import annotations

import contextlib
import os
import socket

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_rec.errors import ConfigError
from lightning_rec.runs.launch import env_rank


def wandb_configured() -> bool:
    """True when W&B credentials or a mode are set up on this machine."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.exists(netrc):
        try:
            with open(netrc) as f:
                return "api.wandb.ai" in f.read()
        except OSError:
            return False
    return False


def wandb_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_loggers(cfg_loggers: DictConfig | None, run_dir: str, resuming: bool) -> list:
    """Instantiate the configured loggers; W&B resolves ``offline: auto`` and resumes its run id."""
    from hydra.utils import instantiate

    loggers = []
    for key, conf in (cfg_loggers or {}).items():
        if conf is None:
            continue
        conf = dict(conf)
        enabled = conf.pop("enabled", True)
        if enabled == "auto":
            enabled = wandb_configured() if "Wandb" in str(conf.get("_target_", "")) else True
        if not enabled:
            continue
        if "Wandb" in str(conf.get("_target_", "")):
            if conf.get("offline", "auto") == "auto":
                conf["offline"] = not wandb_reachable()
                if conf["offline"]:
                    rank_zero_info("W&B: no network, logging offline (sync later with `wandb sync`)")
            if conf["offline"] is True and conf.get("log_model"):
                # W&B refuses log_model with offline=True: keep the run, leave the checkpoints in the run folder.
                rank_zero_warn(f"logger.wandb.log_model={conf['log_model']}: W&B is offline, so checkpoints are not "
                               f"uploaded as artifacts; they stay in {run_dir}/checkpoints")
                conf["log_model"] = False
            id_file = os.path.join(run_dir, "wandb_id.txt")
            if os.path.exists(id_file):
                with open(id_file) as f:
                    conf["id"] = f.read().strip()
                conf["resume"] = "allow"
            else:
                import secrets

                conf["id"] = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
                if env_rank() == 0:  # other ranks of a torchrun/SLURM launch never start a W&B run
                    with open(id_file, "w") as f:
                        f.write(conf["id"])
            if resuming and not os.path.exists(id_file):
                rank_zero_warn("W&B: the resumed run had no W&B id; starting a new W&B run")
        try:
            loggers.append(instantiate(conf))
        except Exception as e:
            raise ConfigError(f"logger.{key}: could not create the logger ({' '.join(str(e).split())[:200]})") from None
    return loggers


def finish_wandb(loggers: list, exit_code: int = 0) -> None:
    """End this run's W&B run, so the next fit in this process (a sweep's next trial) starts its own."""
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=exit_code)


@contextlib.contextmanager
def wandb_failed_on_error(loggers: list):
    """Mark the W&B run failed (exit code 1) and end it when the block raises; the error goes on."""
    try:
        yield
    except BaseException:
        try:
            finish_wandb(loggers, exit_code=1)
        except Exception:  # never hide the real error behind a logging one
            pass
        raise
