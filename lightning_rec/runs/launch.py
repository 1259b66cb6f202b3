"""Who launched this process: torchrun or SLURM (their rank variables), or nobody."""

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
