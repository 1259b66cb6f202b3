"""Checkpoints are written atomically (lightning_rec/runs/checkpoint_io.py)."""

import os

import pytest
import torch
from conftest import tiny

from lightning_rec.cli import run


def fit(tmp_path, *extra, epochs=2):
    return run(["fit", *tiny(tmp_path, *extra, epochs=epochs)])


def test_atomic_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    from lightning_rec.runs.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "c" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(path.parent) == ["last.ckpt"]
