"""lightning_rec: sequential recommenders on PyTorch Lightning."""

from .data import SeqDataModule
from .module import SeqRecModule
from .rocket import RocketModule

__version__ = "0.1.0"
__all__ = ["RocketModule", "SeqDataModule", "SeqRecModule", "__version__"]
