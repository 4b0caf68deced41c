"""Text tower: CLIP's causal transformer pooled at the end-of-text token."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import HierConfig, TextConfig
from model.transformer import Transformer


def _make_prior(cfg: TextConfig, hier: HierConfig):
    if cfg.attention == "vanilla":
        return None
    if cfg.attention != "hier":
        raise ValueError(f"model.text.attention must be 'vanilla' or 'hier', got {cfg.attention!r}")
    from model.hier_prior import TreePrior

    return lambda: TreePrior(cfg.width, cfg=hier)


def eot_positions(tokens: Tensor) -> Tensor:
    """Index of the end-of-text token: it has the largest id in CLIP's vocabulary, and padding is 0."""
    return tokens.argmax(dim=-1)


def padding_mask(tokens: Tensor) -> Tensor:
    """True at positions after the end-of-text token."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return positions[None, :] > eot_positions(tokens)[:, None]


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, dropout: float, hier: HierConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, dropout, _make_prior(cfg, hier),
                                       cfg.checkpointing, cfg.checkpoint_every)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, tokens: Tensor, return_links: bool = False):
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]].to(self.token_embed.weight.dtype)
        # Under a causal mask nothing before EOT sees the padding, so vanilla layers skip the padding mask;
        # hier priors always need it (links to padding are 0).
        pad = padding_mask(tokens) if (not self.cfg.causal or self.cfg.attention == "hier") else None
        out = self.transformer(x, key_padding_mask=pad, causal=self.cfg.causal, return_links=return_links)
        x, links = out if return_links else (out, None)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_positions(tokens)])
        emb = self.proj(pooled)
        return (emb, links) if return_links else emb
