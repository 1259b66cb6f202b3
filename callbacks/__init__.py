"""Lightning callbacks of lightning_rec (installed as ``lightning_rec.callbacks``)."""

from .metrics_printer import MetricsPrinter
from .rng_state import RNGStateCallback
from .stacking import StackingCallback

__all__ = ["MetricsPrinter", "RNGStateCallback", "StackingCallback"]
