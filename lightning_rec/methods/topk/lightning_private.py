"""Every private Lightning name top-k averaging relies on, in one place.

Lightning has no public hook for these; ``tests/methods/test_lightning_private.py`` checks each entry of
:data:`PRIVATE_NAMES` against the installed Lightning and fails naming the one that changed.

* ``_TrainingEpochLoop._broadcast_sigterm_tensor``: Lightning broadcasts rank 0's SIGTERM flag before every
  training batch when there are several ranks; :func:`sigterm_check_per_round` makes it once a round.
* ``lightning_fabric.utilities.optimizer._optimizers_to_device``: moves optimizer state restored from a rank's
  own file to the rank's device, as Lightning does for the state it restores itself.
* ``DDPStrategy.setup`` wraps the module in ``DistributedDataParallel`` only through ``configure_ddp`` (public,
  overridden by the top-k strategy to not wrap at all); checked, since a wrapper made elsewhere would bring back
  the per-step gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

# (module, qualified name, parameter names): what the code below calls, with the signature it expects
PRIVATE_NAMES = [
    ("pytorch_lightning.loops.training_epoch_loop", "_TrainingEpochLoop._broadcast_sigterm_tensor", ["self"]),
    ("lightning_fabric.utilities.optimizer", "_optimizers_to_device", ["optimizers", "device"]),
]


def sigterm_check_per_round(trainer, round_start: Callable[[], bool]) -> None:
    """Run Lightning's per-batch SIGTERM broadcast only when ``round_start()`` (all ranks agree on it).

    A rank that receives SIGTERM itself still stops after its current batch (Lightning checks its own flag every
    batch); rank 0's flag reaches the ranks that did not receive it at the start of the next round.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    original = getattr(loop, "_broadcast_sigterm_tensor", None)
    if original is None or getattr(original, "_per_round", False):
        return

    def per_round() -> None:
        if round_start():
            original()

    per_round._per_round = True
    loop._broadcast_sigterm_tensor = per_round


def optimizers_to_device(optimizers, device) -> None:
    """Lightning's own move of optimizer state to ``device``."""
    from lightning_fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)
