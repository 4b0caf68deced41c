"""Procedural shards for tests and benchmarks: coloured shapes with captions, and planted faults.

    make_shards(folder, num_shards=8, samples_per_shard=10)            -> list of shard paths
    make_shards(..., corrupt_images={(0, 3)}, empty_captions={(1, 2)}, truncate={2})   planted faults

Keys are "s{shard:03d}_{index:04d}" so a test can tell exactly which samples came out.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from data_pipeline.tar_io import write_shard

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "disc")


def make_image(rng: np.random.Generator, size: int, fmt: str) -> tuple[bytes, str, list[float]]:
    """A random shape on a noisy background; returns (encoded bytes, caption, normalised xyxy box)."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    w = int(rng.integers(size // 4, size // 2))
    x0, y0 = (int(v) for v in rng.integers(0, size - w, size=2))
    if shape == "square":
        pixels[y0 : y0 + w, x0 : x0 + w] = COLOURS[colour]
    else:
        yy, xx = np.mgrid[:size, :size]
        r = w / 2
        pixels[(yy - y0 - r) ** 2 + (xx - x0 - r) ** 2 <= r * r] = COLOURS[colour]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
    box = [x0 / size, y0 / size, (x0 + w) / size, (y0 + w) / size]
    return buffer.getvalue(), f"a {colour} {shape} on a dark background", box


def make_shards(folder: str, num_shards: int = 8, samples_per_shard: int = 10, *, image_size: int = 32,
                fmt: str = "jpg", seed: int = 0, corrupt_images: set[tuple[int, int]] = frozenset(),
                empty_captions: set[tuple[int, int]] = frozenset(), truncate: set[int] = frozenset(),
                prefix: str = "shard") -> list[str]:
    """Write `num_shards` tars of `samples_per_shard` samples; plant faults at (shard, index) positions.
    A shard in `truncate` is cut in the middle of its second half (a partial member at the end)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(num_shards):
        samples = []
        for index in range(samples_per_shard):
            image, caption, box = make_image(rng, image_size, fmt)
            _, colour, shape = caption.split()[:3]
            meta = {"summary": f"a {shape}", "objects": [{"label": shape, "attributes": [colour]}], "boxes": [box],
                    "label": SHAPES.index(shape)}
            if (shard, index) in corrupt_images:
                image = image[: len(image) // 3]  # a truncated JPEG/PNG: the decoder rejects it
            if (shard, index) in empty_captions:
                caption = "  "
            samples.append({"__key__": f"s{shard:03d}_{index:04d}", fmt: image, "txt": caption, "json": json.dumps(meta)})
        path = os.path.join(folder, f"{prefix}-{shard:04d}.tar")
        write_shard(path, samples)
        if shard in truncate:
            _truncate_tar(path)
        paths.append(path)
    return paths


def _truncate_tar(path: str) -> None:
    """Cut the file inside the data of a member in the second half of the shard."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    target = members[(3 * len(members)) // 4]
    with open(path, "r+b") as f:
        f.truncate(target.offset_data + max(1, target.size // 2))


def samples_kept_after_truncation(samples_per_shard: int, fields_per_sample: int = 3) -> int:
    """How many leading samples of a shard cut by `_truncate_tar` are still complete."""
    return ((3 * samples_per_shard * fields_per_sample) // 4) // fields_per_sample
