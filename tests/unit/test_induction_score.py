"""Induction measured (recipes/induction_score.py): groups vs foreground masks, ARI, the position-only baseline."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.foreground import foreground_paths, foreground_set
from model.induction import calibrated_thresholds
from recipes.induction_score import induction_scores, position_groups

G = 8


class MaskTracingTower:
    """A stand-in vision tower whose links are 1 between patches on the same side of the mask, 0 across it
    (the mask is read from the image's first channel): its groups are exactly foreground and background."""

    def __init__(self, layers: int = 3):
        self.visual = types.SimpleNamespace(tokens=lambda images: images, transformer=self._links)
        self.layers, self.training = layers, False

    def _links(self, images, return_links):
        m = images[:, 0, ::4, ::4] > 0  # [N, G, G] at 32 px / 8 patches
        h, v = (m[:, :, 1:] == m[:, :, :-1]).float(), (m[:, 1:, :] == m[:, :-1, :]).float()
        return None, [(h, v)] * self.layers

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def square_masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, G, G, dtype=torch.bool)
    for i in range(n):
        masks[i, 1 + i % 3:5 + i % 3, 2:6] = True  # a 4x4 object, one connected background around it
    return masks


def test_groups_that_trace_the_mask_score_one_and_beat_position():
    masks = square_masks(6)
    images = masks.float().repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1)
    scores = induction_scores(MaskTracingTower(), images.contiguous(), masks, thresholds=[0.5, 0.5, 0.5])
    assert scores["images"] == 6 and scores["thresholds"] == [0.5, 0.5, 0.5]
    for layer in scores["layers"]:
        assert layer["ari"] == pytest.approx(1.0) and layer["groups"] == 2
        assert layer["ari_position"] < 0.5  # two halves of the grid do not follow a 4x4 square


def test_uniform_masks_are_left_out_and_singletons_score_zero():
    masks = torch.cat([square_masks(2), torch.ones(1, G, G, dtype=torch.bool), torch.zeros(1, G, G, dtype=torch.bool)])
    images = masks.float().repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1)
    scores = induction_scores(MaskTracingTower(1), images.contiguous(), masks, thresholds=[1.5])  # every edge broken
    assert scores["images"] == 2
    assert scores["layers"][0]["groups"] == G * G and scores["layers"][0]["ari"] == pytest.approx(0.0)


def test_position_groups_are_rectangular_tiles_of_about_the_requested_count():
    assert position_groups(1, G).unique().tolist() == [0]
    four = position_groups(4, G)
    assert four.unique().numel() == 4 and (four[:4, :4] == four[0, 0]).all() and four[0, 0] != four[4, 4]
    assert position_groups(64, G).unique().numel() == 64
    assert position_groups(7, G).unique().numel() == 8  # 2 x 4 tiles for 7 groups


def test_calibrated_thresholds_are_quantiles_from_fine_to_coarse():
    links = [torch.linspace(0, 1, 101), torch.linspace(0, 1, 101), torch.linspace(0.5, 1, 101)]
    assert calibrated_thresholds(links) == pytest.approx((0.75, 0.5, 0.625))
    assert calibrated_thresholds(links[:1]) == pytest.approx((0.75,))


def test_foreground_masks_follow_the_alpha_channel(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 0:16] = (200, 0, 0, 255)  # opaque red block: patch rows 2-5, cols 0-3 of an 8x8 grid at 32 px
    rgba[0:2, 30:32, 3] = 255  # a sliver under half a patch: background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    images, masks = foreground_set(foreground_paths(str(tmp_path)), image_size=32, grid=8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 0:4] = True
    assert torch.equal(masks[0], expected) and images.shape == (1, 3, 32, 32)
    assert images[0, :, 0, 20].min() > images[0, :, 12, 4].min()  # transparent -> white, above the red block
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="b.png has no alpha channel"):
        foreground_set([str(tmp_path / "b.png")], 32, 8)
