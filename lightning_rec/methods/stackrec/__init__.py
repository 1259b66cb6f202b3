"""StackRec: double a model's depth by copying its blocks (adjacent or cross stacking)."""

from lightning_rec.methods.stackrec.callback import StackingCallback
from lightning_rec.methods.stackrec.stacking import PRESETS, StackOptions, index_map, options

__all__ = ["PRESETS", "StackOptions", "StackingCallback", "index_map", "options"]
