"""The analytic FLOP count (model/flops.py) against torch's FLOP counter run on the real module.

The counter runs the model on the meta device: shapes only, no memory, no arithmetic, so ViT-B sizes are cheap.
A large batch makes per-batch work (HiCLIP's W_QᵀW_K, paid once per batch) negligible per sample.
"""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.clip import CLIP
from model.config import PRESETS, HierConfig, ModelConfig
from model.flops import count_flops, prior, prior_batch, prior_fold
from model.hier_prior import GroupPrior

BATCH = 256


def counted_flops_per_sample(cfg: ModelConfig, pyramid: bool) -> float:
    ctx, b = cfg.text.context_length, BATCH
    with torch.device("meta"):
        model = CLIP(cfg)
        tokens = torch.zeros(b, ctx, dtype=torch.long)
        inputs = {"image": torch.zeros(b, 3, cfg.vision.image_size, cfg.vision.image_size), "text": tokens}
        if pyramid:
            r = cfg.vision.max_regions
            inputs.update(image_local=torch.zeros_like(inputs["image"]), summary=tokens, objects=tokens,
                          summary_mask=torch.ones(b, dtype=torch.bool), objects_mask=torch.ones(b, dtype=torch.bool),
                          boxes=torch.zeros(b, r, 4), boxes_mask=torch.ones(b, r, dtype=torch.bool))
    with FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() / b


def with_hier(cfg: ModelConfig) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    cfg.vision.attention = cfg.text.attention = "hier"
    # `bias` runs one N×N SDPA, which the counter sees as such; `multiply` on CPU doubles the keys (an
    # implementation detail of the sdpa path, see model/hier_attention.py), which the analytic count ignores.
    cfg.hier.prior_mode, cfg.hier.attn_impl = "bias", "sdpa"
    return cfg


def test_vit_b16_clip_within_5_percent_of_torch_flop_counter():
    cfg = PRESETS["vit_b16"]
    analytic = count_flops(cfg).forward
    assert analytic == pytest.approx(counted_flops_per_sample(cfg, pyramid=False), rel=0.05)
    # and the magnitude is the well-known one: ViT-B/16 image tower ≈ 17.5 GMACs at 224²
    assert 34e9 < count_flops(cfg).vision < 36e9


@pytest.mark.parametrize("preset,hier,pyramid", [("vit_b16", True, False), ("vit_b32", True, True),
                                                 ("vit_b32", False, True)])
def test_hiclip_and_pyramid_counts_match_torch_flop_counter(preset, hier, pyramid):
    cfg = with_hier(PRESETS[preset]) if hier else PRESETS[preset]
    analytic = count_flops(cfg, pyramid=pyramid).forward
    assert analytic == pytest.approx(counted_flops_per_sample(cfg, pyramid), rel=0.05)


def test_prior_and_pyramid_add_work_in_the_expected_places():
    base = count_flops(PRESETS["vit_b16"])
    hier = count_flops(with_hier(PRESETS["vit_b16"]))
    pyramid = count_flops(PRESETS["vit_b16"], pyramid=True)
    assert base.prior == 0 and hier.prior > 0
    assert hier.forward - base.forward == hier.prior
    assert pyramid.vision == 2 * base.vision and pyramid.text == 3 * base.text and pyramid.regions > 0
    assert base.train == 3 * base.forward


def test_a_priors_projection_is_per_sample_work_plus_one_fold_per_batch():
    """bench/attention.py's FLOP floor: past the fold's threshold b samples cost b × `prior` plus one
    `prior_fold` (W_QᵀW_K; a third of the prior at ViT-B/16, batch 8), below it both token GEMMs.
    Counted on GroupPrior.project."""
    width, grid = 768, 14
    with torch.device("meta"):
        module = GroupPrior(width, grid=(grid, grid), has_cls=True, cfg=HierConfig())

    def counted(batch: int) -> int:
        with torch.device("meta"):
            patches = torch.zeros(batch, grid, grid, width)
        with FlopCounterMode(display=False) as counter:
            module.project(patches)
        return counter.get_total_flops()

    per_sample = prior(grid * grid, width)
    assert counted(16) - counted(8) == 8 * per_sample
    # what is left at batch 8 is the fold (and b_Q W_K, 2d² more)
    assert counted(8) - 8 * per_sample == pytest.approx(prior_fold(width), rel=0.002)
    for batch in (1, 3, 8):  # 196 and 588 tokens < 768 channels: unfolded; 1,568: folded
        assert prior_batch(grid * grid, batch, width) == pytest.approx(counted(batch), rel=0.002), batch
