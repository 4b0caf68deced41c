"""The two towers and the learnable temperature, returning one L2-normalised embedding per pyramid level.

Levels: image side `global` (and `local`, `region` for PyramidCLIP), text side `caption` (and `summary`,
`objects`). The model knows nothing of DeepSpeed, ranks or data files.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.text import TextTower
from model.vision import VisionTower


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.dropout, cfg.hier)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.dropout, cfg.hier)
        # Shape [1], not 0-d: DeepSpeed cannot broadcast or partition 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1.0 / cfg.init_temperature)))
        self.apply(_init_weights)

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        emb = self.visual(image)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        emb = self.text(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Batch keys -> one embedding per level present, `{level}_mask` for levels a sample may lack.

        `image`, `text` always; PyramidCLIP adds `image_local`, `summary` + `summary_mask`, `objects` +
        `objects_mask`, and the region level `boxes_mask` with `boxes` or `region_features`. Each tower runs
        once on all of its views stacked: which modules run never depends on which samples lack a level (under
        ZeRO-3 every rank must run the same modules each step); missing levels are masks, not skipped calls.
        """
        b = inputs["image"].shape[0]
        views = [inputs["image"]] + ([inputs["image_local"]] if "image_local" in inputs else [])
        out: dict[str, Tensor] = {}
        if "boxes_mask" in inputs:
            slots, features = self._region_slots(inputs)
            image_embs, region = self.visual.forward_with_regions(
                torch.cat(views), slots, inputs.get("boxes"), features)
            out["region"] = F.normalize(region, dim=-1)
            out["region_mask"] = slots.any(dim=-1)
        else:
            image_embs = self.visual(torch.cat(views))
        for level, emb in zip(("global", "local"), F.normalize(image_embs, dim=-1).split(b)):
            out[level] = emb

        text_levels = ["caption"] + [k for k in ("summary", "objects") if k in inputs]
        texts = [inputs["text"]] + [inputs[k] for k in text_levels[1:]]
        for level, emb in zip(text_levels, self.encode_text(torch.cat(texts)).split(b)):
            out[level] = emb
            if f"{level}_mask" in inputs:
                out[f"{level}_mask"] = inputs[f"{level}_mask"]
        # Clamped here, not on the parameter: under ZeRO-3 parameters are only materialised inside forward.
        out["logit_scale"] = self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)
        return out

    def _region_slots(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Which of the R region slots hold a region, and the detector features when those are the source.

        A slot counts when its box lies in the global view and, for `region_source: features`, the sample has
        detector features. A batch without any features still runs the branch, on zeros, fully masked.
        """
        slots = inputs["boxes_mask"]
        if self.cfg.vision.region_source != "features":
            return slots, None
        if "region_features" not in inputs:
            b, r = slots.shape
            return torch.zeros_like(slots), slots.new_zeros(b, r, self.cfg.vision.region_feature_dim, dtype=torch.float)
        return slots & inputs["region_features_mask"], inputs["region_features"]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features**-0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
