"""Sequence encoders with one interface: ``embed``, ``blocks`` (ModuleList), ``forward -> (B, T, d)``."""

import torch
from torch import nn

from lightning_rec.errors import ConfigError, check_int, is_int
from lightning_rec.models.nextitnet import NextItNet
from lightning_rec.models.sasrec import SASRec

ENCODERS = {"nextitnet": NextItNet, "sasrec": SASRec}


def normal_init_(module: nn.Module, std: float) -> nn.Module:
    """Re-initialise ``module`` as RecBole and the "Gold loss" SASRec code do: every linear,
    convolution and embedding weight ~ N(0, std), biases 0, padding rows 0, LayerNorms 1 and 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def check_init_std(init_std, option: str = "model.init_std") -> float | None:
    if init_std is None:
        return None
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
        raise ConfigError(f"{option}={init_std!r}: expected a positive number (e.g. 0.02) or null for the default init")
    return float(init_std)


def check_shape_options(kw: dict, prefix: str = "model") -> None:
    """One-line errors for sizes and rates that would otherwise fail deep inside torch."""
    for key in ("d_model", "num_blocks", "num_heads", "kernel_size", "max_len", "ffn_dim", "attention_m"):
        if kw.get(key) is not None:
            check_int(kw[key], f"{prefix}.{key}", 1)
    for key in ("dilations", "block_dilations"):
        value = kw.get(key)
        if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0
                                  or not all(is_int(v, 1) for v in value)):
            raise ConfigError(f"{prefix}.{key}={value!r}: expected a non-empty list of integers >= 1, e.g. [1,2,4,8]")
    p = kw.get("dropout")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0):
        raise ConfigError(f"{prefix}.dropout={p!r}: expected a number in [0, 1)")


def build_encoder(arch: str, num_items: int, init_std: float | None = None, **kwargs):
    """Instantiate an encoder by name (``nextitnet`` or ``sasrec``).

    ``init_std``: None keeps each encoder's own initialisation; a number re-initialises it with
    :func:`normal_init_` (0.02 is RecBole's and the "Gold loss" SASRec's). Zero-initialised
    residual alphas stay 0.
    """
    if arch not in ENCODERS:
        raise ConfigError(f"model.arch: unknown model '{arch}'; expected one of {', '.join(ENCODERS)}")
    std = check_init_std(init_std)
    check_shape_options(kwargs)
    enc = ENCODERS[arch](num_items=num_items, **kwargs)
    return enc if std is None else normal_init_(enc, std)


__all__ = ["NextItNet", "SASRec", "ENCODERS", "build_encoder", "normal_init_"]


def block_dilations(encoder: nn.Module) -> list[int] | None:
    """Per-block dilations of a NextItNet encoder (``None`` for models without dilation)."""
    dils = [getattr(b, "dilation", None) for b in encoder.blocks]
    return None if any(d is None for d in dils) else dils
