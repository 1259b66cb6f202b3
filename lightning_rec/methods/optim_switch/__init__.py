"""Optimizer switching: AdaShift (decorrelated moments) and the SWATS switch to SGD."""

from lightning_rec.methods.optim_switch.callback import OptimizerSwitchCallback
from lightning_rec.methods.optim_switch.optim import AdaShift

__all__ = ["AdaShift", "OptimizerSwitchCallback"]
