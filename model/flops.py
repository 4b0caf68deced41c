"""Analytic FLOP count of one sample through the configured model: a pure function of `ModelConfig`.

Convention (the one MFU uses, PaLM appendix B): only matrix multiplies count, 2 FLOPs per multiply-add;
norms, softmax, GELU and the prior's elementwise tables are left out (a few % of the total). Attention counts
the full N×N score and value products, causal or not, as dense kernels and torch's FLOP counter do.
A training step costs 3× the forward (backward = 2× forward), plus one more forward per replay when
gradient caching recomputes the towers.

HiCLIP's extra work (docs/method.md §1): each hier block owns a prior with its own d×d query and key projections over
the block's tokens. `model.hier_prior` folds them into one token GEMM by associativity (q_u·k_v =
(t_u W_Qᵀ W_K + b_Q W_K)·t_v), so one [N, d]×[d, d] product counts; the d×d×d product W_QᵀW_K is paid once
per batch (≤ 3% of the prior at batch ≥ 64 on B/16, a third at batch 8) and left out of the per-sample count
(`prior_batch` counts a whole batch), like the O(N) and O(N²) elementwise link scores,
cumulative costs and C. The neighbour scores count as elementwise work even where a small grid reads them
off a Gram matrix (`model.hier_prior.gram_scores`): a way to compute them, not work the model needs.
PyramidCLIP (docs/method.md §2): two image views and three texts per sample, plus the region branch: R box or detector
features embedded to width, then the top blocks over 1 + R tokens behind a region CLS, through the shared head.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.hier_prior import folds_projection


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sample, by part; `prior` is the HiCLIP share already inside vision and text."""

    vision: int
    text: int
    regions: int
    prior: int

    @property
    def forward(self) -> int:
        return self.vision + self.text + self.regions

    @property
    def train(self) -> int:
        return 3 * self.forward


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block(tokens: int, width: int, mlp_ratio: float) -> int:
    """One pre-LN transformer block: qkv, QKᵀ, softmax·V, output projection, two MLP layers."""
    hidden = int(width * mlp_ratio)
    projections = linear(tokens, width, 3 * width) + linear(tokens, width, width)
    attention = 2 * (2 * tokens * tokens * width)  # QKᵀ and PV over all heads
    mlp = linear(tokens, width, hidden) + linear(tokens, hidden, width)
    return projections + attention + mlp


def prior(tokens: int, width: int) -> int:
    """A HiCLIP prior's scores: W_Q and W_K folded into one d → d projection of the block's tokens."""
    return linear(tokens, width, width)


def prior_fold(width: int) -> int:
    """W_Qᵀ W_K, the d×d×d product behind the folded projection: once per batch and layer, not per sample."""
    return 2 * width**3


def prior_batch(tokens: int, batch: int, width: int) -> int:
    """A prior's projection of a whole batch as model.hier_prior computes it: with more tokens in the batch than
    channels, one token GEMM and the fold; otherwise the two token GEMMs, W_Q's and W_K's."""
    if folds_projection(batch * tokens, width):
        return batch * prior(tokens, width) + prior_fold(width)
    return 2 * batch * prior(tokens, width)


def vision_tower(cfg: ModelConfig) -> tuple[int, int]:
    """(FLOPs, of which prior) of one image through the ViT, patch embedding to projection."""
    v = cfg.vision
    patches = v.grid_size**2
    tokens = patches + 1
    prior_flops = v.layers * prior(patches, v.width) if v.attention == "hier" else 0  # the grid, not CLS
    total = (linear(patches, 3 * v.patch_size**2, v.width) + v.layers * block(tokens, v.width, v.mlp_ratio)
             + prior_flops + linear(1, v.width, cfg.embed_dim))
    return total, prior_flops


def text_tower(cfg: ModelConfig) -> tuple[int, int]:
    """(FLOPs, of which prior) of one caption at the full context length (the towers never trim padding)."""
    t = cfg.text
    n = t.context_length
    prior_flops = t.layers * prior(n, t.width) if t.attention == "hier" else 0
    total = t.layers * block(n, t.width, t.mlp_ratio) + prior_flops + linear(1, t.width, cfg.embed_dim)
    return total, prior_flops


def region_branch(cfg: ModelConfig) -> int:
    """PyramidCLIP's region level: R region tokens + CLS through the top blocks (no prior) and the head."""
    v = cfg.vision
    split = v.region_split + v.layers if v.region_split < 0 else v.region_split
    r = v.max_regions
    embed = linear(r, 4, v.width) if v.region_source == "boxes" else linear(r, v.region_feature_dim, v.width)
    return embed + (v.layers - split) * block(1 + r, v.width, v.mlp_ratio) + linear(1, v.width, cfg.embed_dim)


def count_flops(cfg: ModelConfig, *, pyramid: bool = False) -> FlopCount:
    """Forward FLOPs per sample: CLIP (one image, one caption) or PyramidCLIP (two views, three texts, regions)."""
    image, image_prior = vision_tower(cfg)
    text, text_prior = text_tower(cfg)
    views, texts = (2, 3) if pyramid else (1, 1)
    return FlopCount(
        vision=views * image,
        text=texts * text,
        regions=region_branch(cfg) if pyramid else 0,
        prior=views * image_prior + texts * text_prior,
    )
