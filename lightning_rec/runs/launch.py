"""Who launched this process (torchrun or SLURM, by their rank variables, or nobody) and its CPU threads."""

from __future__ import annotations

import os


def external_launch() -> tuple[int, str] | None:
    """``(global rank, launch id)`` when torchrun or SLURM started several processes of this command.

    Lightning's own launcher re-runs the command with :data:`RUN_DIR_ENV` set instead; external
    launchers start every rank at once, so the ranks agree on a folder named after the launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ.get("RANK", "0")), f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return int(os.environ.get("SLURM_PROCID", "0")), f"slurm-{os.environ['SLURM_JOB_ID']}.{step}"
    return None


def env_rank() -> int:
    """This process's global rank as its launcher states it (0 before any launcher ran)."""
    launch = external_launch()
    return launch[0] if launch else 0


def set_threads(threads) -> None:
    """``threads=N``: torch's intra-op CPU threads in this process (each DDP worker re-runs the command, so
    each sets its own); ``None`` leaves torch's default."""
    if threads is None:
        return
    from lightning_rec.errors import ConfigError

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads}: expected a whole number >= 1 (CPU threads per process), or null "
                          f"for torch's default")
    import torch

    torch.set_num_threads(threads)
