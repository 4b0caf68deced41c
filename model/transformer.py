"""Pre-LayerNorm transformer shared by both towers.

A block optionally owns a hierarchy prior module (HiCLIP): it turns the block's input tokens and the previous
layer's link probabilities into this layer's links and the O(N) tables that describe the constituent prior C.
Links thread through the stack because of the non-splittable constraint (a^l >= a^{l-1}).

Activation checkpointing (`checkpointing` of the tower's config) wraps whole blocks in torch's non-reentrant
checkpoint: a checkpointed block keeps only its inputs (tokens and the previous layer's links) and recomputes its
activations, prior included, when backward reaches it, replaying the RNG state it started with so dropout draws
the same masks. Why torch's and not DeepSpeed's: docs/performance.md.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from model.config import Checkpointing

# Non-reentrant: takes keyword arguments and nested inputs (a Group prior's links are a pair of tensors), needs no
# input that requires grad, and leaves the surrounding autograd graph as it is (what ZeRO-3's hooks attach to).
_checkpoint = functools.partial(checkpoint, use_reentrant=False)

from model.attention import attention
from model.hier_attention import hier_attention_packed


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
        qkv = self.qkv(x).view(b, n, 3, self.heads, w // self.heads)
        dropout_p = self.attn_dropout if self.training else 0.0
        if prior is not None:  # [b, n, heads, d] from the packed projection (model/hier_attention.py says why)
            o = hier_attention_packed(qkv, prior, causal=causal, dropout_p=dropout_p)
            return self.out(o.reshape(b, n, w))
        # Split on the qkv axis before moving heads forward: unbind's backward then stacks the three gradients
        # straight into the projection's [b, n, 3w] layout, with no second copy.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        o = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p)
        return self.out(o.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, prior: nn.Module | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        # Dropout and GELU are calls, not submodules: they own no parameters, and whatever hooks every submodule
        # call (ZeRO-3 gathers parameters that way) would pay its per-call cost for them too.
        self.dropout = dropout
        self.prior = prior

    def forward(self, x: Tensor, links: Tensor | None, *, key_padding_mask: Tensor | None,
                causal: bool, use_prior: bool = True, grid: tuple[int, int] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """grid: the patch grid of these tokens when it is not the prior's own (patch dropout keeps a sub-grid)."""
        prior = None
        if self.prior is not None and use_prior:
            # The prior reads the block's input tokens through its own LayerNorm (Tree Transformer).
            extra = {} if grid is None else {"grid": grid}
            links, prior = self.prior(x, links, key_padding_mask, **extra)
        h = self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, causal=causal, prior=prior)
        x = x + F.dropout(h, self.dropout, self.training)
        x = x + F.dropout(self.mlp(self.ln_2(x)), self.dropout, self.training)
        return x, links


def checkpoint_plan(checkpointing: Checkpointing, checkpoint_every: int, layers: int) -> list[bool]:
    """Which blocks recompute in backward. By absolute block index, so a block is checkpointed or not whichever
    slice (f1, f2) runs it."""
    every = {"none": 0, "blocks": 1, "every_k": checkpoint_every}[checkpointing]
    return [every > 0 and i % every == 0 for i in range(layers)]


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float,
                 make_prior: Callable[[], nn.Module] | None = None, checkpointing: Checkpointing = "none",
                 checkpoint_every: int = 2):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout, make_prior() if make_prior else None) for _ in range(layers)
        )
        self.checkpointed = checkpoint_plan(checkpointing, checkpoint_every, layers)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False,
                start: int = 0, end: int | None = None, links: Tensor | None = None,
                return_links: bool = False, use_prior: bool = True, grid: tuple[int, int] | None = None):
        """Run blocks[start:end]; with return_links, also return every hier block's link probabilities.

        use_prior=False runs hier blocks as plain attention (C = 1): for token sets that are not a sequence or a
        grid, such as PyramidCLIP's region tokens. grid: the patch grid when it is not the prior's own.
        """
        all_links = []
        # Without autograd (evaluation, the gradient cache's first pass) there is nothing to save or recompute.
        recompute = torch.is_grad_enabled()
        for i in range(*slice(start, end).indices(len(self.blocks))):
            block = self.blocks[i]
            run = _checkpoint if recompute and self.checkpointed[i] else _call
            x, links = run(block, x, links, key_padding_mask=key_padding_mask, causal=causal, use_prior=use_prior,
                           grid=grid)
            if return_links and links is not None:
                all_links.append(links)
        return (x, all_links) if return_links else x


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)
