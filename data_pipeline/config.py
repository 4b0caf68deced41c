"""`DataConfig`: the `data:` part of the recipe config tree."""

from __future__ import annotations

from dataclasses import dataclass, field

# Zero-shot prompts for class names that come without their own (image folders, build_shards' classnames.json).
DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


@dataclass
class SourceConfig:
    """One training source: a shard spec and its sampling weight (resampled mode)."""

    shards: str  # brace-expandable spec; several specs joined by "::"; "pipe:CMD" streams allowed
    weight: float = 1.0  # relative probability of drawing a shard from this source (resampled mode)
    name: str = ""  # for logs and skip metrics; defaults to the source's index

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("shards must be a shard spec, got ''")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight!r}")


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

    # Views and regions (docs/method.md §2.1).
    global_scale: tuple[float, float] = (0.9, 1.0)  # random-resized-crop area range of the global view
    local_scale: tuple[float, float] = (0.5, 1.0)  # area range of the local view (pyramid only)
    max_regions: int = 10  # R: boxes / region features per sample, padded and masked

    # Bad data: every skipped sample is counted per reason; a source whose skip rate passes
    # `max_skip_rate` (after `skip_rate_min_samples` samples seen in a worker) stops the run.
    max_skip_rate: float = 0.1
    skip_rate_min_samples: int = 200
    # Images with more pixels are skipped ("oversized_image") after reading only their header: a 20000x20000 PNG
    # of 0.4 MB would decode to 1.2 GB. 36 MP keeps 8K frames (33 MP) and any photo worth a 224-448 px crop.
    # PIL's decompression-bomb limit (179 MP) caps it.
    max_image_pixels: int = 36_000_000

    def __post_init__(self) -> None:
        # (name, ok, allowed): one line per field, the builder adds the section's path.
        for name, ok, allowed in (
            ("train_num_samples", self.train_num_samples is None or self.train_num_samples >= 1, "≥ 1 or null"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, "≥ 0"),
            ("workers", self.workers >= 0, "≥ 0 (0 decodes in the training process)"),
            ("prefetch_factor", self.prefetch_factor >= 1, "≥ 1"),
            ("global_scale", _area_range(self.global_scale), "a range [lo, hi] with 0 < lo ≤ hi ≤ 1"),
            ("local_scale", _area_range(self.local_scale), "a range [lo, hi] with 0 < lo ≤ hi ≤ 1"),
            ("max_regions", self.max_regions >= 0, "≥ 0"),
            ("max_skip_rate", 0 <= self.max_skip_rate <= 1, "in [0, 1]"),
            ("skip_rate_min_samples", self.skip_rate_min_samples >= 1, "≥ 1"),
            ("max_image_pixels", self.max_image_pixels >= 1, "≥ 1"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def train_sources(self) -> list[SourceConfig]:
        """The sources to read, with `train_shards` as a single source of weight 1."""
        sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if self.train_shards:
            sources = [SourceConfig(shards=self.train_shards, weight=1.0, name="train")] + sources
        if not sources:
            raise ValueError("data: set `train_shards` or `sources` (no training shards configured)")
        return [SourceConfig(s.shards, s.weight, s.name or f"source{i}") for i, s in enumerate(sources)]


def _area_range(r) -> bool:
    return len(r) == 2 and 0 < r[0] <= r[1] <= 1
