"""Model configuration: one dataclass per tower plus the shared parts.

Every field maps 1:1 onto behaviour; presets at the bottom name the sizes the recipes use.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class HierConfig:
    """HiCLIP hierarchy-aware attention (SPEC §1)."""

    prior_mode: str = "multiply"  # multiply: (C ⊙ softmax) V, the paper; bias: softmax(QKᵀ + log C) V
    attn_impl: str = "auto"  # auto | reference | sdpa | triton
    sigma: float = 256.0  # fixed scale of the neighbour scores (Tree Transformer)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    attention: str = "vanilla"  # vanilla | hier
    # PyramidCLIP region branch: blocks from this index on form f2 (the "top blocks").
    region_split: int = -3
    region_source: str = "boxes"  # boxes: ROI-align on own patch features | features: detector features
    region_feature_dim: int = 2052  # 2048-d detector feature + 4-d box, when region_source = features
    max_regions: int = 10

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    causal: bool = True
    attention: str = "vanilla"  # vanilla | hier


@dataclass
class ModelConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    hier: HierConfig = field(default_factory=HierConfig)
    dropout: float = 0.0  # residual-branch dropout in every block
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


def _vit(image_size, patch_size, width, layers, heads, **kw) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, **kw)


def _clip_text(width=512, layers=12, heads=8) -> TextConfig:
    return TextConfig(width=width, layers=layers, heads=heads)


# Sizes follow CLIP: embed dim 512 (768 for L/14), text tower 12 x 512 (12 x 768 for L/14).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        embed_dim=64,
        vision=_vit(64, 8, 96, 4, 4),
        text=TextConfig(width=96, layers=4, heads=4),
    ),
    "vit_b32": ModelConfig(embed_dim=512, vision=_vit(224, 32, 768, 12, 12), text=_clip_text()),
    "vit_b16": ModelConfig(embed_dim=512, vision=_vit(224, 16, 768, 12, 12), text=_clip_text()),
    "vit_l14": ModelConfig(embed_dim=768, vision=_vit(224, 14, 1024, 24, 16), text=_clip_text(768, 12, 12)),
}


def model_config_from_dict(data: dict) -> ModelConfig:
    """Rebuild a ModelConfig from `dataclasses.asdict` output (a consolidated folder's config.json)."""
    from dataclasses import fields

    def build(cls, values: dict):
        kwargs = {}
        for f in fields(cls):
            if f.name in values:
                sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
                kwargs[f.name] = build(sub, values[f.name]) if sub is not None else values[f.name]
        return cls(**kwargs)

    return build(ModelConfig, data)
