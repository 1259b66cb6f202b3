"""Generic Lightning callbacks of lightning_rec (installed as ``lightning_rec.callbacks``).

A method's own callback lives with its method under :mod:`lightning_rec.methods`.
"""

from lightning_rec.callbacks.checkpoint import ModelCheckpoint
from lightning_rec.callbacks.data_fraction import DataFractionCallback
from lightning_rec.callbacks.line_progress import LineProgressBar
from lightning_rec.callbacks.metrics_printer import MetricsPrinter
from lightning_rec.callbacks.rng_state import RNGStateCallback
from lightning_rec.callbacks.timeline import Timeline

__all__ = ["DataFractionCallback", "LineProgressBar", "MetricsPrinter", "ModelCheckpoint", "RNGStateCallback", "Timeline"]
