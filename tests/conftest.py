import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def sasrec_file(tmp_path):
    """A small SASRec-format file: 60 users, items 1..40, lengths 5..14."""
    rng = np.random.default_rng(1)
    lines = []
    for u in range(1, 61):
        for it in rng.integers(1, 41, size=int(rng.integers(5, 15))):
            lines.append(f"{u} {it}")
    p = tmp_path / "small.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def tiny(tmp_path, *extra, epochs=2):
    """Overrides for a seconds-long CPU run on small synthetic data (or the data= given in extra)."""
    synthetic = not any(e.startswith("data=") for e in extra)
    base = [
        f"runs_dir={tmp_path / 'runs'}",
        "logger=csv",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "data.max_len=20",
        "data.batch_size=32",
        "model.d_model=16",
    ]
    if synthetic:
        base += ["data.synthetic.num_users=200", "data.synthetic.num_items=50"]
    return base + list(extra)


PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods")  # ddp_probe.py, for child processes


def fit_in_processes(tmp_path, *overrides, epochs=2, env=None):
    """``fit`` as a child process (for several ranks) with ``ddp_probe`` importable and its output folder in
    ``PROBE_DIR``; returns that folder once the command has succeeded."""
    import subprocess
    import sys

    probe = tmp_path / "probe"
    probe.mkdir()
    env = {**os.environ, "PROBE_DIR": str(probe), "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "PYTHONPATH": PROBES, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "lightning_rec", "fit", *tiny(tmp_path, *overrides, epochs=epochs)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return probe
