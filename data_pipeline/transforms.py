"""Decode one raw sample and make its views, with torchvision v2 decoders and transforms.

Train (CLIP):     one random resized crop (the global view, 90-100% of the area), bicubic.
Train (pyramid):  + a local view (50-100%, sampled independently) + the summary / object texts, and
                  the region boxes, which ride through the *global* crop as v2 BoundingBoxes.
Eval:             resize the short side + centre crop (CLIP's eval preprocessing), normalised per image, and
                  the class label.
Train views stay uint8 and texts stay strings here; `collate` normalises and tokenises a whole batch at once.
Problems that make a sample unusable raise `SkipSample(reason)`; the reader counts and logs them.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from data_pipeline.annotate import objects_text
from data_pipeline.tar_io import IMAGE_EXTENSIONS, RawSample, image_extension
from data_pipeline.tokenizer import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_EXTENSIONS = ("txt", "caption")
REGION_FEATURES_EXTENSION = "regions.npy"  # optional float [n, 2052]: detector feature (2048) + box (4)
REGION_FEATURE_DIM = 2052
DEFAULT_MAX_IMAGE_PIXELS = 36_000_000  # DataConfig.max_image_pixels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SkipSample(Exception):
    """The sample cannot be used; `reason` is the counter it goes into."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ViewConfig:
    image_size: int
    pyramid: bool = False
    train: bool = True
    global_scale: tuple[float, float] = (0.9, 1.0)
    local_scale: tuple[float, float] = (0.5, 1.0)
    max_regions: int = 10
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Skip ("oversized_image") an image whose header declares more than max_pixels, before anything is decoded.
    PIL reads the header only; one it cannot parse is left to the decoder to accept or reject."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as e:  # PIL refuses to even report a size above 2x its warning limit
        raise SkipSample("oversized_image", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels (PIL's "
                         f"decompression-bomb limit), limit {max_pixels}") from e
    except Exception:
        return
    if width * height > max_pixels:
        raise SkipSample("oversized_image", f"{width}x{height} = {width * height} pixels, limit {max_pixels}")


@contextmanager
def _libpng_quiet():
    """libpng prints warnings about harmless chunk trouble ("sRGB: out of place", "iCCP: known incorrect sRGB
    profile") straight to stderr, once per image: web PNGs would flood the log. Real errors still raise. The
    window is one decode; in a DataLoader worker nothing else writes to stderr meanwhile."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded JPEG/PNG/WEBP/GIF bytes -> uint8 [3, H, W] (16-bit PNGs are scaled down to 8 bits)."""
    check_pixels(data, max_pixels)
    try:
        with _libpng_quiet() if data.startswith(PNG_SIGNATURE) else nullcontext():
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError/ValueError variants per codec
        raise SkipSample("corrupt_image", str(e)[:200]) from e
    return image if image.dtype == torch.uint8 else v2.functional.to_dtype(image, torch.uint8, scale=True)


class SampleTransform:
    """RawSample -> dict of per-sample tensors and strings (picklable: it runs in DataLoader workers)."""

    def __init__(self, views: ViewConfig):
        self.views = views
        size, bicubic = views.image_size, v2.InterpolationMode.BICUBIC  # bicubic, as CLIP's preprocessing
        if views.train:
            # Train views stay uint8 here; `collate` converts and normalises the whole batch at once (cheaper).
            self.global_view = v2.Compose([
                v2.RandomResizedCrop(size, scale=views.global_scale, interpolation=bicubic, antialias=True),
                v2.ClampBoundingBoxes()])
            self.local_view = v2.RandomResizedCrop(size, scale=views.local_scale, interpolation=bicubic, antialias=True)
        else:
            # One uint8 image -> normalised float [3, S, S]; also used on its own (eval_sets, induce).
            self.global_view = v2.Compose([v2.Resize(size, interpolation=bicubic, antialias=True), v2.CenterCrop(size),
                                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, raw: RawSample) -> dict:
        image_ext = image_extension(raw.fields)
        if image_ext is None:
            raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member")
        caption = next((raw.fields[e] for e in CAPTION_EXTENSIONS if e in raw.fields), b"").decode("utf-8", "replace").strip()
        if not caption:
            raise SkipSample("missing_caption", "empty or absent txt")
        image = decode_rgb(raw.fields[image_ext], self.views.max_image_pixels)
        sample: dict = {"key": raw.key, "text": caption}
        meta = self._meta(raw) if (self.views.pyramid or not self.views.train) else {}
        if not self.views.train:
            sample["image"] = self.global_view(image)
            sample["label"] = int(meta.get("label", -1))
            return sample
        if not self.views.pyramid:
            sample["image"] = self.global_view(image)
            return sample
        boxes = self._boxes(meta, image.shape[-2:])
        sample["image"], boxes = self.global_view(image, boxes)
        sample["image_local"] = self.local_view(image)
        sample["summary"] = str(meta.get("summary") or "")
        sample["objects"] = objects_text(meta.get("objects"))
        sample["boxes"], sample["boxes_mask"] = self._pad_boxes(boxes)
        if REGION_FEATURES_EXTENSION in raw.fields:
            sample["region_features"] = self._region_features(raw.fields[REGION_FEATURES_EXTENSION])
        return sample

    @staticmethod
    def _meta(raw: RawSample) -> dict:
        try:
            return json.loads(raw.fields["json"]) if raw.fields.get("json") else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipSample("corrupt_json", str(e)[:200]) from e

    def _boxes(self, meta: dict, hw: tuple[int, int]) -> tv_tensors.BoundingBoxes:
        h, w = int(hw[0]), int(hw[1])
        boxes = torch.tensor(meta.get("boxes") or [], dtype=torch.float32).reshape(-1, 4)[: self.views.max_regions]
        return tv_tensors.BoundingBoxes(boxes * torch.tensor([w, h, w, h]), format="XYXY", canvas_size=(h, w))

    def _pad_boxes(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel xyxy in the cropped view -> [R, 4] in [0, 1] + mask (boxes cropped away are masked)."""
        size = float(self.views.image_size)
        boxes = boxes.as_subclass(torch.Tensor) / size
        keep = ((boxes[:, 2] - boxes[:, 0]) * size >= 1) & ((boxes[:, 3] - boxes[:, 1]) * size >= 1)
        out = torch.zeros(self.views.max_regions, 4)
        mask = torch.zeros(self.views.max_regions, dtype=torch.bool)
        out[: len(boxes)] = boxes.clamp(0, 1) * keep[:, None]
        mask[: len(boxes)] = keep
        return out, mask

    def _region_features(self, data: bytes) -> torch.Tensor:
        features = torch.from_numpy(np.load(io.BytesIO(data))).float().reshape(-1, REGION_FEATURE_DIM)
        out = torch.zeros(self.views.max_regions, REGION_FEATURE_DIM)
        out[: min(len(features), self.views.max_regions)] = features[: self.views.max_regions]
        return out


def normalise(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3,S,S] train views -> float [B,3,S,S] with CLIP's mean/std (eval views arrive normalised)."""
    batch = torch.stack(images)
    if batch.is_floating_point():
        return batch
    batch = v2.functional.to_dtype(batch, torch.float32, scale=True)
    return v2.functional.normalize(batch, CLIP_MEAN, CLIP_STD, inplace=True)


def collate(samples: list[dict], tokenizer: Tokenizer) -> dict:
    """Stack per-sample outputs into the batch dict the trainer consumes (texts tokenised here)."""
    batch: dict = {"key": [s["key"] for s in samples], "image": normalise([s["image"] for s in samples]),
                   "text": tokenizer([s["text"] for s in samples])}
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if "image_local" not in samples[0]:
        return batch
    batch["image_local"] = normalise([s["image_local"] for s in samples])
    for field in ("summary", "objects"):
        texts = [s[field] for s in samples]
        batch[field] = tokenizer([t or "" for t in texts])
        batch[f"{field}_mask"] = torch.tensor([bool(t) for t in texts])
    batch["boxes"] = torch.stack([s["boxes"] for s in samples])
    batch["boxes_mask"] = torch.stack([s["boxes_mask"] for s in samples])
    if any("region_features" in s for s in samples):
        empty = torch.zeros_like(next(s["region_features"] for s in samples if "region_features" in s))
        batch["region_features"] = torch.stack([s.get("region_features", empty) for s in samples])
        batch["region_features_mask"] = torch.tensor([["region_features" in s] * empty.shape[0] for s in samples])
    return batch
