"""lightning_rec: sequential recommenders on PyTorch Lightning."""

from .data import SeqDataModule
from .module import SeqRecModule

__version__ = "0.1.0"
__all__ = ["SeqDataModule", "SeqRecModule", "__version__"]
