"""The trainer-facing batch contract, views and boxes, shard specs, sources and loud config errors."""

import io
import os

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.loader import build_eval_loader, build_train_loader
from data_pipeline.sources import ShardSchedule, expand_shards, load_sources
from data_pipeline.synthetic import make_shards
from data_pipeline.tar_io import iter_samples, write_shard
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    make_shards(folder, 4, 8, image_size=48, fmt="png")
    return folder, f"{folder}/shard-{{0000..0003}}.tar"


def loader_for(spec, tokenizer, *, pyramid, batch_size=4, **overrides):
    cfg = DataConfig(train_shards=spec, **{"workers": 0, "shuffle_buffer": 4, **overrides})
    return build_train_loader(cfg, tokenizer, image_size=32, batch_size=batch_size, rank=0, world_size=1, seed=0,
                              pyramid=pyramid)


def test_clip_batch_contract(shards, tokenizer):
    batch = next(iter(loader_for(shards[1], tokenizer, pyramid=False)))
    assert set(batch) == {"image", "text", "key"}
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, 77) and batch["text"].dtype == torch.long
    assert len(batch["key"]) == 4 and all(k.startswith("s00") for k in batch["key"])


def test_pyramid_batch_contract(shards, tokenizer):
    batch = next(iter(loader_for(shards[1], tokenizer, pyramid=True, max_regions=5)))
    assert batch["image_local"].shape == batch["image"].shape
    assert not torch.equal(batch["image_local"], batch["image"])  # independently cropped views
    for field in ("summary", "objects"):
        assert batch[field].shape == (4, 77) and batch[f"{field}_mask"].dtype == torch.bool
        assert batch[f"{field}_mask"].all()
    assert batch["boxes"].shape == (4, 5, 4) and batch["boxes_mask"].shape == (4, 5)
    assert batch["boxes_mask"][:, 0].any() and not batch["boxes_mask"][:, 1:].any()
    assert "region_features" not in batch


def unnormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def test_boxes_follow_the_global_crop(shards, tokenizer):
    """The box must land on the shape's pixels in the *cropped, resized* global view."""
    loader = loader_for(shards[1], tokenizer, pyramid=True, batch_size=1, global_scale=(0.5, 0.8))
    checked = 0
    for batch, _ in zip(loader, range(24)):
        if not batch["boxes_mask"][0, 0]:
            continue  # the crop cut the shape out: masked, nothing to check
        pixels = unnormalise(batch["image"][0])
        # the shape is one saturated colour on a dark (< 60) noisy background
        bright = np.abs(pixels - pixels.mean(axis=(0, 1))).sum(-1) > 150
        ys, xs = np.nonzero(bright & (pixels.max(-1) > 150))
        if len(xs) < 4:
            continue
        x0, y0, x1, y1 = (batch["boxes"][0, 0] * 32).tolist()
        assert abs(xs.min() - x0) <= 2.5 and abs(xs.max() + 1 - x1) <= 2.5, (batch["key"], xs.min(), xs.max(), x0, x1)
        assert abs(ys.min() - y0) <= 2.5 and abs(ys.max() + 1 - y1) <= 2.5
        checked += 1
    assert checked >= 8


