"""PyramidCLIP inputs through the model: every level out, the region branch (ROI-align, features), masks."""
import dataclasses

import pytest
import torch

from model.clip import CLIP
from model.config import ModelConfig, TextConfig, VisionConfig
from model.regions import RegionTokens

SOT, EOT = 62, 63  # a small vocabulary: EOT is still the largest id (pooling takes the argmax)


def small_config(attention: str = "vanilla", region_source: str = "boxes", dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, attention=attention,
                            region_split=-2, region_source=region_source, region_feature_dim=12, max_regions=3),
        text=TextConfig(context_length=12, vocab_size=64, width=32, layers=2, heads=2, attention=attention),
        dropout=dropout,
    )


def tokens(b: int, gen: torch.Generator, context: int = 12) -> torch.Tensor:
    lengths = torch.randint(3, context + 1, (b,), generator=gen)
    out = torch.zeros(b, context, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        out[i, 0], out[i, n - 1] = SOT, EOT
        out[i, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=gen)
    return out


def pyramid_batch(b: int = 4, r: int = 3, seed: int = 0, feature_dim: int = 12) -> dict:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, r, 2, generator=gen) * 0.5
    wh = 0.1 + torch.rand(b, r, 2, generator=gen) * 0.4
    boxes_mask = torch.ones(b, r, dtype=torch.bool)
    boxes_mask[0, 1:] = False  # one box
    boxes_mask[1] = False  # no region at all
    return {
        "image": torch.randn(b, 3, 32, 32, generator=gen), "image_local": torch.randn(b, 3, 32, 32, generator=gen),
        "text": tokens(b, gen), "summary": tokens(b, gen), "objects": tokens(b, gen),
        "summary_mask": torch.arange(b) != 1, "objects_mask": torch.ones(b, dtype=torch.bool),
        "boxes": torch.cat([xy, xy + wh], dim=-1), "boxes_mask": boxes_mask,
        "region_features": torch.randn(b, r, feature_dim, generator=gen),
        "region_features_mask": torch.ones(b, r, dtype=torch.bool),
    }


@pytest.mark.parametrize("attention", ["vanilla", "hier"])
def test_forward_returns_every_level_normalised_with_masks(attention):
    torch.manual_seed(0)
    model = CLIP(small_config(attention))
    batch = pyramid_batch()
    out = model(batch)
    for level in ("global", "local", "region", "caption", "summary", "objects"):
        assert out[level].shape == (4, 16), level
        torch.testing.assert_close(out[level].norm(dim=-1), torch.ones(4))
    assert out["region_mask"].tolist() == [True, False, True, True]
    assert torch.equal(out["summary_mask"], batch["summary_mask"])
    assert torch.equal(out["objects_mask"], batch["objects_mask"])
    # The text levels are the same tower on different inputs, the views the same tower on different crops.
    torch.testing.assert_close(out["summary"], model.encode_text(batch["summary"]))
    torch.testing.assert_close(out["local"], model.encode_image(batch["image_local"]))


@pytest.mark.parametrize("attention", ["vanilla", "hier"])
def test_split_forward_equals_plain_forward(attention):
    """f1 then f2 (with the hier links threaded across the split) is the unsplit tower."""
    torch.manual_seed(0)
    model = CLIP(small_config(attention)).eval()
    batch = pyramid_batch()
    views, _ = model.visual.forward_with_regions(batch["image"], batch["boxes_mask"], batch["boxes"])
    torch.testing.assert_close(views, model.visual(batch["image"]))


def test_roi_align_reads_the_patch_under_the_box():
    g, width = 4, 8
    regions = RegionTokens("boxes", width, g, feature_dim=12)
    patches = torch.randn(2, g * g, width)
    # Box over grid cell (row 1, column 2): x spans columns, y spans rows.
    cell = torch.tensor([2 / g, 1 / g, 3 / g, 2 / g])
    boxes = torch.stack([cell, torch.tensor([0.0, 0.0, 1.0, 1.0])])[None].expand(2, 2, 4)
    pooled = regions._roi_tokens(patches, boxes, torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(pooled[:, 0], patches[:, 1 * g + 2])
    torch.testing.assert_close(pooled[:, 1], patches.mean(dim=1))  # the whole view: the mean of all patches


def test_region_embedding_ignores_padding_and_box_order():
    torch.manual_seed(0)
    model = CLIP(small_config()).eval()
    batch = pyramid_batch()
    base = model(batch)["region"]
    moved = dict(batch, boxes=batch["boxes"].clone())
    moved["boxes"][0, 1:] = torch.tensor([0.9, 0.9, 0.95, 0.95])  # padding slots of sample 0 and all of sample 1
    moved["boxes"][1] = torch.rand(3, 4)
    moved["boxes"][2] = batch["boxes"][2].flip(0)  # regions are a set: no order
    torch.testing.assert_close(model(moved)["region"], base)
    # ...while a real box does matter.
    moved["boxes"][3, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert not torch.allclose(model(moved)["region"][3], base[3])


def test_region_features_source():
    torch.manual_seed(0)
    model = CLIP(small_config(region_source="features")).eval()
    batch = pyramid_batch()
    base = model(batch)["region"]
    other_image = dict(batch, image=torch.randn_like(batch["image"]), boxes=torch.rand_like(batch["boxes"]))
    # Detector features replace the image's own patch features: the region level no longer reads the image.
    torch.testing.assert_close(model(other_image)["region"], base)
    changed = dict(batch, region_features=batch["region_features"] + 1.0)
    assert not torch.allclose(model(changed)["region"][0], base[0])
    # A batch in which no sample has detector features still runs the branch, fully masked.
    no_features = {k: v for k, v in batch.items() if not k.startswith("region_features")}
    out = model(no_features)
    assert not out["region_mask"].any() and torch.isfinite(out["region"]).all()


def test_missing_levels_run_the_same_modules():
    """ZeRO-3 needs every rank to run the same modules each step, whatever its data."""
    torch.manual_seed(0)
    model = CLIP(small_config("hier", dropout=0.1))
    calls: list[str] = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))

    def run(batch):
        calls.clear()
        out = model(batch)
        sum(v.sum() for k, v in out.items() if v.is_floating_point()).backward()
        return list(calls)

    full = pyramid_batch()
    empty = dict(full, boxes_mask=torch.zeros_like(full["boxes_mask"]),
                 summary_mask=torch.zeros(4, dtype=torch.bool), objects_mask=torch.zeros(4, dtype=torch.bool))
    assert run(full) == run(empty)
    assert "visual.regions" in calls and "visual.transformer.blocks.2.prior" in calls


def test_region_split():
    cfg = small_config()  # 3 blocks

    def split(region_split: int) -> int:
        vision = dataclasses.replace(cfg.vision, region_split=region_split)
        return CLIP(dataclasses.replace(cfg, vision=vision)).visual.region_split

    assert (split(-2), split(1), split(-5)) == (1, 1, 0)  # a tower shorter than |split| makes every block f2
    with pytest.raises(ValueError, match="region_split"):
        split(3)
    with pytest.raises(ValueError, match="region_source"):
        CLIP(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, region_source="detector")))
