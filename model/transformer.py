"""Pre-LayerNorm transformer shared by both towers.

A block optionally owns a hierarchy prior module (HiCLIP): it turns the block's input tokens and the previous
layer's link probabilities into this layer's links and the O(N) tables that describe the constituent prior C.
Links thread through the stack because of the non-splittable constraint (a^l >= a^{l-1}).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from model.attention import attention
from model.hier_attention import hier_attention


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None, causal: bool, prior=None) -> Tensor:
        b, n, w = x.shape
        # Split on the qkv axis before moving heads forward: unbind's backward then stacks the three gradients
        # straight into the projection's [b, n, 3w] layout, with no second copy.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.heads, w // self.heads).unbind(2))
        dropout_p = self.attn_dropout if self.training else 0.0
        if prior is None:
            o = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p)
        else:
            o = hier_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
        return self.out(o.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, prior: nn.Module | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.drop = nn.Dropout(dropout)
        self.prior = prior

    def forward(self, x: Tensor, links: Tensor | None, *, key_padding_mask: Tensor | None,
                causal: bool, use_prior: bool = True) -> tuple[Tensor, Tensor | None]:
        prior = None
        if self.prior is not None and use_prior:
            # The prior reads the block's input tokens through its own LayerNorm (Tree Transformer).
            links, prior = self.prior(x, links, key_padding_mask)
        x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, causal=causal, prior=prior))
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, links


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float,
                 make_prior: Callable[[], nn.Module] | None = None):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout, make_prior() if make_prior else None) for _ in range(layers)
        )

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False,
                start: int = 0, end: int | None = None, links: Tensor | None = None,
                return_links: bool = False, use_prior: bool = True):
        """Run blocks[start:end]; with return_links, also return every hier block's link probabilities.

        use_prior=False runs hier blocks as plain attention (C = 1): for token sets that are not a sequence or a
        grid, such as PyramidCLIP's region tokens.
        """
        all_links = []
        for block in self.blocks[start:end]:
            x, links = block(x, links, key_padding_mask=key_padding_mask, causal=causal, use_prior=use_prior)
            if return_links and links is not None:
                all_links.append(links)
        return (x, all_links) if return_links else x