def test_same_seed_same_augmentations_and_caller_rng_untouched(shards, tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = next(iter(loader_for(shards[1], tokenizer, pyramid=True)))
    assert torch.equal(torch.rand(3), expected_next)  # workers=0 decodes in-process without touching our RNG
    second = next(iter(loader_for(shards[1], tokenizer, pyramid=True)))
    assert first["key"] == second["key"] and torch.equal(first["image"], second["image"])
    assert torch.equal(first["image_local"], second["image_local"])


def test_region_features_when_shards_carry_them(tmp_path, tokenizer):
    samples = []
    for raw in iter_samples(make_shards(str(tmp_path / "src"), 1, 4, image_size=24)[0]):
        features = np.full((3, 2052), float(len(samples)), dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, features)
        samples.append({"__key__": raw.key, **raw.fields, "regions.npy": buffer.getvalue()})
    write_shard(str(tmp_path / "regions.tar"), samples)
    batch = next(iter(loader_for(str(tmp_path / "regions.tar"), tokenizer, pyramid=True, shuffle_buffer=1)))
    assert batch["region_features"].shape == (4, 10, 2052)
    assert batch["region_features"][:, :3].flatten(1).std(1).max() == 0 and batch["region_features"][:, 3:].abs().sum() == 0


def test_eval_loader_covers_each_sample_once(shards, tokenizer):
    folder, spec = shards
    cfg = DataConfig(eval_shards=spec, workers=2)
    keys, labels = [], []
    for rank in range(2):
        for batch in build_eval_loader(cfg, tokenizer, image_size=32, batch_size=5, rank=rank, world_size=2):
            assert batch["image"].shape[1:] == (3, 32, 32)
            keys += batch["key"]
            labels += batch["label"].tolist()
    assert sorted(keys) == sorted(f"s{s:03d}_{i:04d}" for s in range(4) for i in range(8))
    assert set(labels) <= {0, 1}


def test_shard_specs_braces_lists_and_pipe(shards, tokenizer):
    folder, spec = shards
    listed = expand_shards(f"{folder}/shard-{{0000..0001}}.tar::{folder}/shard-0003.tar")
    assert [os.path.basename(u) for u in listed] == ["shard-0000.tar", "shard-0001.tar", "shard-0003.tar"]
    piped = [s.key for s in iter_samples(f"pipe:cat {folder}/shard-0002.tar")]
    assert piped == [s.key for s in iter_samples(f"{folder}/shard-0002.tar")] and len(piped) == 8
    # a pipe stream resumes from a byte offset by skipping, a file by seeking: same samples
    third = list(iter_samples(f"{folder}/shard-0002.tar"))[3]
    assert [s.key for s in iter_samples(f"pipe:cat {folder}/shard-0002.tar", third.offset)] == piped[3:]
    batch = next(iter(loader_for(f"pipe:cat {folder}/shard-{{0000..0003}}.tar", tokenizer, pyramid=False)))
    assert batch["image"].shape == (4, 3, 32, 32)


def test_sources_are_mixed_by_weight(shards):
    folder, _ = shards
    sources = load_sources([SourceConfig(f"{folder}/shard-{{0000..0001}}.tar", 3.0, "big"),
                            SourceConfig(f"{folder}/shard-{{0002..0003}}.tar", 1.0, "small")])
    schedule = ShardSchedule(sources, resampled=True, seed=0, stream=1, num_streams=4)
    drawn = [schedule.shard(i)[0] for i in range(4000)]
    assert abs(drawn.count(0) / len(drawn) - 0.75) < 0.03
    assert schedule.shard(17) == ShardSchedule(sources, resampled=True, seed=0, stream=1, num_streams=4).shard(17)


def test_missing_shard_is_a_one_line_error_naming_the_path(shards, tokenizer):
    folder, _ = shards
    with pytest.raises(FileNotFoundError, match=r"shard-0004\.tar \(and 5 more of 10 shards\)") as error:
        loader_for(f"{folder}/shard-{{0000..0009}}.tar", tokenizer, pyramid=False)
    assert "\n" not in str(error.value)


def test_epoch_mode_with_too_few_shards_fails_fast(shards, tokenizer):
    cfg = DataConfig(train_shards=shards[1], workers=3, resampled=False)  # 4 shards < 2 ranks x 3 workers
    with pytest.raises(ValueError, match=r"world_size x workers = 6.*4 shards"):
        build_train_loader(cfg, tokenizer, image_size=32, batch_size=2, rank=0, world_size=2, seed=0, pyramid=False)


def test_virtual_epoch_length(shards, tokenizer):
    cfg = DataConfig(train_shards=shards[1], workers=0, resampled=False, train_num_samples=20, shuffle_buffer=2)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=3, rank=1, world_size=2, seed=0,
                                pyramid=False)
    assert len(loader) == 3
    assert [len(list(loader)) for _ in range(3)] == [3, 3, 3] and loader.epoch == 3


def test_malformed_samples_are_skipped_not_fatal(tmp_path, tokenizer):
    samples = []
    for i, raw in enumerate(iter_samples(make_shards(str(tmp_path / "src"), 1, 6, image_size=24)[0])):
        fields = dict(raw.fields)
        if i == 1:
            fields["json"] = b'{"boxes": "not a list of boxes"}'  # breaks box parsing: bad_sample
        if i == 2:
            fields["json"] = b"{truncated"  # not JSON: corrupt_json
        if i == 3:
            del fields["jpg"]  # no image member: missing_image
        samples.append({"__key__": raw.key, **fields})
    write_shard(str(tmp_path / "mixed.tar"), samples)
    loader = loader_for(str(tmp_path / "mixed.tar"), tokenizer, pyramid=True, batch_size=1, resampled=False)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == ["s000_0000", "s000_0004", "s000_0005"]
    assert loader.skip_counts() == {"bad_sample": 1, "corrupt_json": 1, "missing_image": 1}
    assert loader.samples_seen() == {"train": 6}


def test_worker_loaders_leave_the_training_rng_alone(shards, tokenizer):
    """DataLoader would draw its workers' base seed from the global RNG at every `iter()`: a resumed run
    (RNG restored from the checkpoint, then a fresh loader iterator) would see different dropout."""
    folder, spec = shards
    cfg = DataConfig(train_shards=spec, eval_shards=spec, workers=1, shuffle_buffer=2)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=2, rank=0, world_size=1, seed=0,
                                pyramid=False)
    next(iter(loader))
    next(iter(build_eval_loader(cfg, tokenizer, image_size=16, batch_size=2)))
    assert torch.equal(torch.rand(4), expected)
