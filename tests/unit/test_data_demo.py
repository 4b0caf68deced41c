import hashlib
import json
import os

import numpy as np
import pytest

from data_pipeline import demo_data
from data_pipeline.tar_io import iter_samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return out, demo_data.build(out)


def digest(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.endswith((".tar", ".json"))}


def test_builds_deterministically(built, tmp_path):
    out, stats = built
    demo_data.build(str(tmp_path))
    assert digest(out) == digest(str(tmp_path))
    assert stats["train"]["shards"] >= 4 and stats["eval"]["shards"] >= 1
    assert stats["train"]["samples"] + stats["eval"]["samples"] > 1600
    assert 0.08 < stats["eval"]["samples"] / (stats["train"]["samples"] + stats["eval"]["samples"]) < 0.16
    assert os.path.isfile(os.path.join(out, "LICENSES", "CC-BY-4.0.txt"))


def test_eval_split_is_held_out_and_labelled(built):
    out, stats = built
    classes = json.load(open(os.path.join(out, "classnames.json")))
    assert len(classes["classnames"]) == 9 and abs(classes["chance"] - 1 / 9) < 1e-9
    train = {s.key for i in range(stats["train"]["shards"]) for s in iter_samples(f"{out}/train-{i:04d}.tar")}
    eval_samples = [s for i in range(stats["eval"]["shards"]) for s in iter_samples(f"{out}/eval-{i:04d}.tar")]
    assert len(eval_samples) == stats["eval"]["samples"] and not train & {s.key for s in eval_samples}
    for sample in eval_samples:
        meta = json.loads(sample.fields["json"])
        assert classes["classnames"][meta["label"]] == meta["classname"]
        # train captions carry the word the class prompts use
        assert f"{meta['classname']} emoji" in sample.fields["txt"].decode()


def test_pyramid_annotations(built):
    from PIL import Image
    import io

    out, _ = built
    samples = list(iter_samples(f"{out}/train-0002.tar"))
    for sample in samples[:50]:
        meta = json.loads(sample.fields["json"])
        assert meta["summary"] and meta["objects"] and meta["objects"][0]["label"]
        (x0, y0, x1, y1), = meta["boxes"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # the box is the bounding box of the non-white pixels of the composited emoji
        pixels = np.asarray(Image.open(io.BytesIO(sample.fields["png"])).convert("RGB")).astype(int)
        ys, xs = np.nonzero((255 - pixels).sum(-1) > 30)
        h, w = pixels.shape[:2]
        assert abs(xs.min() / w - x0) <= 2 / w and abs((xs.max() + 1) / w - x1) <= 2 / w
        assert abs(ys.min() / h - y0) <= 2 / h and abs((ys.max() + 1) / h - y1) <= 2 / h
