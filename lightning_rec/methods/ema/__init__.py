"""Exponential moving average of the weights (evaluated and checkpointed beside the raw weights)."""

from lightning_rec.methods.ema.callback import EMACallback

__all__ = ["EMACallback"]
