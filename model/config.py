"""Model configuration: one dataclass per tower plus the shared parts.

Every field maps 1:1 onto behaviour; presets at the bottom name the sizes the recipes use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.config_tree import build, require

Attention = Literal["vanilla", "hier"]
# Activation checkpointing of a tower's transformer blocks (model/transformer.py): `blocks` recomputes every block
# in backward (keeps only each block's input), `every_k` every k-th block (blocks 0, k, 2k, ...), a dial between.
Checkpointing = Literal["none", "blocks", "every_k"]


@dataclass
class HierConfig:
    """HiCLIP hierarchy-aware attention (docs/method.md §1)."""

    # multiply: (C ⊙ softmax(QKᵀ/√d)) V, the paper; bias: softmax(QKᵀ/√d + log C) V
    prior_mode: Literal["multiply", "bias"] = "multiply"
    attn_impl: Literal["auto", "reference", "sdpa", "triton"] = "auto"
    sigma: float = 256.0  # fixed scale of the neighbour scores (Tree Transformer)

    def __post_init__(self) -> None:
        require(self.sigma > 0, "sigma", self.sigma, "> 0")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    attention: Attention = "vanilla"
    # PyramidCLIP region branch: blocks from this index on form f2 (the "top blocks").
    region_split: int = -3
    # boxes: ROI-align on own patch features | features: detector features
    region_source: Literal["boxes", "features"] = "boxes"
    region_feature_dim: int = 2052  # 2048-d detector feature + 4-d box, when region_source = features
    max_regions: int = 10
    checkpointing: Checkpointing = "none"
    checkpoint_every: int = 2  # with checkpointing = every_k
    # Fraction of patch tokens dropped in training (FLIP), never in evaluation. Vanilla attention: random patches;
    # hier: random whole rows and columns, so the kept patches form a smaller grid (docs/method.md §1.6).
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_tower(self)
        require(0.0 <= self.patch_dropout < 1.0, "patch_dropout", self.patch_dropout, "in [0, 1)")
        require(self.patch_size >= 1 and self.image_size % self.patch_size == 0, "patch_size", self.patch_size,
                f"≥ 1 and a divisor of image_size ({self.image_size})")
        # Negative counts from the top; one beyond the depth makes every block f2 (model/vision.py).
        require(self.region_split < self.layers, "region_split", self.region_split,
                f"< layers ({self.layers}): blocks from this index on form the region branch's f2")
        require(self.region_feature_dim >= 1, "region_feature_dim", self.region_feature_dim, "≥ 1")
        require(self.max_regions >= 0, "max_regions", self.max_regions, "≥ 0")

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
    attention: Attention = "vanilla"
    checkpointing: Checkpointing = "none"
    checkpoint_every: int = 2  # with checkpointing = every_k

    def __post_init__(self) -> None:
        _check_tower(self)
        require(self.context_length >= 2, "context_length", self.context_length, "≥ 2")
        require(self.vocab_size >= 1, "vocab_size", self.vocab_size, "≥ 1")


def _check_tower(cfg: VisionConfig | TextConfig) -> None:
    size = getattr(cfg, "image_size", None)
    if size is not None:
        require(size >= 1, "image_size", size, "≥ 1")
    require(cfg.layers >= 1, "layers", cfg.layers, "≥ 1")
    require(cfg.width >= 1, "width", cfg.width, "≥ 1")
    require(cfg.heads >= 1 and cfg.width % cfg.heads == 0, "heads", cfg.heads,
            f"≥ 1 and a divisor of width ({cfg.width})")
    require(cfg.mlp_ratio > 0, "mlp_ratio", cfg.mlp_ratio, "> 0")
    require(cfg.checkpointing in ("none", "blocks", "every_k"), "checkpointing", cfg.checkpointing,
            "one of none, blocks, every_k")
    require(cfg.checkpoint_every >= 1, "checkpoint_every", cfg.checkpoint_every, "≥ 1")


@dataclass
class ModelConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    hier: HierConfig = field(default_factory=HierConfig)
    dropout: float = 0.0  # residual-branch dropout in every block
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # Warm start (model/interop.py): a fresh run starts from these weights; a resumed run ignores them.
    init_from: str = ""  # our consolidated folder, an open_clip .safetensors / .pt, or a Hugging Face CLIP folder
    init_format: Literal["auto", "ours", "open_clip", "hf"] = "auto"  # auto: told apart by the files
    init_priors: Literal["random", "uniform"] = "random"  # HiCLIP priors the source lacks (docs/method.md §1.5)

    def __post_init__(self) -> None:
        require(self.embed_dim >= 1, "embed_dim", self.embed_dim, "≥ 1")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        require(self.init_temperature > 0, "init_temperature", self.init_temperature, "> 0")
        require(self.max_logit_scale > 0, "max_logit_scale", self.max_logit_scale, "> 0")


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
    """Rebuild a ModelConfig from `dataclasses.asdict` output (a consolidated folder's config.json), through the
    same builder and checks as a recipe: an unknown key or a bad value is a one-line ConfigError."""
    return build(ModelConfig, data)
