"""One reader stream: shards -> shuffle buffer -> decode/augment -> batches, with an exact, small state.

Each (rank, DataLoader worker) pair runs one `StreamReader`. Everything it does is a function of its
`StreamState`, which it attaches to every batch it emits, so the training process always holds the
state "just after the last batch it consumed" for each stream:
  cursor, offset  - which shard (an index into the stream's `ShardSchedule`) and the byte offset of
                    the next sample in it: resuming seeks there, nothing before it is decoded;
  buffer          - (cursor, offset) references of the undecoded samples sitting in the shuffle
                    buffer, re-fetched by offset on resume (a few hundred small reads);
  rng             - the shuffle RNG; augmentation RNG is re-derived per sample from (seed, stream, drawn);
  skips, seen     - bad-data counters (per reason, and per source for the skip-rate threshold).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.data import get_worker_info

from data_pipeline.sources import ShardSchedule
from data_pipeline.tar_io import RawSample, ShardReadError, fetch_samples, iter_samples
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import SampleTransform, SkipSample, collate

logger = logging.getLogger("hiclip.data")
LOG_FIRST_SKIPS = 10  # per reason and stream, then one line every LOG_EVERY_SKIPS
LOG_EVERY_SKIPS = 1000


class DataQualityError(ValueError):
    """A source's skip rate passed `max_skip_rate`, or an epoch yielded no batch: the data, not the code, needs
    attention (a ValueError: entry points report it in one line, like any other bad input)."""


@dataclass
class StreamState:
    cursor: int = 0  # index into the stream's shard schedule
    offset: int = 0  # byte offset of the next unread sample in that shard
    rng: tuple | None = None  # random.Random state of the shuffle buffer
    buffer: list[tuple[int, int]] = field(default_factory=list)  # (cursor, offset) of buffered samples
    drawn: int = 0  # samples taken out of the buffer so far (seeds their augmentation)
    batches: int = 0  # batches emitted in the current epoch (quota bookkeeping)
    done_epoch: int = -1  # last epoch whose pass this stream finished (epoch mode without quota)
    skips: dict[str, int] = field(default_factory=dict)  # reason -> count
    seen: dict[str, int] = field(default_factory=dict)  # source -> samples (and shard failures) seen
    skipped: dict[str, int] = field(default_factory=dict)  # source -> of which skipped

    def to_dict(self) -> dict:
        """A snapshot (taken once per batch: shallow copies, not `dataclasses.asdict`'s deep walk)."""
        snapshot = dict(vars(self))
        for name in ("buffer", "skips", "seen", "skipped"):
            snapshot[name] = type(snapshot[name])(snapshot[name])
        return snapshot

    @classmethod
    def from_dict(cls, state: dict | None) -> "StreamState":
        if state is None:
            return cls()
        state = dict(state)
        state["buffer"] = [tuple(ref) for ref in state.get("buffer", [])]
        if state.get("rng") is not None:  # random.Random wants nested tuples back
            version, internal, gauss = state["rng"]
            state["rng"] = (version, tuple(internal), gauss)
        return cls(**state)


@dataclass(frozen=True)
class ReaderLimits:
    max_skip_rate: float
    min_samples: int


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator (what v2 transforms draw from) for one sample. In the training process
    (workers=0) the caller's RNG state is put back afterwards. `torch.manual_seed` is avoided: it also
    seeds every accelerator and costs ~0.4 ms, more than a sample's crop."""
    generator = torch.default_generator
    saved = generator.get_state() if get_worker_info() is None else None
    generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            generator.set_state(saved)


def augmentation_seed(seed: int, stream: int, drawn: int) -> int:
    return ((seed * 1_000_003 + stream) * 1_000_000_007 + drawn) % (2**63)


class StreamReader:
    """Yields batch dicts, each carrying `_stream` and `_state` (the state after that batch)."""

    def __init__(self, schedule: ShardSchedule, transform: SampleTransform, tokenizer: Tokenizer, *, batch_size: int,
                 shuffle_buffer: int, seed: int, stream: int, local_stream: int, state: StreamState,
                 limits: ReaderLimits, quota: int | None, epoch: int):
        self.schedule, self.transform, self.tokenizer = schedule, transform, tokenizer
        self.batch_size, self.shuffle_buffer = batch_size, max(1, shuffle_buffer)
        self.seed, self.stream, self.local_stream = seed, stream, local_stream
        self.state, self.limits = state, limits
        # quota: batches to emit this epoch (virtual epoch); None: forever (resampled) or one pass (epoch mode)
        self.quota = quota
        self.epoch = epoch  # epoch mode without quota: epoch e reads pass e of the shard schedule

    # ------------------------------------------------------------------ the pipeline
    def __iter__(self) -> Iterator[dict]:
        state = self.state
        if self.finished(state, self.quota, self.schedule.resampled, self.epoch):
            return
        rng = random.Random(f"{self.seed}:{self.stream}")
        if state.rng is not None:
            rng.setstate(state.rng)
        one_pass = self.quota is None and not self.schedule.resampled
        pass_end = (self.epoch + 1) * self.schedule.per_pass if one_pass else None
        if one_pass and state.cursor < self.epoch * self.schedule.per_pass:
            state.cursor, state.offset = self.epoch * self.schedule.per_pass, 0
        buffer = self._refill(state.buffer)
        pending: list[dict] = []
        for ref, raw in self._raw_samples(pass_end):
            buffer.append((ref, raw))
            if len(buffer) < self.shuffle_buffer:
                continue
            batch = self._take(buffer, rng, pending)
            if batch is not None:
                yield self._emit(batch, buffer, rng)
                if self.quota is not None and state.batches >= self.quota:
                    return
        while buffer:  # end of the pass: drain the buffer, drop the last partial batch
            batch = self._take(buffer, rng, pending)
            if batch is not None:
                yield self._emit(batch, buffer, rng)
        state.cursor, state.offset, state.done_epoch = pass_end, 0, self.epoch
        yield {"_stream": self.local_stream, "_state": self._snapshot(buffer, rng), "_end_of_pass": True}

    @staticmethod
    def finished(state: StreamState, quota: int | None, resampled: bool, epoch: int) -> bool:
        """Has this stream nothing left to emit in `epoch`?"""
        if quota is not None:
            return state.batches >= quota
        return not resampled and state.done_epoch >= epoch

    def _take(self, buffer: list, rng: random.Random, pending: list[dict]) -> dict | None:
        """Pop one random buffered sample, decode it into `pending`; return a batch when full."""
        j = rng.randrange(len(buffer))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        (cursor, _), raw = buffer.pop()
        self.state.drawn += 1
        source, url = self.schedule.shard(cursor)
        try:
            with seeded_cpu_rng(augmentation_seed(self.seed, self.stream, self.state.drawn)):
                sample = self.transform(raw)
        except SkipSample as skip:
            self._count_skip(source, url, skip.reason, f"sample {raw.key}: {skip}")
            return None
        except Exception as error:  # malformed metadata etc.: still the data's fault, still only one sample
            self._count_skip(source, url, "bad_sample", f"sample {raw.key}: {type(error).__name__}: {error}")
            return None
        self._count_seen(source)
        pending.append(sample)
        if len(pending) < self.batch_size:
            return None
        batch = collate(pending, self.tokenizer)
        pending.clear()
        return batch

    def _emit(self, batch: dict, buffer: list, rng: random.Random) -> dict:
        self.state.batches += 1
        batch["_stream"] = self.local_stream
        batch["_state"] = self._snapshot(buffer, rng)
        return batch

    def _snapshot(self, buffer: list, rng: random.Random) -> dict:
        self.state.rng = rng.getstate()
        self.state.buffer = [ref for ref, _ in buffer]
        return self.state.to_dict()

    # ------------------------------------------------------------------ reading
    def _raw_samples(self, pass_end: int | None) -> Iterator[tuple[tuple[int, int], RawSample]]:
        """Samples from (cursor, offset) on, shard after shard; shard failures are counted and skipped."""
        state = self.state
        while pass_end is None or state.cursor < pass_end:
            source, url = self.schedule.shard(state.cursor)
            try:
                for raw in iter_samples(url, state.offset):
                    state.offset = raw.end
                    yield (state.cursor, raw.offset), raw
            except ShardReadError as error:
                self._count_skip(source, url, error.reason, str(error))
            state.cursor, state.offset = state.cursor + 1, 0

    def _refill(self, refs: list[tuple[int, int]]) -> list[tuple[tuple[int, int], RawSample]]:
        """Rebuild the shuffle buffer, in its saved order, from (cursor, offset) references."""
        by_cursor: dict[int, list[int]] = {}
        for cursor, offset in refs:
            by_cursor.setdefault(cursor, []).append(offset)
        fetched: dict[tuple[int, int], RawSample] = {}
        for cursor, offsets in by_cursor.items():
            source, url = self.schedule.shard(cursor)
            try:
                for offset, raw in fetch_samples(url, offsets).items():
                    fetched[(cursor, offset)] = raw
            except ShardReadError as error:
                self._count_skip(source, url, error.reason, f"refilling the shuffle buffer: {error}")
        return [(ref, fetched[ref]) for ref in refs if ref in fetched]

    # ------------------------------------------------------------------ bad data
    def _count_seen(self, source: int) -> None:
        name = self.schedule.sources[source].name
        self.state.seen[name] = self.state.seen.get(name, 0) + 1

    def _count_skip(self, source: int, url: str, reason: str, detail: str) -> None:
        name = self.schedule.sources[source].name
        state = self.state
        state.skips[reason] = state.skips.get(reason, 0) + 1
        state.skipped[name] = state.skipped.get(name, 0) + 1
        self._count_seen(source)
        count = state.skips[reason]
        if count <= LOG_FIRST_SKIPS or count % LOG_EVERY_SKIPS == 0:  # web data: don't flood the log
            logger.warning("data: skipped (%s) in %s: %s [stream %d: %d %s so far]", reason, url, detail,
                           self.stream, count, reason)
        seen, skipped = state.seen[name], state.skipped[name]
        if seen >= self.limits.min_samples and skipped / seen > self.limits.max_skip_rate:
            raise DataQualityError(
                f"data source '{name}': skip rate {skipped / seen:.1%} ({skipped} of {seen}) passed "
                f"max_skip_rate={self.limits.max_skip_rate:.1%}; last bad shard: {url} ({reason}); "
                f"skips so far: {state.skips}"
            )
