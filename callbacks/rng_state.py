"""Saves and restores the global RNG streams, so a resumed run draws the same dropout masks
and negatives as an uninterrupted one. Stored as plain lists/tensors (``weights_only``-safe)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


class RNGStateCallback(pl.Callback):
    """Keeps python, numpy, torch (and CUDA) RNG states in every checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
