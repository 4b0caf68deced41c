"""ViT image tower: patch embedding, CLS token, transformer, projection to the joint space.

PyramidCLIP's region branch shares the tower: the blocks before `region_split` are f1, the rest f2. Region
tokens (model/regions.py) run through f2 behind a region CLS token, and the shared head projects that CLS.
"""
from __future__ import annotations

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


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, dropout: float, hier: HierConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid_size**2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, dropout, _make_prior(cfg, hier))
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

    def head(self, x: Tensor) -> Tensor:
        """Pool the CLS token and project."""
        return self.proj(self.ln_post(x[:, 0]))

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.transformer(self.tokens(image)))

    def forward_with_regions(self, image: Tensor, boxes_mask: Tensor, boxes: Tensor | None = None,
                             region_features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embed the views and the region level in one pass; f1 runs once and feeds both branches.

        image: [V, 3, S, S], the B global views first (the boxes refer to them), any further views after.
        boxes_mask: [B, R] True for real boxes. Returns (view embeddings [V, D], region embeddings [B, D]).
        Regions pool into one embedding per sample through the region CLS over all of the sample's region
        tokens, padding masked; a sample without boxes gets the CLS alone (its level is masked in the loss).
        """
        split = self.region_split
        x, links = self.transformer(self.tokens(image), end=split, return_links=True)
        views = self.head(self.transformer(x, start=split, links=links[-1] if links else None))
        b = boxes_mask.shape[0]
        tokens, pad = self.regions(patches=x[:b, 1:], boxes=boxes, region_features=region_features,
                                   boxes_mask=boxes_mask)
        # Regions are neither a sequence nor a grid: the top blocks attend over them without a hierarchy prior.
        regions = self.transformer(tokens, key_padding_mask=pad, start=split, use_prior=False)
        return views, self.head(regions)
