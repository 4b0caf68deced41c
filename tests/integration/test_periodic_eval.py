"""Periodic zero-shot eval inside a 2-rank ZeRO-3 run: no hang on uneven shares, and the numbers it logs are the
ones the offline evaluator computes from the consolidated checkpoint of the same step."""
import io
import json

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.eval_sets import EvalSetConfig, build_eval_set
from data_pipeline.tokenizer import Tokenizer
from model.pretrained import load_pretrained
from recipes.convert import consolidate
from recipes.evaluate import evaluate
from tests.integration.launch import pretrain, read_metrics

pytestmark = pytest.mark.integration

CLASSES = ["cat", "dog", "bird"]
EVAL_SAMPLES = 13  # odd: rank 0 gets 7, rank 1 gets 6 -> 4 and 3 batches of 2, so rank 1 must run a stand-in


def write_labelled_eval_shard(folder, n: int) -> str:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "eval-0000.tar")) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            label = i % len(CLASSES)
            sink.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "txt": f"a photo of a {CLASSES[label]} {i}",
                        "json": json.dumps({"label": label}).encode()})
    (folder / "classnames.json").write_text(json.dumps({"classnames": CLASSES, "templates": ["a {}.", "{}"]}))
    return str(folder / "eval-0000.tar")


@pytest.mark.parametrize("method", [
    [],  # CLIP
    ["loss.kind=pyramid"],  # training runs the region branch and extra views; eval must still agree
], ids=["clip", "pyramid"])
def test_periodic_eval_under_zero3_matches_offline_eval(tmp_path, synthetic_shards, method):
    shards = synthetic_shards(n_shards=2, per_shard=16)
    eval_spec = write_labelled_eval_shard(tmp_path / "eval", EVAL_SAMPLES)
    sets = "[{kind: shards}, {kind: animal_mnist, max_samples: 21}]"
    pretrain(2, [f"data.train_shards={shards}",
                 f"data.eval_shards={eval_spec}", "data.workers=1", "data.shuffle_buffer=8", "train.batch_size=4",
                 "train.steps=4", "train.warmup_steps=2", "model.vision.image_size=32", "model.vision.patch_size=8",
                 "model.text.layers=2", "model.vision.layers=4", "train.ds_config=ds_configs/zero3.json",
                 f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=4", f"logging.dir={tmp_path}",
                 "logging.every_steps=1", "logging.progress=false", "eval.every_steps=2", "eval.batch_size=2",
                 f"eval.sets={sets}", *method])

    records = read_metrics(tmp_path)
    train = [r for r in records if "loss" in r]
    evals = {r["step"]: r for r in records if "eval/shards/zeroshot_top1" in r}
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in train)
    assert sorted(evals) == [2, 4]
    for key in ("samples_per_s", "samples_per_s_per_device", "data_wait", "tflops_per_device", "mfu",
                "mem_peak_rss_gb", "temperature", "lr"):
        assert key in train[-1], key
    assert 0.0 <= train[-1]["data_wait"] <= 1.0
    last = evals[4]
    assert last["eval/shards/samples"] == EVAL_SAMPLES and last["eval/shards/images"] == EVAL_SAMPLES
    assert last["eval/animal_mnist/samples"] == 21 and last["eval/animal_mnist/classes"] == 10

    # The same step, offline, in one process: identical sets of embeddings -> identical metrics.
    model, cfg = load_pretrained(consolidate(str(tmp_path / "ckpt"), str(tmp_path / "model")))
    tokenizer = Tokenizer(cfg.text.context_length)
    for set_cfg in (EvalSetConfig(kind="shards"), EvalSetConfig(kind="animal_mnist", max_samples=21)):
        eval_set = build_eval_set(set_cfg, DataConfig(eval_shards=eval_spec, workers=0), tokenizer,
                                  image_size=cfg.vision.image_size, batch_size=5)
        with torch.no_grad():
            offline = evaluate(model, tokenizer, eval_set.batches, eval_set.classnames, eval_set.templates)
        for key, value in offline.items():
            assert last[f"eval/{set_cfg.kind}/{key}"] == pytest.approx(value, abs=1e-6), key
