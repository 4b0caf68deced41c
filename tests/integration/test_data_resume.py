"""Exact resume: (run to step k, stop, resume from the saved state to step n) yields the same sample
keys, as sequences, as (run to step n) — resampled and epoch modes, 2 ranks x 2 DataLoader workers.
Ranks are simulated by building loaders with rank=0/1, world_size=2 (the loader needs no process group)."""

import pickle

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.synthetic import make_shards
from data_pipeline.tokenizer import Tokenizer

WORLD, WORKERS, BATCH = 2, 2, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_shards")
    make_shards(str(folder), num_shards=9, samples_per_shard=11, image_size=24)  # odd sizes: uneven streams
    return f"{folder}/shard-{{0000..0008}}.tar"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def take(loader, n: int) -> list[list[str]]:
    """The keys of the next n batches, walking through as many epochs as needed."""
    keys: list[list[str]] = []
    while len(keys) < n:
        produced = 0
        for batch in loader:
            keys.append(batch["key"])
            produced += 1
            if len(keys) == n:
                break
        assert produced or len(keys) == n or loader.batches_in_epoch == 0
    return keys


MODES = {
    "resampled": dict(resampled=True),
    "epoch_one_pass": dict(resampled=False),  # each `for` is one pass; streams end unevenly
    "epoch_virtual": dict(resampled=False, train_num_samples=30),  # fixed 5 batches per epoch per rank
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stop_at", [5, 12])
def test_resume_continues_the_same_stream(shards, tokenizer, mode, stop_at):
    torch.set_num_threads(1)
    total = 26  # crosses several epochs in both epoch modes
    for rank in range(WORLD):
        cfg = DataConfig(train_shards=shards, workers=WORKERS, shuffle_buffer=7, prefetch_factor=2, **MODES[mode])

        def build():
            return build_train_loader(cfg, tokenizer, image_size=16, batch_size=BATCH, rank=rank, world_size=WORLD,
                                      seed=5, pyramid=False)

        uninterrupted = take(build(), total)
        first = build()
        head = take(first, stop_at)
        state = pickle.loads(pickle.dumps(first.state_dict()))  # as it would travel through a checkpoint
        resumed = build()
        resumed.load_state_dict(state)
        tail = take(resumed, total - stop_at)
        assert head + tail == uninterrupted, f"rank {rank}: resumed stream differs"
        # the stream is a real shuffle of real data, not a constant
        assert len({k for batch in uninterrupted for k in batch}) > BATCH * 5


def test_ranks_and_workers_read_disjoint_shards_in_epoch_mode(shards, tokenizer):
    cfg = DataConfig(train_shards=shards, workers=WORKERS, shuffle_buffer=4, resampled=False)
    seen = []
    for rank in range(WORLD):
        loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=1, rank=rank, world_size=WORLD,
                                    seed=0, pyramid=False)
        seen += [k for batch in loader for k in batch["key"]]  # one epoch
    assert sorted(seen) == sorted(f"s{s:03d}_{i:04d}" for s in range(9) for i in range(11))  # every sample once


def test_resume_rejects_a_different_layout(shards, tokenizer):
    cfg = DataConfig(train_shards=shards, workers=WORKERS, shuffle_buffer=4)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=2, rank=0, world_size=2, seed=0, pyramid=False)
    state = loader.state_dict()
    other = build_train_loader(DataConfig(train_shards=shards, workers=1), tokenizer, image_size=16, batch_size=2,
                               rank=0, world_size=2, seed=0, pyramid=False)
    with pytest.raises(ValueError, match="workers"):
        other.load_state_dict(state)


def test_resume_reproduces_the_augmentations_too(shards, tokenizer):
    """Not only the keys: the crops (global, local, boxes) after a resume equal the uninterrupted run's."""
    torch.set_num_threads(1)
    cfg = DataConfig(train_shards=shards, workers=WORKERS, shuffle_buffer=5)

    def build():
        return build_train_loader(cfg, tokenizer, image_size=16, batch_size=BATCH, rank=1, world_size=WORLD, seed=9,
                                  pyramid=True)

    def run(loader, n):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    uninterrupted = run(build(), 7)
    first = build()
    run(first, 3)
    resumed = build()
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    for expected, got in zip(uninterrupted[3:], run(resumed, 4)):
        assert expected["key"] == got["key"]
        for field in ("image", "image_local", "boxes", "boxes_mask", "text", "summary", "objects"):
            assert torch.equal(expected[field], got[field]), field
