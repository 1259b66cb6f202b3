"""StackRec (Wang et al., SIGIR 2021): double a model's depth by copying its blocks.

Index maps for new block ``i`` of ``2L`` (0-based), taking old block ``j``:

- adjacent: ``j = i // 2``   (B0 B0 B1 B1 ...); the copy is the second of each pair
- cross:    ``j = i mod L``  (B0 ... B(L-1) B0 ... B(L-1)); the copies are the second half

What is carried over is set by flags; :data:`PRESETS` names the two useful settings.
With ``function_preserving`` the deep model computes exactly what the shallow one did
(copies get alpha 0, NextItNet blocks keep their source's dilation); this holds for
NextItNet and pre-LN SASRec (a post-LN block with alpha 0 still normalises).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_rec.errors import ConfigError
from lightning_rec.models import block_dilations, normal_init_

MODES = ("adjacent", "cross")


@dataclass
class StackOptions:
    """What a stack copies.

    Attributes:
        mode: ``adjacent`` or ``cross``.
        copy_layernorm: copy LayerNorm weights (else fresh LayerNorms).
        copy_alpha: source blocks keep their alpha (else every alpha restarts at 0).
        zero_new_alpha: the new copies start with alpha 0 (identity blocks).
        keep_dilation: NextItNet copies run at their source's dilation (else positional).
        copy_head: keep the output layer of an untied model (else re-initialise it).
    """

    mode: str = "adjacent"
    copy_layernorm: bool = True
    copy_alpha: bool = True
    zero_new_alpha: bool = True
    keep_dilation: bool = True
    copy_head: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"stacking mode: '{self.mode}' is not one of {', '.join(MODES)}")


PRESETS = {
    # Deep model == shallow model at the moment of stacking.
    "function_preserving": dict(copy_layernorm=True, copy_alpha=True, zero_new_alpha=True, keep_dilation=True,
                                copy_head=True),
    # The authors' code: copy embeddings and block weights, fresh LayerNorms, every alpha 0,
    # a new output layer, dilations stay positional.
    "authors": dict(copy_layernorm=False, copy_alpha=False, zero_new_alpha=True, keep_dilation=False, copy_head=False),
}


def options(mode: str = "adjacent", preset: str | None = "function_preserving", **overrides) -> StackOptions:
    """Stack options from a preset plus explicit overrides (``None`` values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"stacking preset: '{preset}' is not one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset]) if preset else {}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return StackOptions(mode=mode, **kw)


def index_map(num_blocks: int, mode: str) -> list[int]:
    """Source block of every block of the doubled model."""
    if mode == "adjacent":
        return [i // 2 for i in range(2 * num_blocks)]
    if mode == "cross":
        return [i % num_blocks for i in range(2 * num_blocks)]
    raise ConfigError(f"stacking mode: '{mode}' is not one of {', '.join(MODES)}")


def is_copy(i: int, num_blocks: int, mode: str) -> bool:
    """Whether new block ``i`` is the added copy (rather than the source's own position)."""
    return i % 2 == 1 if mode == "adjacent" else i >= num_blocks


def check_stackable(encoder: nn.Module, opts: StackOptions, where: str = "callbacks.stacking.") -> None:
    """Refuse options the encoder cannot honour (called before training starts and at each stack);
    ``where`` is the config prefix the error names."""
    has_alpha = any(n.startswith("alpha") for blk in encoder.blocks for n, _ in blk.named_parameters())
    if opts.zero_new_alpha and not has_alpha:
        raise ConfigError(f"{where}zero_new_alpha=true: the model has no residual alpha (model.residual_alpha=false), "
                          f"so the copies cannot start as identity blocks; train with model.residual_alpha=true, or "
                          f"pass {where}zero_new_alpha=false to stack full residual copies")


def preservation_caveat(encoder: nn.Module, opts: StackOptions) -> str | None:
    """Why a stack meant to preserve the model's function will not, or ``None``."""
    if not (opts.copy_layernorm and opts.copy_alpha and opts.zero_new_alpha and opts.keep_dilation and opts.copy_head):
        return None
    layout = getattr(encoder, "layout", "pre")
    if getattr(encoder, "arch", None) == "sasrec" and layout != "pre":
        return (f"stacking: SASRec with model.layout={layout} normalises after the residual, so a copy with alpha 0 "
                f"is not an identity block and the output changes at the stack (function preservation holds for "
                f"model.layout=pre)")
    return None


def _is_layernorm_param(name: str, block: nn.Module) -> bool:
    mod = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
    return isinstance(mod, nn.LayerNorm)


@torch.no_grad()
def stack_encoder(encoder: nn.Module, opts: StackOptions) -> list[int]:
    """Double ``encoder.blocks`` in place; returns the index map (new block -> source block)."""
    check_stackable(encoder, opts)
    old = list(encoder.blocks)
    L = len(old)
    mapping = index_map(L, opts.mode)
    new_blocks = []
    for i, j in enumerate(mapping):
        src = old[j]
        dil = getattr(src, "dilation", None) if opts.keep_dilation else None
        like = next(src.parameters())  # the copy lives where its source does, in its dtype (e.g. bf16-true)
        blk = encoder.make_block(i, dil).to(device=like.device, dtype=like.dtype)
        src_state = src.state_dict()
        for name, tensor in blk.state_dict().items():
            if name.startswith("alpha"):
                keep = opts.copy_alpha and not (opts.zero_new_alpha and is_copy(i, L, opts.mode))
                tensor.copy_(src_state[name] if keep else torch.zeros_like(tensor))
            elif _is_layernorm_param(name, blk) and not opts.copy_layernorm:
                continue  # fresh LayerNorm from make_block
            else:
                tensor.copy_(src_state[name])
        new_blocks.append(blk)
    encoder.blocks = nn.ModuleList(new_blocks)
    return mapping


def describe(opts: StackOptions) -> dict:
    return asdict(opts)


def stack_module(module, opts: StackOptions) -> list[int]:
    """Double the depth of a :class:`~lightning_rec.modules.SeqRecModule` in place (``opts``: see
    :func:`options`); returns the index map (new block i copies old block ``mapping[i]``) and records the
    new depth (``num_blocks``, ``block_dilations``) in the module's hparams, so checkpoints rebuild it."""
    from pytorch_lightning.utilities import rank_zero_info

    mapping = stack_encoder(module.encoder, opts)
    hp = module.hparams
    if module.output is None and not opts.copy_head:
        rank_zero_info("stacking copy_head=false: the model has tied embeddings, so its head is the item "
                       "embedding and is kept (use model.tied_embeddings=false for a separate head)")
    if module.output is not None and not opts.copy_head:  # a new head, initialised as the model's first one
        nn.init.normal_(module.output.weight, std=hp.d_model**-0.5)
        if hp.get("init_std") is not None:
            normal_init_(module.output, hp.init_std)
        with torch.no_grad():
            module.output.weight[0].zero_()
    hp.num_blocks = len(module.encoder.blocks)
    hp.block_dilations = block_dilations(module.encoder) if opts.keep_dilation else None
    module.encoder_changed()
    return mapping
