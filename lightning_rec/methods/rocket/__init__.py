"""Rocket Launching: a booster and a light net trained together; only the light net ships."""

from lightning_rec.methods.rocket.hint_loss import HintLossCallback
from lightning_rec.methods.rocket.module import RocketModule

__all__ = ["HintLossCallback", "RocketModule"]
