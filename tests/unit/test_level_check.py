"""The trainer's start-up warning when a PyramidCLIP level is missing from most samples (recipes/level_check.py)."""
import json
import logging

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.synthetic import make_shards
from data_pipeline.tar_io import iter_samples, write_shard
from data_pipeline.tokenizer import Tokenizer
from model.losses import LossConfig
from recipes.level_check import warn_missing_levels


def keep_only(src: str, dst: str, keys: tuple[str, ...]) -> None:
    def samples():
        for raw in iter_samples(src):
            meta = {k: v for k, v in json.loads(raw.fields["json"]).items() if k in keys}
            yield {"__key__": raw.key, **raw.fields, "json": json.dumps(meta).encode()}
    write_shard(dst, samples())


def first_batches(spec: str, kind: str, n: int, caplog) -> list[str]:
    loader = build_train_loader(DataConfig(train_shards=spec, workers=0, shuffle_buffer=4), Tokenizer(16),
                                image_size=16, batch_size=4, rank=0, world_size=1, seed=0, pyramid=kind == "pyramid")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        batches = warn_missing_levels(iter(loader), LossConfig(kind=kind), first=3)
        taken = [next(batches) for _ in range(n)]
    assert len(taken) == n and all("image" in b for b in taken)  # batches pass through untouched
    return [r.getMessage() for r in caplog.records]


def test_missing_regions_and_objects_are_named_at_start(tmp_path, caplog):
    paths = make_shards(str(tmp_path / "full"), 2, 8, image_size=16)
    for i, path in enumerate(paths):  # what the offline annotator leaves: a summary, no objects, no boxes
        keep_only(path, str(tmp_path / f"bare-{i:04d}.tar"), ("summary",))
    messages = first_batches(f"{tmp_path}/bare-{{0000..0001}}.tar", "pyramid", 4, caplog)
    assert len(messages) == 2
    assert messages[0].startswith("objects present in 0% of samples: 2 of 6 loss terms inactive (global-objects, ")
    assert messages[1].startswith("regions present in 0% of samples: 2 of 6 loss terms inactive (region-summary, ")
    # the same shards fully annotated, or a CLIP run (which uses no such level): silent
    assert first_batches(f"{tmp_path}/full/shard-{{0000..0001}}.tar", "pyramid", 3, caplog) == []
    assert first_batches(f"{tmp_path}/bare-{{0000..0001}}.tar", "clip", 3, caplog) == []
