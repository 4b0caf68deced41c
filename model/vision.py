"""ViT image tower: patch embedding, CLS token, transformer, projection to the joint space.

PyramidCLIP's region branch shares the tower: the blocks before `region_split` are f1, the rest f2. Region
tokens (model/regions.py) run through f2 behind a region CLS token, and the shared head projects that CLS.

Patch dropout (FLIP; `patch_dropout`, training only) removes patch tokens before the first block. Vanilla
attention keeps a random subset; HiCLIP's Group prior keeps random whole rows and whole columns, so the kept
patches form a smaller grid on which the prior is well defined (docs/method.md §1.6).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import HierConfig, VisionConfig
from model.regions import RegionTokens
from model.transformer import Transformer


def _make_prior(cfg: VisionConfig, hier: HierConfig):
    if cfg.attention == "vanilla":
        return None
    if cfg.attention != "hier":
        raise ValueError(f"model.vision.attention must be 'vanilla' or 'hier', got {cfg.attention!r}")
    from model.hier_prior import GroupPrior

    return lambda: GroupPrior(cfg.width, grid=(cfg.grid_size, cfg.grid_size), has_cls=True, cfg=hier)


def kept_patches(cfg: VisionConfig) -> tuple[int, int | None]:
    """(patch tokens a training forward keeps, side of the kept square grid with hier attention, else None)."""
    p, g = cfg.patch_dropout, cfg.grid_size
    if p == 0.0:
        return g * g, None
    if cfg.attention == "hier":
        # Kept fraction (side / g)² ≈ 1 - p; at least 2 × 2 so every kept patch has a neighbour on each axis.
        side = min(g, max(2, round(g * math.sqrt(1.0 - p))))
        return side * side, side
    return max(1, int(g * g * (1.0 - p))), None


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, dropout: float, hier: HierConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid_size**2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, dropout, _make_prior(cfg, hier),
                                       cfg.checkpointing, cfg.checkpoint_every)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        # Negative: the last |region_split| blocks are f2, or all of them in a tower that has fewer.
        self.region_split = max(cfg.region_split + cfg.layers, 0) if cfg.region_split < 0 else cfg.region_split
        if self.region_split >= cfg.layers:
            raise ValueError(f"model.vision.region_split={cfg.region_split} leaves no top blocks of {cfg.layers}")
        self.regions = RegionTokens(cfg.region_source, width, cfg.grid_size, cfg.region_feature_dim)

    def tokens(self, image: Tensor) -> Tensor:
        """[B, 3, S, S] -> [B, 1 + G*G, width]: CLS first, patches in row-major grid order."""
        # Inputs arrive in fp32 whatever the training precision; the weights set the compute dtype.
        x = self.patch_embed(image.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        return self.ln_pre(x)

    def drop_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
        """Patch dropout in training: (kept tokens, CLS first; their grid for the hier prior; keep [B, K]).

        keep holds each kept patch's row-major index in the full grid, ascending (kept rows and columns in order,
        so a kept patch's grid neighbours are its nearest kept ones). In evaluation, or with patch_dropout = 0,
        the tokens pass unchanged and grid, keep are None. Draws from torch's default generator on the tokens'
        device, which the gradient cache saves and restores per chunk.
        """
        if not self.training or self.cfg.patch_dropout == 0.0:
            return x, None, None
        b, device, g = x.shape[0], x.device, self.cfg.grid_size
        count, side = kept_patches(self.cfg)

        def first(count: int, of: int) -> Tensor:  # per sample, `count` of range(of) at random, ascending
            return torch.rand(b, of, device=device).argsort(dim=-1)[:, :count].sort(dim=-1).values

        grid = None
        if side is not None:  # whole rows and whole columns
            keep = (first(side, g)[:, :, None] * g + first(side, g)[:, None, :]).flatten(1)
            grid = (side, side)
        else:
            keep = first(count, g * g)
        patches = x[:, 1:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1), grid, keep

    def head(self, x: Tensor) -> Tensor:
        """Pool the CLS token and project."""
        return self.proj(self.ln_post(x[:, 0]))

    def forward(self, image: Tensor) -> Tensor:
        x, grid, _ = self.drop_patches(self.tokens(image))
        return self.head(self.transformer(x, grid=grid))

    def forward_with_regions(self, image: Tensor, boxes_mask: Tensor, boxes: Tensor | None = None,
                             region_features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embed the views and the region level in one pass; f1 runs once and feeds both branches.

        image: [V, 3, S, S], the B global views first (the boxes refer to them), any further views after.
        boxes_mask: [B, R] True for real boxes. Returns (view embeddings [V, D], region embeddings [B, D]).
        Regions pool into one embedding per sample through the region CLS over all of the sample's region
        tokens, padding masked; a sample without boxes gets the CLS alone (its level is masked in the loss).
        """
        split = self.region_split
        x, grid, keep = self.drop_patches(self.tokens(image))
        x, links = self.transformer(x, end=split, return_links=True, grid=grid)
        views = self.head(self.transformer(x, start=split, links=links[-1] if links else None, grid=grid))
        b = boxes_mask.shape[0]
        tokens, pad = self.regions(patches=x[:b, 1:], keep=None if keep is None else keep[:b], boxes=boxes,
                                   region_features=region_features, boxes_mask=boxes_mask)
        # Regions are neither a sequence nor a grid: the top blocks attend over them without a hierarchy prior.
        regions = self.transformer(tokens, key_padding_mask=pad, start=split, use_prior=False)
        return views, self.head(regions)
