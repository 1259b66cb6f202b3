"""Checkpoint writing that never leaves a partial file: write a temp file, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints are written to a temporary file in the same folder and moved into
    place with ``os.replace``; an interrupted save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path:  # remote filesystems: Lightning's own transactional save
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
