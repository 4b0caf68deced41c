"""Shared test fixtures: pinned threads (results must not depend on the core count) and synthetic shards."""
from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORDS = ["red", "blue", "green", "cat", "dog", "house", "tree", "car", "bird", "fish", "sun", "moon"]


def write_synthetic_shards(out: Path, n_shards: int, per_shard: int, image_size: int = 32, seed: int = 0,
                           prefix: str = "train") -> list[Path]:
    """Tiny webdataset shards in img2dataset layout: {key}.png, {key}.txt, {key}.json with pyramid annotations."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                color, thing = rng.choice(WORDS[:3]), rng.choice(WORDS[3:])
                pixels = (rng.random((image_size, image_size, 3)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                meta = {"summary": str(thing), "objects": [{"label": str(thing), "attributes": [str(color)]}],
                        "boxes": [[0.1, 0.1, 0.6, 0.7]]}
                sink.write({"__key__": f"{s:04d}{i:05d}", "png": buf.getvalue(), "txt": f"a {color} {thing}",
                            "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


@pytest.fixture
def synthetic_shards(tmp_path):
    def make(n_shards: int = 4, per_shard: int = 16, **kw) -> list[Path]:
        return write_synthetic_shards(tmp_path / "shards", n_shards, per_shard, **kw)

    return make
