"""Lightning callbacks of lightning_rec (installed as ``lightning_rec.callbacks``)."""

from .data_fraction import DataFractionCallback
from .metrics_printer import MetricsPrinter
from .rng_state import RNGStateCallback
from .stacking import StackingCallback

__all__ = ["DataFractionCallback", "MetricsPrinter", "RNGStateCallback", "StackingCallback"]
