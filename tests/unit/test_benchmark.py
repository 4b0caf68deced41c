"""CLIP_benchmark on our consolidated folders (recipes/benchmark.py) agrees with recipes.evaluate on the same data.

The data: the demo's held-out Twemoji split (227 images, 9 classes), as our shards, rewritten in CLIP_benchmark's
local webdataset layout and as an image folder (data_pipeline/benchmark_layout.py). The models: tiny random-init
folders (equality needs no training), one vanilla and one hierarchy-aware.
"""
import dataclasses
import json

import pytest

from data_pipeline import demo_data
from data_pipeline.benchmark_layout import write_folder, write_wds
from data_pipeline.tokenizer import Tokenizer
from model.clip import CLIP
from model.config import PRESETS
from model.pretrained import save_pretrained
from recipes import benchmark, evaluate


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory):
    """The demo's eval split only (the train split is not needed here): shards, classnames.json, both layouts."""
    out = tmp_path_factory.mktemp("demo")
    held_out = [e for e in demo_data.list_emojis() if demo_data.is_held_out(e)]
    labels = {c: i for i, c in enumerate(demo_data.CLASSNAMES)}
    demo_data.write_split(held_out, str(out), "eval", 2, labels)
    (out / "classnames.json").write_text(json.dumps({"classnames": list(demo_data.CLASSNAMES.values()),
                                                     "templates": list(demo_data.ZEROSHOT_TEMPLATES)}))
    spec = str(out / "eval-{0000..0001}.tar")
    n_wds, n_folder = write_wds(spec, str(out / "wds")), write_folder(spec, str(out / "folder"))
    assert n_wds == n_folder == len(held_out)
    return spec, out


def _model_folder(tmp_path_factory, attention: str):
    base = PRESETS["tiny"]
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, attention=attention),
                              text=dataclasses.replace(base.text, attention=attention))
    folder = tmp_path_factory.mktemp(f"model_{attention}")
    save_pretrained(folder, CLIP(cfg).state_dict(), cfg)
    Tokenizer(cfg.text.context_length).save(str(folder))
    return str(folder)


@pytest.fixture(scope="module", params=["vanilla", "hier"])
def model_folder(request, tmp_path_factory):
    return _model_folder(tmp_path_factory, request.param)


def _run_ours(model_folder, tmp_path, args) -> float:
    path = tmp_path / "ours.json"
    evaluate.main(["--model", model_folder, "--workers", "0", "--device", "cpu", "--json", str(path), *args])
    return json.loads(path.read_text())["zeroshot_top1"]


def _run_benchmark(model_folder, tmp_path, dataset, root, extra=()) -> float:
    path = tmp_path / "bench.json"
    benchmark.main(["eval", "--pretrained", model_folder, "--dataset", dataset, "--dataset_root", str(root),
                    "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", "64",
                    "--quiet", "--output", str(path), *extra])
    return json.loads(path.read_text())["metrics"]["acc1"]


def test_webdataset_layout_gives_the_same_top1(demo_eval, model_folder, tmp_path):
    spec, out = demo_eval
    ours = _run_ours(model_folder, tmp_path, ["--data", spec])
    theirs = _run_benchmark(model_folder, tmp_path, "wds/demo", out / "wds")
    assert abs(100 * ours - 100 * theirs) <= 0.1, (ours, theirs)


def test_image_folder_gives_the_same_top1(demo_eval, model_folder, tmp_path):
    spec, out = demo_eval
    meta = json.loads((out / "folder" / "classnames.json").read_text())
    ours = _run_ours(model_folder, tmp_path, ["--set", "image_folder", "--root", str(out / "folder"),
                                             "--classnames", str(out / "folder" / "classnames.json")])
    # An image-folder dataset of CLIP_benchmark's (root/<class>/<image>), given our names and templates
    names, templates = tmp_path / "names.json", tmp_path / "templates.json"
    names.write_text(json.dumps({"imagenet_sketch": meta["classnames"]}))
    templates.write_text(json.dumps({"imagenet_sketch": [t.replace("{}", "{c}") for t in meta["templates"]]}))
    theirs = _run_benchmark(model_folder, tmp_path, "imagenet_sketch", out / "folder",
                            ["--custom_classname_file", str(names), "--custom_template_file", str(templates)])
    assert abs(100 * ours - 100 * theirs) <= 0.1, (ours, theirs)


def test_the_model_type_is_registered_and_becomes_the_default():
    from clip_benchmark import models

    benchmark.register()
    assert models.TYPE2FUNC[benchmark.MODEL_TYPE] is benchmark.load_hiclip
    assert models.MODEL_TYPES.count(benchmark.MODEL_TYPE) == 1
    argv = benchmark.with_defaults(["eval", "--pretrained", "m", "--dataset", "wds/x"])
    assert argv[argv.index("--model_type") + 1] == benchmark.MODEL_TYPE and "--output" in argv
    assert benchmark.with_defaults(["eval", "--model_type", "open_clip"]).count("--model_type") == 1


def test_accuracy_fix_matches_a_hand_count():
    import torch
    from clip_benchmark.metrics import zeroshot_classification

    benchmark.register()
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.0, 0.6, 0.4]])
    target = torch.tensor([1, 2, 2, 2])
    # top-1: rows 0 and 2 right; top-2: row 3 too (0.4 is its second best), row 1 not (its target scores last)
    assert zeroshot_classification.accuracy(logits, target, topk=(1, 2)) == [0.5, 0.75]
