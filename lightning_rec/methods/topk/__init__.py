"""Top-k model averaging (topkSVRG) across distributed workers."""

from lightning_rec.methods.topk.metering import MeteredDDPStrategy
from lightning_rec.methods.topk.noisy_rank import NoisyRankCallback
from lightning_rec.methods.topk.strategy import TopKAveragingStrategy

__all__ = ["MeteredDDPStrategy", "NoisyRankCallback", "TopKAveragingStrategy"]
