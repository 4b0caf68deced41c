"""Bad data never stops a run: planted corrupt images, empty captions, a truncated tar and an unreadable
shard are skipped and counted exactly, over 2 ranks x 2 workers; a source whose skip rate passes the
threshold stops the run with a message naming the shard."""

import logging
import os

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.reader import DataQualityError
from data_pipeline.synthetic import make_shards, samples_kept_after_truncation
from data_pipeline.tokenizer import Tokenizer

SHARDS, PER_SHARD = 7, 12
CORRUPT = {(0, 1), (3, 5), (4, 0), (6, 11)}
EMPTY = {(1, 2), (5, 7)}
TRUNCATED = 2


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("faulty"))
    make_shards(folder, SHARDS, PER_SHARD, image_size=24, corrupt_images=CORRUPT, empty_captions=EMPTY,
                truncate={TRUNCATED})
    with open(os.path.join(folder, f"shard-{SHARDS:04d}.tar"), "wb") as f:  # exists, but is no tar at all
        f.write(os.urandom(3000))
    kept = samples_kept_after_truncation(PER_SHARD)
    good = {f"s{s:03d}_{i:04d}" for s in range(SHARDS) for i in range(PER_SHARD)
            if (s, i) not in CORRUPT | EMPTY and not (s == TRUNCATED and i >= kept)}
    return f"{folder}/shard-{{0000..{SHARDS:04d}}}.tar", good


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_planted_faults_are_skipped_and_counted_exactly(faulty, tokenizer):
    torch.set_num_threads(1)
    spec, good = faulty
    cfg = DataConfig(train_shards=spec, workers=2, shuffle_buffer=5, resampled=False, max_skip_rate=0.5)
    keys, skips = [], {}
    for rank in range(2):
        loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=1, rank=rank, world_size=2, seed=1,
                                    pyramid=True)
        keys += [k for batch in loader for k in batch["key"]]  # one epoch, trains through
        for reason, count in loader.skip_counts().items():
            skips[reason] = skips.get(reason, 0) + count
    assert skips == {"corrupt_image": len(CORRUPT), "missing_caption": len(EMPTY), "truncated_tar": 1,
                     "unreadable_shard": 1}
    assert sorted(keys) == sorted(good)  # nothing good lost, nothing bad let through


def test_skips_are_logged_per_reason(faulty, tokenizer, caplog):
    spec, _ = faulty
    cfg = DataConfig(train_shards=spec, workers=0, shuffle_buffer=3, resampled=False, max_skip_rate=0.5)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=4, rank=0, world_size=1, seed=0,
                                pyramid=False)
    with caplog.at_level(logging.WARNING, logger="hiclip.data"):
        batches = list(loader)
    assert batches
    logged = [r.getMessage() for r in caplog.records if r.name == "hiclip.data"]
    for reason, count in loader.skip_counts().items():
        assert sum(f"skipped ({reason})" in line for line in logged) == count
    assert sum(loader.skip_counts().values()) == len(CORRUPT) + len(EMPTY) + 2
    assert any(f"shard-{TRUNCATED:04d}.tar" in line for line in logged)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_rate_threshold_stops_the_run_naming_the_shard(tmp_path, tokenizer, workers):
    torch.set_num_threads(1)
    rotten = {(0, i) for i in range(0, 10, 2)}  # half of shard 0 is corrupt
    make_shards(str(tmp_path), 2, 10, image_size=16, corrupt_images=rotten)
    cfg = DataConfig(train_shards=f"{tmp_path}/shard-{{0000..0001}}.tar", workers=workers, shuffle_buffer=1,
                     resampled=False, max_skip_rate=0.2, skip_rate_min_samples=6)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=2, rank=0, world_size=1 if workers else 2,
                                seed=0, pyramid=False)
    with pytest.raises(DataQualityError, match=r"shard-0000\.tar.*corrupt_image"):
        for _ in loader:
            pass
