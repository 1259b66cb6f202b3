"""NextItNet (Yuan et al., WSDM 2019): dilated causal 1-D convolutions, with StackRec's alpha."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rec.errors import ConfigError


class CausalConv1d(nn.Conv1d):
    """A 1-D convolution padded on the left only: output t sees inputs <= t."""

    def __init__(self, d: int, kernel_size: int, dilation: int):
        super().__init__(d, d, kernel_size, dilation=dilation)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d, T) -> (B, d, T)
        return super().forward(F.pad(x, (self.left, 0)))


class NextItNetBlock(nn.Module):
    """``y = x + alpha * ReLU(LN(conv_2d(ReLU(LN(conv_d(x))))))``, alpha initialised to 0."""

    def __init__(self, d: int, kernel_size: int, dilation: int, residual_alpha: bool, dropout: float = 0.0):
        super().__init__()
        self.dilation = dilation
        self.conv1 = CausalConv1d(d, kernel_size, dilation)
        self.ln1 = nn.LayerNorm(d, eps=1e-8)
        self.conv2 = CausalConv1d(d, kernel_size, 2 * dilation)
        self.ln2 = nn.LayerNorm(d, eps=1e-8)
        self.dropout = nn.Dropout(dropout)
        # alpha = 0 makes the block the identity at init; None is the original NextItNet (x + h).
        self.alpha = nn.Parameter(torch.zeros(1)) if residual_alpha else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, d)
        h = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        h = F.relu(self.ln1(h))
        if keep is not None:  # padded positions must look like the conv's own zero padding
            h = h * keep
        h = self.conv2(h.transpose(1, 2)).transpose(1, 2)
        h = self.dropout(F.relu(self.ln2(h)))
        return x + (self.alpha * h if self.alpha is not None else h)


class NextItNet(nn.Module):
    """Item embedding followed by ``num_blocks`` residual dilated-convolution blocks.

    Args:
        num_items: catalogue size (item ids ``1..num_items``, 0 is padding).
        d_model: embedding width.
        num_blocks: depth; block ``i`` uses dilation ``dilations[i % len(dilations)]``
            for its first conv and twice that for its second ([1, 4] -> 1, 2, 4, 8).
        kernel_size: convolution width (3 in the paper).
        residual_alpha: zero-initialised residual weight per block (StackRec).
        dropout: dropout on the embedding and each block's branch.
        block_dilations: explicit first-conv dilation of every block, overriding the
            pattern (StackRec copies blocks with their source's dilation).
    """

    arch = "nextitnet"

    def __init__(
        self,
        num_items: int,
        d_model: int = 64,
        num_blocks: int = 8,
        kernel_size: int = 3,
        dilations: tuple[int, ...] | list[int] = (1, 4),
        residual_alpha: bool = True,
        dropout: float = 0.0,
        block_dilations: list[int] | None = None,
        **_: object,
    ):
        super().__init__()
        if block_dilations is not None and len(block_dilations) != num_blocks:
            raise ConfigError(f"model.block_dilations has {len(block_dilations)} entries for {num_blocks} blocks")
        self.d_model, self.kernel_size, self.dilations = d_model, kernel_size, list(dilations)
        self.residual_alpha, self.dropout_p = residual_alpha, dropout
        self.item_embedding = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            self.make_block(i, None if block_dilations is None else block_dilations[i]) for i in range(num_blocks)
        )

    def dilation_at(self, index: int) -> int:
        """The positional dilation of block ``index`` (the cycle ``dilations`` repeated)."""
        return self.dilations[index % len(self.dilations)]

    def make_block(self, index: int, dilation: int | None = None) -> NextItNetBlock:
        """A freshly initialised block for position ``index`` (positional dilation unless given)."""
        dil = dilation if dilation is not None else self.dilation_at(index)
        return NextItNetBlock(self.d_model, self.kernel_size, dil, self.residual_alpha, self.dropout_p)

    def embed(self, items: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        return self.emb_dropout(self.item_embedding(items))

    def forward(self, items: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        x = self.embed(items)
        keep = (items != 0).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        x = x * keep
        for block in self.blocks:
            # Zeroing padded positions makes outputs independent of how much left padding there is.
            x = block(x, keep) * keep
        return x
