"""`DataConfig`: the `data:` part of the recipe config tree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One training source: a shard spec and its sampling weight (resampled mode)."""

    shards: str  # brace-expandable spec; several specs joined by "::"; "pipe:CMD" streams allowed
    weight: float = 1.0  # relative probability of drawing a shard from this source (resampled mode)
    name: str = ""  # for logs and skip metrics; defaults to the source's index


@dataclass
class DataConfig:
    # Shards. `train_shards` is shorthand for one source of weight 1; `sources` mixes several.
    train_shards: str = ""  # e.g. "/data/laion/{00000..41455}.tar" or "pipe:aws s3 cp s3://b/{0..9}.tar -"
    sources: list[SourceConfig] = field(default_factory=list)
    eval_shards: str = ""  # zero-shot split; its folder holds classnames.json (see demo_data)
    classnames: str = ""  # path of classnames.json; "" = next to the first eval shard

    # Sampling.
    resampled: bool = True  # True: draw shards with replacement, forever. False: each shard once per pass
    train_num_samples: int | None = None  # virtual epoch length (samples over all ranks); None = one pass (epoch mode)
    shuffle_buffer: int = 1000  # samples held (undecoded) for shuffling in each worker; 0 or 1 = no shuffle
    workers: int = 2  # DataLoader worker processes per rank; 0 = decode in the training process
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool = False  # page-locked batches for faster, asynchronous host-to-GPU copies (GPU runs)

    # Views and regions (SPEC §2.1).
    global_scale: tuple[float, float] = (0.9, 1.0)  # random-resized-crop area range of the global view
    local_scale: tuple[float, float] = (0.5, 1.0)  # area range of the local view (pyramid only)
    max_regions: int = 10  # R: boxes / region features per sample, padded and masked

    # Bad data: every skipped sample is counted per reason; a source whose skip rate passes
    # `max_skip_rate` (after `skip_rate_min_samples` samples seen in a worker) stops the run.
    max_skip_rate: float = 0.1
    skip_rate_min_samples: int = 200

    def train_sources(self) -> list[SourceConfig]:
        """The sources to read, with `train_shards` as a single source of weight 1."""
        sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if self.train_shards:
            sources = [SourceConfig(shards=self.train_shards, weight=1.0, name="train")] + sources
        if not sources:
            raise ValueError("data: set `train_shards` or `sources` (no training shards configured)")
        return [SourceConfig(s.shards, s.weight, s.name or f"source{i}") for i, s in enumerate(sources)]
