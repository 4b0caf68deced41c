"""Shared test fixtures: pinned threads (results must not depend on the core count) and synthetic shards."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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


@pytest.fixture
def synthetic_shards(tmp_path):
    """make(n_shards, per_shard) writes procedural shards (with pyramid annotations) and returns their brace spec."""
    from data_pipeline.synthetic import make_shards

    def make(n_shards: int = 4, per_shard: int = 16) -> str:
        make_shards(str(tmp_path / "shards"), n_shards, per_shard)
        return str(tmp_path / "shards" / f"shard-{{0000..{n_shards - 1:04d}}}.tar")

    return make


class PicklePayload:
    """Unpickling it creates the directory `marker`: planted in a file, it shows whether anything ran code from it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)
