"""Train and eval loaders: what the trainer calls.

    loader = build_train_loader(cfg, tokenizer, image_size=224, batch_size=256, rank=r, world_size=n,
                                seed=0, pyramid=True)
    for batch in loader: ...              # forever (resampled) or one epoch (epoch mode)
    state = loader.state_dict()           # small and picklable: this rank's position
    loader.load_state_dict(state)         # continue the same sample stream, exactly

Each rank runs `workers` DataLoader processes; each is one reader stream (see reader.py). torch's
DataLoader hands out batches round-robin over workers, and every batch carries the state of the
stream that made it, so the training process always knows each stream's position after the last
batch it *consumed* (prefetched batches don't count). On resume, DataLoader slot s runs stream
(s + consumed) mod workers, so the round-robin order continues where it stopped.
The state is per rank: gather it from every rank into the checkpoint, give each rank its own back.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.reader import DataQualityError, ReaderLimits, StreamReader, StreamState, logger
from data_pipeline.sources import ShardSchedule, check_local_shards, expand_shards, load_sources
from data_pipeline.tar_io import ShardReadError, iter_samples
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import SampleTransform, SkipSample, ViewConfig, collate

STATE_VERSION = 1


def _private_generator(seed: int) -> torch.Generator:
    """DataLoader draws its workers' base seed from the *global* torch RNG each time it is iterated, unless
    given a generator: a resumed run would then start its epoch's loader at a different point of the training
    RNG (dropout) than the uninterrupted run did. Our workers seed their own augmentations anyway."""
    return torch.Generator().manual_seed(seed)


def _ignore_termination(worker_id: int) -> None:
    """SIGTERM (SLURM's time limit, scancel) reaches every process of the job, data workers included, and torch's
    worker handler dies of it; the training process decides what it means (a preemption checkpoint), and stops
    its workers itself when done."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """Workers ignore SIGTERM, and multiprocessing's own exit hook stops daemonic children with SIGTERM and then
    joins them: the workers of a loader whose iterator is still referenced (by the traceback of the error that
    ends the run, say) would keep the process from ever exiting. At exit they get SIGKILL instead."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)  # registered after multiprocessing's hook, so it runs first (LIFO)


def _one_line(error: DataQualityError) -> DataQualityError:
    """A worker's DataQualityError comes back wrapped in its traceback; keep only the message."""
    last = str(error).strip().splitlines()[-1]
    return DataQualityError(last.split("DataQualityError: ", 1)[-1])


class _TrainStreams(IterableDataset):
    """The per-worker side: picks this worker's stream and runs its StreamReader (pickled to workers)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, views: ViewConfig, *, batch_size: int, rank: int,
                 world_size: int, seed: int, quotas: list[int] | None):
        self.sources = load_sources(cfg.train_sources())
        self.cfg, self.tokenizer, self.transform = cfg, tokenizer, SampleTransform(views)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_local = max(cfg.workers, 1)
        self.quotas = quotas
        self.limits = ReaderLimits(cfg.max_skip_rate, cfg.skip_rate_min_samples)
        # Built now so that epoch mode with too few shards fails here, not as a hang in a worker.
        self.schedules = [self._schedule(w) for w in range(self.num_local)]
        self.start_states: list[dict | None] = [None] * self.num_local
        self.rotation = 0  # DataLoader slot s runs local stream (s + rotation) % num_local
        self.epoch = 0

    def _schedule(self, local: int) -> ShardSchedule:
        return ShardSchedule(self.sources, resampled=self.cfg.resampled, seed=self.seed,
                             stream=self.rank * self.num_local + local, num_streams=self.world_size * self.num_local)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.rotation) % self.num_local
        reader = StreamReader(
            self.schedules[local], self.transform, self.tokenizer, batch_size=self.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer, seed=self.seed, stream=self.rank * self.num_local + local,
            local_stream=local, state=StreamState.from_dict(self.start_states[local]), limits=self.limits,
            quota=None if self.quotas is None else self.quotas[local], epoch=self.epoch,
        )
        return iter(reader)


class TrainLoader:
    """Iterable of batch dicts with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, streams: _TrainStreams, *, workers: int, prefetch_factor: int, pin_memory: bool,
                 batches_per_epoch: int | None):
        self.streams, self.workers, self.prefetch_factor = streams, workers, prefetch_factor
        self.pin_memory = pin_memory
        # Virtual epoch length from train_num_samples: in epoch mode each `for` stops after it (equal on every
        # rank); in resampled mode iteration never stops and this is only for the trainer's bookkeeping.
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batches_in_epoch = 0
        self.stream_states: list[dict | None] = [None] * streams.num_local
        self.last_stream: int | None = None  # stream of the last item consumed in this epoch
        self.empty_epochs = 0  # epochs in a row that yielded no batch

    def _next_stream(self) -> int:
        """The stream that serves the next item: DataLoader's round-robin skips finished workers."""
        n = self.streams.num_local
        if self.last_stream is None:
            return 0
        for step in range(1, n + 1):
            local = (self.last_stream + step) % n
            quota = None if self.streams.quotas is None else self.streams.quotas[local]
            state = StreamState.from_dict(self.stream_states[local])
            if not StreamReader.finished(state, quota, self.streams.cfg.resampled, self.epoch):
                return local
        return 0

    def __iter__(self) -> Iterator[dict]:
        self.streams.start_states = list(self.stream_states)
        self.streams.epoch = self.epoch
        self.streams.rotation = self._next_stream()
        if self.workers == 0:
            items = iter(self.streams)
        else:
            items = iter(DataLoader(self.streams, batch_size=None, num_workers=self.workers,
                                    prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                    persistent_workers=False, generator=_private_generator(self.streams.seed),
                                    worker_init_fn=_ignore_termination))
        yielded = False
        try:
            for item in items:
                self.last_stream = item.pop("_stream")
                self.stream_states[self.last_stream] = item.pop("_state")
                if item.pop("_end_of_pass", False):
                    continue
                self.batches_in_epoch += 1
                yielded = True
                yield item
        except DataQualityError as error:
            raise (_one_line(error) if self.workers else error) from None
        # An epoch resumed just after its last batch is legitimately empty; two in a row never end.
        self.empty_epochs = 0 if yielded else self.empty_epochs + 1
        if self.empty_epochs >= 2:
            raise DataQualityError(
                f"data: rank {self.streams.rank} read a whole epoch without one batch of {self.streams.batch_size}: "
                f"every shard is empty or skipped, or there are too few samples (skips: {self.skip_counts()})")
        # The epoch ran to its end (a `break` in the caller never gets here): start the next one.
        self.epoch += 1
        self.batches_in_epoch = 0
        self.last_stream = None
        for state in self.stream_states:
            if state is not None:
                state["batches"] = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("this loader has no fixed length: set data.train_num_samples")
        return self.batches_per_epoch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "last_stream": self.last_stream,
            "rank": self.streams.rank,
            "world_size": self.streams.world_size,
            "workers": self.streams.num_local,
            "seed": self.streams.seed,
            "resampled": self.streams.cfg.resampled,
            "streams": [None if s is None else dict(s) for s in self.stream_states],
        }

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        for key in ("version", "world_size", "workers", "seed", "resampled"):
            if state.get(key) != expected[key]:
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but this run has "
                                 f"{key}={expected[key]!r}: exact resume needs the same data layout")
        if state["rank"] != expected["rank"]:
            raise ValueError(f"loader state belongs to rank {state['rank']}, not rank {expected['rank']}")
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.last_stream = state["last_stream"]
        self.stream_states = [None if s is None else dict(s) for s in state["streams"]]

    # ------------------------------------------------------------------ metrics
    def skip_counts(self) -> dict[str, int]:
        """Samples/shards skipped so far on this rank, per reason (sum over its streams)."""
        total: Counter = Counter()
        for state in self.stream_states:
            if state is not None:
                total.update(state["skips"])
        return dict(total)

    def samples_seen(self) -> dict[str, int]:
        """Samples read so far on this rank per source (including skipped ones)."""
        total: Counter = Counter()
        for state in self.stream_states:
            if state is not None:
                total.update(state["seen"])
        return dict(total)


