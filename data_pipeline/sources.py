"""Shard specs and the order in which each reader stream visits shards.

A *stream* is one (rank, worker) pair: stream g = rank * workers + worker of G = world_size * workers.
Each stream's shard sequence is a pure function of (seed, g, cursor), so a reader's position is one
integer and resuming needs no replay:
  resampled - cursor i draws a source by weight, then a shard of it uniformly, from RNG(seed, g, i);
  epoch     - pass p = i // n_g permutes all shards with RNG(seed, p) and gives stream g every G-th one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from webdataset.shardlists import expand_urls

from data_pipeline.config import SourceConfig
from data_pipeline.tar_io import is_local


def expand_shards(spec: str) -> list[str]:
    """"a/{000..009}.tar::b/x.tar" -> the list of shard urls (brace expansion, "::"-joined lists)."""
    return [url for part in spec.split("::") if part.strip() for url in expand_urls(part.strip())]


MAX_SHARDS_CHECKED = 10_000


def check_local_shards(urls: list[str], source: str) -> None:
    """Fail fast, in one line naming the path, on a local shard that does not exist (a config error;
    shards that break *during* a run are skipped and counted instead). Beyond MAX_SHARDS_CHECKED shards
    (every rank runs this; stat on a network file system is slow) an even sample of them is checked,
    which still catches a wrong pattern; a single missing shard is then skipped and counted at run time."""
    step = max(1, len(urls) // MAX_SHARDS_CHECKED)
    checked = urls[::step] + urls[-1:]
    missing = [url for url in dict.fromkeys(checked) if is_local(url) and not os.path.exists(url)]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)} shards)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data source '{source}': shard not found: {missing[0]}{more}")


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float


def load_sources(configs: list[SourceConfig], check: bool = True) -> list[Source]:
    sources = []
    for config in configs:
        urls = expand_shards(config.shards)
        if not urls:
            raise ValueError(f"data source '{config.name}': shard spec {config.shards!r} expands to no shards")
        if config.weight <= 0:
            raise ValueError(f"data source '{config.name}': weight must be > 0, got {config.weight}")
        if check:
            check_local_shards(urls, config.name)
        sources.append(Source(config.name, urls, config.weight))
    return sources


class ShardSchedule:
    """`shard(i) -> (source index, url)` for one stream; `None` past the end of a pass in epoch mode."""

    def __init__(self, sources: list[Source], *, resampled: bool, seed: int, stream: int, num_streams: int):
        self.sources, self.resampled, self.seed = sources, resampled, seed
        self.stream, self.num_streams = stream, num_streams
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        # epoch mode walks the concatenation of all sources (weights do not apply: every shard once per pass)
        self.all_shards = [(k, url) for k, s in enumerate(sources) for url in s.urls]
        if not resampled and len(self.all_shards) < num_streams:
            raise ValueError(
                f"epoch mode needs at least one shard per reader (world_size x workers = {num_streams}), "
                f"but the sources have {len(self.all_shards)} shards: use resampled mode, fewer workers, or more shards"
            )
        self.per_pass = len(range(stream, len(self.all_shards), num_streams))

    @functools.lru_cache(maxsize=256)  # called per sample by the reader; a pass permutation costs O(shards)
    def shard(self, i: int) -> tuple[int, str]:
        if self.resampled:
            rng = np.random.default_rng([self.seed, self.stream, i])
            k = int(rng.choice(len(self.sources), p=self.probabilities)) if len(self.sources) > 1 else 0
            return k, self.sources[k].urls[int(rng.integers(len(self.sources[k].urls)))]
        epoch_pass, j = divmod(i, self.per_pass)
        return self.all_shards[int(self._pass_order(epoch_pass)[self.stream + j * self.num_streams])]

    @functools.lru_cache(maxsize=2)
    def _pass_order(self, epoch_pass: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch_pass]).permutation(len(self.all_shards))
