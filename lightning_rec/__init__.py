"""lightning_rec: sequential recommenders on PyTorch Lightning.

``from lightning_rec import SeqDataModule, SeqRecModule, RocketModule`` (imported on first use).
"""

__version__ = "0.1.0"
__all__ = ["RocketModule", "SeqDataModule", "SeqRecModule", "__version__"]

_LAZY = {
    "SeqDataModule": "lightning_rec.data",
    "SeqRecModule": "lightning_rec.modules",
    "RocketModule": "lightning_rec.methods.rocket",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_rec' has no attribute {name!r}")
