"""Sequence encoders with one interface: ``embed``, ``blocks`` (ModuleList), ``forward -> (B, T, d)``."""

from ..errors import ConfigError
from .nextitnet import NextItNet
from .sasrec import SASRec

ENCODERS = {"nextitnet": NextItNet, "sasrec": SASRec}


def build_encoder(arch: str, num_items: int, **kwargs):
    """Instantiate an encoder by name (``nextitnet`` or ``sasrec``)."""
    if arch not in ENCODERS:
        raise ConfigError(f"model.arch: unknown model '{arch}'; expected one of {', '.join(ENCODERS)}")
    return ENCODERS[arch](num_items=num_items, **kwargs)


__all__ = ["NextItNet", "SASRec", "ENCODERS", "build_encoder"]
