"""Lightning callbacks of lightning_rec (installed as ``lightning_rec.callbacks``)."""

from .checkpoint import ModelCheckpoint
from .data_fraction import DataFractionCallback
from .ema import EMACallback
from .hint_loss import HintLossCallback
from .metrics_printer import MetricsPrinter
from .noisy_rank import NoisyRankCallback
from .optimizer_switch import OptimizerSwitchCallback
from .rng_state import RNGStateCallback
from .stacking import StackingCallback
from .timeline import Timeline

__all__ = ["DataFractionCallback", "EMACallback", "ModelCheckpoint", "HintLossCallback", "MetricsPrinter", "NoisyRankCallback", "OptimizerSwitchCallback", "RNGStateCallback", "StackingCallback", "Timeline"]
