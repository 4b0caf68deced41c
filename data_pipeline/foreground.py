"""Images with a foreground mask, for scoring induced patch groups: RGBA PNGs whose alpha channel is the mask.

    images, masks = foreground_set(foreground_paths("demo"), image_size=64, grid=8)

`foreground_paths("demo")` is the demo's held-out split as the Twemoji PNGs it was rendered from (alpha intact;
the shards hold them composited on white); a folder gives its *.png files, sorted. Each image is composited on
white (as the demo shards are) and goes through the eval view (resize, centre crop, normalise); its alpha goes
through the same resize and crop, and a patch is foreground when more than half of its pixels are opaque.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from data_pipeline.transforms import SampleTransform, ViewConfig


def foreground_paths(source: str) -> list[str]:
    if source == "demo":
        from data_pipeline.demo_data import is_held_out, list_emojis

        return [e.png_path for e in list_emojis() if is_held_out(e)]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"foreground images: {source!r} is neither 'demo' nor a folder of RGBA PNGs")
    paths = sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(".png"))
    if not paths:
        raise FileNotFoundError(f"foreground images: no .png files in {source}")
    return paths


def foreground_set(paths: list[str], image_size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, S, S] normalised, masks [N, grid, grid] bool); images without an alpha channel are refused."""
    view = SampleTransform(ViewConfig(image_size=image_size, train=False)).global_view
    geometry = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    images, masks = [], []
    for path in paths:
        picture = Image.open(path)
        if "A" not in picture.getbands() and "transparency" not in picture.info:
            raise ValueError(f"foreground image {path} has no alpha channel (the mask)")
        rgba = picture.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        images.append(view(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)))
        alpha = torch.from_numpy(np.asarray(rgba)[..., 3] > 0).float()[None]
        opaque = F.adaptive_avg_pool2d(geometry(alpha), grid)[0]  # fraction of opaque pixels per patch
        masks.append(opaque > 0.5)
    return torch.stack(images), torch.stack(masks)