def build_train_loader(cfg: DataConfig, tokenizer: Tokenizer, *, image_size: int, batch_size: int, rank: int,
                       world_size: int, seed: int, pyramid: bool) -> TrainLoader:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    num_local = max(cfg.workers, 1)
    batches_per_epoch = quotas = None
    if cfg.train_num_samples is not None:
        batches_per_epoch = max(1, cfg.train_num_samples // (batch_size * world_size))
        if not cfg.resampled:  # epoch mode: every rank stops after the same number of batches
            # round-robin over workers: worker w serves batches w, w + W, ... of the epoch
            quotas = [len(range(w, batches_per_epoch, num_local)) for w in range(num_local)]
    views = ViewConfig(image_size=image_size, pyramid=pyramid, train=True, global_scale=tuple(cfg.global_scale),
                       local_scale=tuple(cfg.local_scale), max_regions=cfg.max_regions,
                       max_image_pixels=cfg.max_image_pixels)
    streams = _TrainStreams(cfg, tokenizer, views, batch_size=batch_size, rank=rank, world_size=world_size,
                            seed=seed, quotas=quotas)
    return TrainLoader(streams, workers=cfg.workers, prefetch_factor=cfg.prefetch_factor, pin_memory=cfg.pin_memory,
                       batches_per_epoch=batches_per_epoch)


# ---------------------------------------------------------------------- evaluation

class _EvalSamples(IterableDataset):
    """Every stream reads all eval shards in order and keeps every G-th sample: no shuffle, one pass,
    each sample on exactly one (rank, worker), last batch may be short."""

    def __init__(self, urls: list[str], tokenizer: Tokenizer, views: ViewConfig, batch_size: int, rank: int,
                 world_size: int, workers: int):
        self.urls, self.tokenizer, self.transform = urls, tokenizer, SampleTransform(views)
        self.batch_size, self.rank, self.world_size, self.workers = batch_size, rank, world_size, max(workers, 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        stream = self.rank * self.workers + (info.id if info is not None else 0)
        num_streams = self.world_size * self.workers
        index, pending = 0, []
        for url in self.urls:
            try:
                for raw in iter_samples(url):
                    index += 1
                    if (index - 1) % num_streams != stream:
                        continue
                    try:
                        pending.append(self.transform(raw))
                    except Exception as error:  # SkipSample or malformed metadata: skip the sample, say so
                        reason = error.reason if isinstance(error, SkipSample) else "bad_sample"
                        logger.warning("eval data: skipped (%s) in %s: sample %s: %s", reason, url, raw.key, error)
                        continue
                    if len(pending) == self.batch_size:
                        yield collate(pending, self.tokenizer)
                        pending = []
            except ShardReadError as error:
                logger.warning("eval data: skipped (%s): %s", error.reason, error)
                continue
        if pending:
            yield collate(pending, self.tokenizer)


def build_eval_loader(cfg: DataConfig, tokenizer: Tokenizer, *, image_size: int, batch_size: int, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """Zero-shot eval batches: "image" (resize + centre crop), "text", "label", "key"."""
    urls = expand_shards(cfg.eval_shards)
    if not urls:
        raise ValueError("data: `eval_shards` is empty")
    check_local_shards(urls, "eval")
    views = ViewConfig(image_size=image_size, pyramid=False, train=False, max_image_pixels=cfg.max_image_pixels)
    dataset = _EvalSamples(urls, tokenizer, views, batch_size, rank, world_size, cfg.workers)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.workers, generator=_private_generator(0),
                      worker_init_fn=_ignore_termination)


def load_classnames(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(classnames, prompt templates with one "{}") of the eval split, from classnames.json."""
    path = cfg.classnames or os.path.join(os.path.dirname(expand_shards(cfg.eval_shards)[0]), "classnames.json")
    with open(path) as f:
        meta = json.load(f)
    return list(meta["classnames"]), list(meta.get("templates", ["a photo of a {}."]))
