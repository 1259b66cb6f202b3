"""Starting a run from another run's weights: ``fit init_from=<ckpt>`` (fresh optimizer).

The architecture comes from the checkpoint (depth, width, dilations...); training settings
come from the command line. With ``model.new_head=true`` the model may move to another
dataset: the item embedding is initialised afresh for the new catalogue (or, with
``model.match_item_ids=true``, rows are kept for items whose original id exists in both
catalogues: only meaningful when both datasets share an id space), and an untied output
layer is re-initialised. Everything else (blocks, position embeddings, LayerNorms) is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_rec.errors import ConfigError

ARCH_KEYS = ("arch", "d_model", "num_blocks", "num_heads", "attention_m", "ffn_dim", "max_len", "norm_first", "layout", "positions", "residual_alpha",
             "kernel_size", "dilations", "block_dilations", "tied_embeddings")


def architecture(ckpt: dict[str, Any]) -> dict[str, Any]:
    hp = ckpt.get("hyper_parameters") or {}
    if "arch" not in hp:
        raise ConfigError("init_from: the checkpoint has no lightning_rec hyperparameters")
    return {k: hp[k] for k in ARCH_KEYS if k in hp}


def item_ids_of(ckpt: dict[str, Any]) -> list[str] | None:
    maps = (ckpt.get("SeqDataModule") or {}).get("id_maps")
    return maps["items"] if maps else None


@torch.no_grad()
def load_initial_weights(model, ckpt: dict[str, Any], new_item_ids: list[str], new_head: bool, path: str,
                         match_item_ids: bool = False) -> str:
    """Copy ``ckpt``'s weights into ``model``; returns a one-paragraph statement of what was kept."""
    sd = {k: v for k, v in ckpt["state_dict"].items() if "_metrics." not in k}
    old_ids = item_ids_of(ckpt)
    same_catalogue = old_ids == new_item_ids if old_ids is not None else (
        sd["encoder.item_embedding.weight"].shape[0] == len(new_item_ids))
    if not same_catalogue and not new_head:
        n_old = (len(old_ids) if old_ids else sd["encoder.item_embedding.weight"].shape[0]) - 1
        raise ConfigError(
            f"init_from={path}: its item catalogue ({n_old} items) differs from this data's ({len(new_item_ids) - 1}); "
            "pass model.new_head=true to transfer to the new catalogue"
        )
    notes = []
    target = model.state_dict()
    emb_key = "encoder.item_embedding.weight"
    if not same_catalogue:
        old_emb = sd.pop(emb_key)
        new_emb = target[emb_key].clone()
        if old_ids is not None and match_item_ids:
            pos = {it: i for i, it in enumerate(old_ids)}
            pairs = [(i, pos[it]) for i, it in enumerate(new_item_ids) if i > 0 and it in pos]
        else:
            pairs = []
        if pairs:
            dst, src = zip(*pairs)
            new_emb[list(dst)] = old_emb[list(src)]
        sd[emb_key] = new_emb
        if match_item_ids:
            notes.append(f"item embedding: {len(pairs):,} of {len(new_item_ids) - 1:,} rows copied by matching item id, "
                         f"{len(new_item_ids) - 1 - len(pairs):,} initialised afresh")
        else:
            notes.append(f"item embedding re-initialised for the new catalogue ({len(new_item_ids) - 1:,} items; "
                         "model.match_item_ids=true keeps rows of items with the same id)")
    if "output.weight" in sd:
        if new_head:
            sd["output.weight"] = target["output.weight"]
            notes.append("output layer re-initialised")
        else:
            notes.append("output layer kept")
    elif new_head and same_catalogue:
        notes.append("output layer is the tied item embedding (kept)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "_metrics." not in k]
    if missing or unexpected:
        raise ConfigError(f"init_from={path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    kept = f"kept: {len(model.encoder.blocks)} blocks" + (", position embedding" if hasattr(model.encoder, "position_embedding") else "")
    if same_catalogue:
        kept += ", item embedding"
    return f"init_from {path}: {kept}; " + "; ".join(notes) + "; optimizer fresh" if notes else f"init_from {path}: {kept}; optimizer fresh"
