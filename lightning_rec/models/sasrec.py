"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention, pre-/post-LN or SASRec.pytorch's layout, with StackRec's alphas."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rec.errors import ConfigError


class SASRecBlock(nn.Module):
    """Multi-head causal self-attention and a position-wise feed-forward net.

    Pre-LN (``layout="pre"``): ``x + a_att * attn(LN(x))`` then ``x + a_ffn * ffn(LN(x))``.
    Post-LN (``"post"``): ``LN(x + a_att * attn(x))`` then ``LN(x + a_ffn * ffn(x))``.
    ``"pmixer"``, the layout of the widely used SASRec.pytorch port (and of the "Gold loss"
    SASRec+ code built on it): ``q = LN(x)``, ``x = q + a_att * attn(query=q, key=value=x)``,
    then ``x = LN(x)``, ``x = x + a_ffn * ffn(x)``.
    ``a_att``/``a_ffn`` are zero-initialised scalars (StackRec) or absent (plain SASRec).

    ``attention_m > 1`` is the attentive encoder of the federated-distillation paper (section 4),
    in the seed's form: every attention weight vector ``a`` (one query's softmax over the ``r`` keys,
    ``[b, 1, r]``) is expanded to ``m`` dimensions by a learned ``[1, m]`` matrix ``w``
    (``[b*r, 1] x [1, m] -> [b, m, r]``) and averaged over them, ``a' = mean_j w_j a``, before it
    weighs the values. The average of that rank-1 expansion is ``mean(w) * a``, so the block computes
    plain attention and scales it by ``mean(w)`` (one learned scalar per block, ``w`` initialised to
    ones: at initialisation exactly SASRec); the cost is that of plain attention. (An earlier form
    gave every head ``m`` query/key pairs of width ``d_head / m`` and averaged their maps; it measured
    the same NDCG@10 as plain attention at twice the time, docs/log/federated.md, and was dropped.)
    """

    def __init__(self, d: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool, residual_alpha: bool,
                 attention_m: int = 1, layout: str | None = None, attn_out_dropout: bool = True):
        super().__init__()
        layout = layout or ("pre" if norm_first else "post")
        if layout not in LAYOUTS:
            raise ConfigError(f"model.layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
        self.layout = layout
        norm_first = layout == "pre"
        if d % num_heads:
            raise ConfigError(f"model.d_model={d} is not divisible by model.num_heads={num_heads}")
        if not isinstance(attention_m, int) or attention_m < 1:
            raise ConfigError(f"model.attention_m={attention_m!r}: expected a positive integer (1 = plain attention)")
        self.num_heads, self.norm_first, self.dropout_p = num_heads, norm_first, dropout
        self.m = attention_m
        self.ln_att = nn.LayerNorm(d, eps=1e-8)
        self.qkv = nn.Linear(d, 3 * d)
        # attention_m > 1: the [1, m] expansion of every attention weight (averaged over m; see the class doc)
        self.expand = nn.Parameter(torch.ones(1, attention_m)) if attention_m > 1 else None
        self.out = nn.Linear(d, d)
        self.ln_ffn = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d))
        self.dropout = nn.Dropout(dropout)
        # Dropout on the attention branch's output, besides the one on its weights. SASRec and
        # SASRec.pytorch have only the latter (attn_out_dropout=False).
        self.attn_out_dropout = nn.Dropout(dropout) if attn_out_dropout else nn.Identity()
        self.alpha_att = nn.Parameter(torch.zeros(1)) if residual_alpha else None
        self.alpha_ffn = nn.Parameter(torch.zeros(1)) if residual_alpha else None

    def attend(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False,
               query: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over ``x``; queries from ``query`` (same shape) where given, else from ``x``."""
        B, T, d = x.shape
        h = self.num_heads
        if query is None:
            q, k, v = self.qkv(x).view(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, T, dh)
        else:  # one projection, its query rows applied to ``query`` and its key/value rows to ``x``
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(query, w[:d], b[:d]).view(B, T, h, d // h).transpose(1, 2)
            k, v = F.linear(x, w[d:], b[d:]).view(B, T, 2, h, d // h).permute(2, 0, 3, 1, 4)
        if last_only:  # inference needs the most recent position only
            q, mask = q[:, :, -1:], mask[:, :, -1:]
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, Tq, dh)
        if self.expand is not None:  # (mean_j w_j a) v = mean(w) (a v): the expanded weights, averaged over m
            y = y * self.expand.mean().to(y.dtype)
        return self.attn_out_dropout(self.out(y.transpose(1, 2).reshape(B, q.shape[2], d)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, d), additive mask (B, 1, T, T) -> (B, T, d), or (B, 1, d) with ``last_only``."""
        def scaled(alpha, h):
            return alpha * h if alpha is not None else h

        if self.layout == "pmixer":
            q = self.ln_att(x)
            x = (q[:, -1:] if last_only else q) + scaled(self.alpha_att, self.attend(x, mask, last_only, query=q))
            x = self.ln_ffn(x)
            return x + scaled(self.alpha_ffn, self.dropout(self.ffn(x)))
        res = x[:, -1:] if last_only else x
        if self.norm_first:
            x = res + scaled(self.alpha_att, self.attend(self.ln_att(x), mask, last_only))
            x = x + scaled(self.alpha_ffn, self.dropout(self.ffn(self.ln_ffn(x))))
        else:
            x = self.ln_att(res + scaled(self.alpha_att, self.attend(x, mask, last_only)))
            x = self.ln_ffn(x + scaled(self.alpha_ffn, self.dropout(self.ffn(x))))
        return x


LAYOUTS = ("pre", "post", "pmixer")
POSITIONS = ("right", "left")


class SASRec(nn.Module):
    """Item + learned position embeddings followed by ``num_blocks`` causal attention blocks.

    Positions are counted from the most recent item (``positions="right"``, as in SASRec with
    left padding) or from the oldest item of the window (``"left"``, as in RecBole and
    SASRec.pytorch, which pad on the right). Either way they depend on the items only, not on
    the padding, so trimming all-padding columns does not change any output.

    Args:
        num_items: catalogue size (ids ``1..num_items``, 0 is padding).
        d_model: width; num_heads: attention heads; ffn_dim: feed-forward width (default d).
        num_blocks: depth.
        max_len: longest input sequence (size of the position table).
        dropout: embedding, attention and feed-forward dropout.
        norm_first: pre-LN (True) or post-LN (False) blocks; ``layout`` overrides it.
        layout: ``pre``, ``post`` or ``pmixer`` (see :class:`SASRecBlock`); None = from ``norm_first``.
        positions: ``right`` (count from the most recent item) or ``left`` (from the oldest).
        attn_out_dropout: dropout on the attention branch's output as well as on its weights
            (False: on the weights only, as SASRec and SASRec.pytorch).
        residual_alpha: zero-initialised alphas on both branches (StackRec).
        attention_m: dimensions each attention weight is expanded to and averaged over (1 = SASRec;
            32 = the attentive encoder of the federated-distillation paper; see :class:`SASRecBlock`).
    """

    arch = "sasrec"

    def __init__(
        self,
        num_items: int,
        d_model: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        ffn_dim: int | None = None,
        max_len: int = 200,
        dropout: float = 0.2,
        norm_first: bool = True,
        residual_alpha: bool = True,
        attention_m: int = 1,
        layout: str | None = None,
        positions: str = "right",
        attn_out_dropout: bool = True,
        **_: object,
    ):
        super().__init__()
        layout = layout or ("pre" if norm_first else "post")
        if layout not in LAYOUTS:
            raise ConfigError(f"model.layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
        if positions not in POSITIONS:
            raise ConfigError(f"model.positions: '{positions}' is not one of {', '.join(POSITIONS)}")
        self.layout, self.positions = layout, positions
        norm_first = layout == "pre"
        self.d_model, self.num_heads, self.ffn_dim = d_model, num_heads, ffn_dim or d_model
        self.max_len, self.dropout_p, self.norm_first, self.residual_alpha = max_len, dropout, norm_first, residual_alpha
        self.attention_m, self.attn_out_dropout = attention_m, bool(attn_out_dropout)
        self.item_embedding = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.item_embedding.weight, std=d_model**-0.5)
        nn.init.normal_(self.position_embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(num_blocks))
        self.final_ln = nn.LayerNorm(d_model, eps=1e-8) if layout != "post" else nn.Identity()

    def make_block(self, index: int, dilation: int | None = None) -> SASRecBlock:
        """A freshly initialised block (``index``/``dilation`` unused; one interface with NextItNet)."""
        return SASRecBlock(self.d_model, self.num_heads, self.ffn_dim, self.dropout_p, self.norm_first, self.residual_alpha,
                           self.attention_m, self.layout, self.attn_out_dropout)

    def embed(self, items: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        T = items.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={self.max_len}")
        if self.positions == "right":
            pos = self.position_embedding(torch.arange(self.max_len - T, self.max_len, device=items.device))[None]
        else:  # index of each item among the row's items, so left padding shifts nothing
            pos = self.position_embedding(((items != 0).long().cumsum(1) - 1).clamp_(min=0))
        x = self.item_embedding(items) * math.sqrt(self.d_model) + pos
        return self.emb_dropout(x)

    def forward(self, items: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T) -> (B, T, d); with ``last_only`` the last block computes the final position only -> (B, 1, d)."""
        T = items.shape[1]
        valid = items != 0  # (B, T)
        dtype = self.position_embedding.weight.dtype  # not the item table: it may be a projection
        keep = valid.unsqueeze(-1).to(dtype)
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        # Attend to earlier non-padding positions; every position also sees itself so no row is empty.
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=items.device)[None]
        # One additive mask per forward: SDPA would otherwise convert a boolean mask in every block.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=items.device).masked_fill_(~allowed, float("-inf"))
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        x = self.embed(items) * keep
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            last = last_only and i == n - 1
            x = block(x, mask, last) * (keep[:, -1:] if last else keep)
        if last_only and n == 0:
            x = x[:, -1:]
        return self.final_ln(x) * keep[:, -1:] if last_only else self.final_ln(x) * keep
