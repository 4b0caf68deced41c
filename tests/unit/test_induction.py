"""Hierarchy induction (docs/method.md §1.3) on hand-built links, and the induce CLI on a tiny saved model."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.clip import CLIP
from model.config import PRESETS
from model.induction import IMAGE_THRESHOLDS_12, group_colours, image_groups, image_thresholds, overlay, parse_tree, patch_groups

WORDS = ["the", "dog", "chased", "the", "cat"]
LINKS = [
    [0.85, 0.2, 0.4, 0.9],  # layer 1 (lowest)
    [0.9, 0.3, 0.95, 0.99],  # layer 2 (top): never below layer 1, as the non-splittable update guarantees
]


def test_parse_tree_splits_top_down_and_descends_past_strong_links():
    # Top layer: weakest link 0.3 splits "the dog | chased the cat". "the dog" (0.9, then 0.85 below) never
    # splits: flat. "chased the cat" is whole at the top (0.95 > 0.8), splits at 0.4 one layer down.
    assert parse_tree(WORDS, LINKS) == "((the dog) (chased (the cat)))"


def test_parse_tree_threshold_and_min_layer():
    # No link is at or below 0: no layer ever splits the sentence, which comes out flat from the lowest layer.
    assert parse_tree(WORDS, LINKS, threshold=0.0) == "(the dog chased the cat)"
    # Stopping at the top layer: "chased the cat" can no longer be split below.
    assert parse_tree(WORDS, LINKS, min_layer=1) == "((the dog) (chased the cat))"
    assert parse_tree(["hello"], torch.zeros(2, 0)) == "hello"
    with pytest.raises(ValueError, match="links must be"):
        parse_tree(WORDS, [[0.5, 0.5]])


def test_patch_groups_are_connected_components_of_unbroken_edges():
    horizontal = torch.full((3, 2), 0.9)
    horizontal[:, 0] = 0.1  # column 0 is cut off from columns 1-2
    vertical = torch.full((2, 3), 0.9)
    vertical[0, 0] = 0.2  # and patch (0, 0) from (1, 0)
    labels = patch_groups(horizontal, vertical, threshold=0.5)
    assert labels.tolist() == [[0, 1, 1], [2, 1, 1], [2, 1, 1]]
    assert patch_groups(horizontal, vertical, threshold=0.95).unique().numel() == 9
    assert patch_groups(horizontal, vertical, threshold=0.0).unique().numel() == 1


def test_image_groups_use_one_threshold_per_layer():
    assert image_thresholds(12) == IMAGE_THRESHOLDS_12
    four = image_thresholds(4)
    assert len(four) == 4 and four[0] == 0.35 and four[-1] == 0.9 and list(four) == sorted(four)
    links = torch.full((3, 2), 0.7), torch.full((2, 3), 0.7)
    groups = image_groups([links, links], thresholds=[0.5, 0.8])
    assert [g.unique().numel() for g in groups] == [1, 9]
    with pytest.raises(ValueError, match="thresholds"):
        image_groups([links], thresholds=[0.5, 0.8])


def test_overlay_tints_groups_and_draws_borders():
    image = np.full((12, 12, 3), 255, dtype=np.uint8)
    labels = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 0, 0]])
    out = overlay(image, labels)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[0, 4] == 0).all()  # the first pixel of patch (0, 1) borders group 0: a black outline
    assert not (out[1, 1] == 0).all()  # inside patch (0, 0)
    assert (out[1, 1] == out[10, 10]).all() and not (out[1, 1] == out[1, 10]).all()  # one colour per group


def test_overlay_scales_the_group_map_and_keeps_touching_groups_apart():
    labels = torch.arange(64).reshape(8, 8)
    out = overlay(np.full((256, 256, 3), 255, dtype=np.uint8), labels)
    assert (out[:, 32:34] == 0).all() and not (out[:, 34] == 0).all()  # outlines 256 // 128 = 2 px wide
    inside = out[16::32, 16::32].astype(int)  # one pixel inside each of the 64 groups, [8, 8, 3]
    for a, b in ((inside[:, 1:], inside[:, :-1]), (inside[1:], inside[:-1])):
        assert np.abs(a - b).sum(-1).min() >= 25  # touching groups: clearly different tints
    rings = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    colours = group_colours(rings)
    assert colours.shape == (3, 3) and len({tuple(c) for c in colours}) == 3


def test_induce_cli_writes_trees_and_layer_overlays(tmp_path):
    from data_pipeline.tokenizer import Tokenizer
    from model.pretrained import save_pretrained
    from recipes.induce import main

    torch.manual_seed(0)
    base = PRESETS["tiny"]
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, attention="hier"),
                              text=dataclasses.replace(base.text, attention="hier"))
    folder = tmp_path / "model"
    save_pretrained(folder, CLIP(cfg).state_dict(), cfg)
    Tokenizer(cfg.text.context_length).save(str(folder))
    picture = tmp_path / "square.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(picture)

    out = tmp_path / "induced"
    main(["--model", str(folder), "--out", str(out), "--captions", "a dog on a red couch", "two cats",
          "--images", str(picture), "--image-thresholds", "0.3,0.5,0.7,0.9"])
    lines = (out / "trees.txt").read_text().splitlines()
    assert lines[0] == "a dog on a red couch" and lines[3] == "two cats"
    for tree, words in ((lines[1], ["a", "dog", "on", "a", "red", "couch"]), (lines[4], ["two", "cats"])):
        assert tree.count("(") == tree.count(")") >= 1
        assert tree.replace("(", "").replace(")", "").split() == words
    overlays = sorted((out / "square").glob("layer_*.png"))
    assert [p.name for p in overlays] == [f"layer_{i:02d}.png" for i in range(1, 5)]
    assert Image.open(overlays[0]).size == (256, 256)  # the 64 px model input, shown at a readable size
