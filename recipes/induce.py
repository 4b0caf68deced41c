r"""Induce hierarchies with a trained HiCLIP model (docs/method.md §1.3): constituency trees for captions, patch groups
for images.

    python -m recipes.induce --model runs/demo/model --captions "a dog on a red couch" "two apples" \
        --images photo.jpg --out runs/demo/induced [--text-threshold 0.8] [--image-thresholds 0.35,0.5,...]

--model is a consolidated model folder (weights, config.json and the tokenizer files). Writes OUT/trees.txt
(each caption, then its bracketed tree over BPE tokens) and OUT/<image name>/layer_<l>.png, the image tinted
by its patch groups at each layer (layer 1 is the lowest), each group in its own colour and outlined in black.
Overlays are drawn on the original image resized and centre-cropped as the model saw it, at --overlay-size
pixels (default 256; never below the model's input size), so that a 64 px model's groups stay visible.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import SampleTransform, ViewConfig, decode_rgb
from model.clip import CLIP
from model.induction import TEXT_THRESHOLD, image_groups, overlay, parse_tree
from model.pretrained import load_pretrained
from model.text import eot_positions


def _token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    inverse = {i: token for token, i in tokenizer._vocab.items()}
    return [inverse[i].replace("</w>", "") for i in ids]


@torch.no_grad()
def caption_trees(model: CLIP, tokenizer: Tokenizer, captions: list[str], threshold: float) -> list[str]:
    """One bracketed tree per caption, over its tokens between start- and end-of-text."""
    tokens = tokenizer(captions)
    _, links = model.text(tokens, return_links=True)
    if not links:
        raise ValueError("the text tower has no hierarchy-aware layers (model.text.attention is 'vanilla')")
    per_layer = torch.stack(links, dim=1)  # [B, layers, N - 1]; link i joins tokens i and i + 1
    trees = []
    for row, eot in enumerate(eot_positions(tokens).tolist()):
        words = _token_strings(tokenizer, tokens[row, 1:eot].tolist())
        trees.append(parse_tree(words, per_layer[row, :, 1:eot - 1], threshold))
    return trees


@torch.no_grad()
def image_group_maps(model: CLIP, images: torch.Tensor, thresholds: list[float] | None) -> list[list[torch.Tensor]]:
    """Per image, per layer, the patch-group labels [G, G]."""
    _, links = model.visual.transformer(model.visual.tokens(images), return_links=True)
    if not links:
        raise ValueError("the vision tower has no hierarchy-aware layers (model.vision.attention is 'vanilla')")
    return [image_groups([(h[i], v[i]) for h, v in links], thresholds) for i in range(images.shape[0])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="consolidated model folder")
    parser.add_argument("--captions", nargs="*", default=[])
    parser.add_argument("--images", nargs="*", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-threshold", type=float, default=TEXT_THRESHOLD)
    parser.add_argument("--image-thresholds", type=lambda s: [float(t) for t in s.split(",")], default=None,
                        help="comma-separated θ per vision layer, lowest first (default: docs/method.md §1.3)")
    parser.add_argument("--overlay-size", type=int, default=256, help="side of the overlay PNGs in pixels")
    args = parser.parse_args(argv)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: image not found: {missing[0]}")
    try:
        model, cfg = load_pretrained(args.model)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.captions:
        trees = caption_trees(model, Tokenizer.from_folder(args.model), args.captions, args.text_threshold)
        lines = [line for caption, tree in zip(args.captions, trees) for line in (caption, tree, "")]
        (out / "trees.txt").write_text("\n".join(lines))
        print("\n".join(lines))
    if args.images:
        preprocess = SampleTransform(ViewConfig(image_size=cfg.vision.image_size, train=False)).global_view
        decoded = [decode_rgb(Path(p).read_bytes()) for p in args.images]
        images = torch.stack([preprocess(image) for image in decoded])
        size = max(args.overlay_size, cfg.vision.image_size)
        # the same resize + centre crop as the model's view, at the overlay's size
        shown = [v2.functional.center_crop(v2.functional.resize(image, size, v2.InterpolationMode.BICUBIC, antialias=True), size).permute(1, 2, 0)
                 .numpy() for image in decoded]
        for path, picture, layers in zip(args.images, shown, image_group_maps(model, images, args.image_thresholds)):
            folder = out / Path(path).stem
            folder.mkdir(exist_ok=True)
            for layer, labels in enumerate(layers, start=1):
                Image.fromarray(overlay(np.ascontiguousarray(picture), labels)).save(folder / f"layer_{layer:02d}.png")
            print(f"{path}: groups per layer {[int(labels.max()) + 1 for labels in layers]} -> {folder}")


if __name__ == "__main__":
    main()
