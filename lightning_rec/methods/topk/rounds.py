"""The round: when one ends, what it records, and who hears of it.

A round ends every ``h`` local optimizer steps (every ``warmup_h`` during the first ``warmup_steps``: post-local
SGD, Lin et al., ICLR 2020), and also before each validation and when training ends. Each round is kept in the
strategy's ``history``, logged to the loggers (``topk/round``, ``topk/distance_r<r>``, ``topk/chosen_r<r>``,
``comm/bytes``), appended to ``topk_rounds.jsonl`` in the run folder and printed every ``log_every_rounds``.

Round listeners are the public hook other parts of a fit use to follow the rounds without importing this
package (the EMA callback does): ``strategy.add_round_listener(fn)`` has ``fn(step)`` called on every rank right
after each exchange, when the module holds the new global model; ``step`` counts the optimizer steps taken,
the one that ended the round included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_rec.errors import ConfigError, check_int


class RoundSchedule:
    """When a round ends: after ``h`` local steps, or ``warmup_h`` while fewer than ``warmup_steps`` were taken."""

    def __init__(self, h: int = 32, warmup_steps: int = 0, warmup_h: int = 1) -> None:
        for option, value in (("h", h), ("warmup_h", warmup_h)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"trainer.strategy.{option}={value!r}: expected a positive number of local steps")
        check_int(warmup_steps, "trainer.strategy.warmup_steps", 0)
        self.h, self.warmup_steps, self.warmup_h = h, int(warmup_steps), warmup_h

    def due(self, steps_in_round: int, step: int) -> bool:
        """Whether the round ends after this step (``step``: its 0-based index in the run)."""
        return steps_in_round >= (self.warmup_h if step < self.warmup_steps else self.h)


class RoundListeners:
    """Functions called with the step count after every round (see the module docstring)."""

    def __init__(self) -> None:
        self._fns: list[Callable[[int], None]] = []

    def add(self, fn: Callable[[int], None]) -> None:
        if fn not in self._fns:  # a callback set up for several stages registers once
            self._fns.append(fn)

    def remove(self, fn: Callable[[int], None]) -> None:
        if fn in self._fns:
            self._fns.remove(fn)

    def __call__(self, step: int) -> None:
        for fn in list(self._fns):
            fn(step)


def round_entry(round_: int, step: int, reason: str, chosen: list[int], dists: torch.Tensor,
                comm_bytes: int) -> dict[str, Any]:
    """One round as kept in ``history`` and ``topk_rounds.jsonl``."""
    return {"round": round_, "step": int(step), "reason": reason, "chosen": chosen,
            "distances": [round(float(d), 6) for d in dists], "comm_bytes": int(comm_bytes)}


def report_round(trainer, entry: dict[str, Any], world: int, log_every_rounds: int) -> None:
    """Rank 0: the round to the loggers, to ``topk_rounds.jsonl`` in the run folder, and (now and then) printed."""
    chosen, step, reason = entry["chosen"], entry["step"], entry["reason"]
    metrics = {"topk/round": float(entry["round"]), "comm/bytes": float(entry["comm_bytes"])}
    for r, d in enumerate(entry["distances"]):
        metrics[f"topk/distance_r{r}"] = d
        metrics[f"topk/chosen_r{r}"] = float(r in chosen)
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)
    root = trainer.default_root_dir
    if root and os.path.isdir(root):
        with open(os.path.join(root, "topk_rounds.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
    if entry["round"] % log_every_rounds == 0 or reason != "round":
        dtxt = " ".join(f"{d:.4g}" for d in entry["distances"])
        rank_zero_info(f"top-k round {entry['round']} (step {step}, {reason}): averaged ranks {chosen} of "
                       f"{world}; L2 distance to the global model {dtxt}")
