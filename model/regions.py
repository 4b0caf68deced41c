"""PyramidCLIP's region level R: one token per box, from either of two sources (docs/method.md §2.1).

- `boxes` (default): ROI-align over the image tower's own patch features at the f1/f2 split. Each box becomes
  the average of the feature map inside it (adaptive sampling, one output bin) plus a learned embedding of its
  coordinates, so the top blocks see where and how large the region is.
- `features`: precomputed detector features (2048-d + 4-d box) through a linear embedding, as the released
  PyramidCLIP code does.

The tokens then run through the top blocks (f2) behind a region CLS token of their own; see
`VisionTower.forward_with_regions`.

Under patch dropout only the kept patches exist at the split. ROI-align then reads a normalised map: the kept
features scattered back to their grid cells (zeros elsewhere) and a second map that is 1 on kept cells, both
pooled by the same bilinear ROI-align, the first divided by the second. A box thus averages the kept patches
it samples, each with the bilinear weight it would have had (docs/method.md §1.6); with nothing dropped the
plain ROI-align runs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


class RegionTokens(nn.Module):
    """The region level's input to the top blocks: a region CLS, then one token per region slot."""

    def __init__(self, source: str, width: int, grid_size: int, feature_dim: int):
        super().__init__()
        if source not in ("boxes", "features"):
            raise ValueError(f"model.vision.region_source must be 'boxes' or 'features', got {source!r}")
        self.source = source
        self.grid_size = grid_size
        self.cls_token = nn.Parameter(torch.randn(width) * width**-0.5)
        if source == "boxes":
            self.box_embed = nn.Linear(4, width)
        else:
            self.feature_embed = nn.Linear(feature_dim, width)

    def forward(self, *, patches: Tensor | None, boxes: Tensor | None, region_features: Tensor | None,
                boxes_mask: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (tokens [B, 1 + R, width] with the region CLS first, key padding mask [B, 1 + R], True = padding).

        patches: [B, G*G, width] row-major patch tokens at the split (source `boxes`), or [B, K, width] the kept
        ones under patch dropout, with keep [B, K] their row-major grid indices; boxes: [B, R, 4] xyxy in [0, 1]
        of the global view; region_features: [B, R, feature_dim] (source `features`); boxes_mask: [B, R].
        """
        if self.source == "boxes":
            tokens = self._roi_tokens(patches, boxes, boxes_mask, keep) + self.box_embed(boxes.to(patches.dtype))
        else:
            tokens = self.feature_embed(region_features.to(self.feature_embed.weight.dtype))
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        # The CLS never counts as padding, so a sample without regions still has one key to attend to.
        pad = torch.cat([boxes_mask.new_zeros(boxes_mask.shape[0], 1), ~boxes_mask], dim=1)
        return torch.cat([cls, tokens], dim=1), pad

    def _roi_tokens(self, patches: Tensor, boxes: Tensor, boxes_mask: Tensor, keep: Tensor | None = None) -> Tensor:
        b, _, width = patches.shape
        g = self.grid_size
        # roi_align runs in fp32: its CPU kernels do not all take bf16, and the map is small.
        flat = patches.float()
        if keep is not None:  # the kept patches in their cells, and a last channel: 1 where a patch was kept
            flat = torch.cat([flat, flat.new_ones(b, keep.shape[1], 1)], dim=-1)
            flat = flat.new_zeros(b, g * g, width + 1).scatter(1, keep[..., None].expand(-1, -1, width + 1), flat)
        fmap = flat.transpose(1, 2).reshape(b, -1, g, g)
        # Padding boxes are replaced by the whole view: their values are masked out anyway, and this keeps
        # degenerate (empty) boxes away from roi_align.
        boxes = torch.where(boxes_mask[..., None], boxes, boxes.new_tensor(FULL_BOX)).float()
        r = boxes.shape[1]
        index = torch.arange(b, device=boxes.device, dtype=fmap.dtype).repeat_interleave(r)[:, None]
        rois = torch.cat([index, boxes.reshape(b * r, 4) * g], dim=1)  # [B*R, 5]: batch index, x1 y1 x2 y2
        # One output bin with adaptive sampling = the mean of the bilinearly sampled map inside the box;
        # aligned=True puts pixel centres at half-integers, so box [0, 1] covers exactly the whole grid.
        pooled = roi_align(fmap, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        pooled = pooled.reshape(b, r, -1)
        if keep is not None:
            # A box whose samples touch no kept patch (possible only for boxes under one patch) pools to zeros.
            pooled = pooled[..., :width] / pooled[..., width:].clamp_min(1e-6)
        return pooled.to(patches.dtype)
