"""ImageNet-variant loaders (data_pipeline/eval_sets.py) on small synthetic folder trees of each layout."""
import json

import pytest
import torch
from PIL import Image

from data_pipeline.config import DataConfig
from data_pipeline.eval_sets import ZEROSHOT_DIR, EvalSetConfig, build_eval_set
from data_pipeline.tokenizer import Tokenizer

META = json.loads((ZEROSHOT_DIR / "imagenet1k.json").read_text())
WNIDS, NAMES = META["wnids"], META["classnames"]


def tree(root, folders):
    """One 8x8 image per folder whose red value is the folder's position in `folders` (to trace it back)."""
    for i, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / folder / f"img{i}.png")
    return str(root)


def load(kind, root):
    eval_set = build_eval_set(EvalSetConfig(kind=kind, root=root), DataConfig(workers=0), Tokenizer(8),
                              image_size=8, batch_size=64)
    batch = next(iter(eval_set.batches))
    # un-normalise the red channel back to the folder position that wrote it
    red = (batch["image"][:, 0, 0, 0] * 0.26862954 + 0.48145466) * 255
    return eval_set, dict(zip(red.round().long().tolist(), batch["label"].tolist()))


def test_class_name_files_are_consistent():
    assert len(WNIDS) == len(NAMES) == 1000 and WNIDS == sorted(WNIDS) and len(set(WNIDS)) == 1000
    for kind in ("imagenet_r", "imagenet_a"):
        subset = json.loads((ZEROSHOT_DIR / f"{kind}.json").read_text())["wnids"]
        assert len(subset) == len(set(subset)) == 200 and subset == sorted(subset) and set(subset) <= set(WNIDS)
    assert WNIDS[0] == "n01440764" and NAMES[0] == "tench" and WNIDS[999] == "n15075141"


def test_imagenet_v2_numeric_folders_are_class_numbers_not_text_order(tmp_path):
    folders = ["0", "2", "10", "999"]  # text order would be 0, 10, 2, 999
    eval_set, label_of = load("imagenet_v2", tree(tmp_path, folders))
    assert label_of == {0: 0, 1: 2, 2: 10, 3: 999}
    assert eval_set.classnames == NAMES and len(eval_set.templates) == 80


@pytest.mark.parametrize("kind", ["imagenet_r", "imagenet_a"])
def test_200_class_subsets_map_onto_the_1k_names(tmp_path, kind):
    subset = json.loads((ZEROSHOT_DIR / f"{kind}.json").read_text())["wnids"]
    folders = [subset[0], subset[57], subset[199]]  # a partial copy: missing folders must not shift labels
    eval_set, label_of = load(kind, tree(tmp_path, folders))
    assert label_of == {0: 0, 1: 57, 2: 199}
    assert len(eval_set.classnames) == 200
    for wnid in folders:
        assert eval_set.classnames[subset.index(wnid)] == NAMES[WNIDS.index(wnid)]


def test_known_subset_classes_have_their_published_names():
    r = json.loads((ZEROSHOT_DIR / "imagenet_r.json").read_text())["wnids"]
    a = json.loads((ZEROSHOT_DIR / "imagenet_a.json").read_text())["wnids"]
    # goldfish (n01443537) is ImageNet-R's first class; ImageNet-A's first is stingray (n01498041)
    assert NAMES[WNIDS.index(r[0])] == "goldfish" and NAMES[WNIDS.index(a[0])] == "stingray"


@pytest.mark.parametrize("kind", ["imagenet", "imagenet_sketch"])
def test_1k_wnid_folders_map_by_id(tmp_path, kind):
    folders = [WNIDS[3], WNIDS[500], WNIDS[999]]
    eval_set, label_of = load(kind, tree(tmp_path, folders))
    assert label_of == {0: 3, 1: 500, 2: 999} and eval_set.classnames == NAMES


@pytest.mark.parametrize("kind, folders, layout", [
    ("imagenet_v2", [WNIDS[0]], "root/<class number 0..999>/<image>"),
    ("imagenet_r", ["0", "1"], "ImageNet-R's 200 ids"),
    ("imagenet_a", [WNIDS[0]], "ImageNet-A's 200 ids"),  # tench is not one of ImageNet-A's classes
    ("imagenet_sketch", ["sketch"], "root/<WordNet id>/<image> with the 1k ids"),  # one level too high
])
def test_a_wrong_layout_is_one_line_naming_the_layout_expected(tmp_path, kind, folders, layout):
    root = tree(tmp_path, folders)
    with pytest.raises(ValueError) as e:
        load(kind, root)
    message = str(e.value)
    assert "\n" not in message and layout in message and repr(folders[0]) in message and kind in message
