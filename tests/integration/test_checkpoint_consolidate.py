"""Consolidation from a 2-rank ZeRO-3 checkpoint: bf16 and sharded output equal the live gathered parameters, the
folder alone rebuilds the model, and the vanilla CLIP exports to an open_clip model with the same embeddings."""
import json
import shutil

import pytest
import torch

from model.pretrained import INDEX_NAME, load_pretrained
from recipes.convert import consolidate, export_open_clip
from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3")
    torchrun(2, ["tests/integration/live_params_worker.py", str(folder), "ds_configs/zero3.json", "vanilla"])
    return folder, torch.load(folder / "live.pt")


def test_bf16_sharded_equals_live_and_loads_alone(zero3_run, tmp_path):
    run, live = zero3_run
    folder = consolidate(str(run / "ckpt"), str(tmp_path / "model"), dtype="bf16", max_shard_mb=2)
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    alone = shutil.copytree(folder, tmp_path / "elsewhere")  # nothing outside the folder is needed
    model, _ = load_pretrained(alone)
    state = model.state_dict()
    assert set(state) == set(live)
    for name, tensor in live.items():
        expected = tensor.reshape(state[name].shape).to(torch.bfloat16).float()
        assert torch.equal(state[name], expected), name


def test_open_clip_export_gives_same_embeddings(zero3_run, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    run, _ = zero3_run
    folder = consolidate(str(run / "ckpt"), str(tmp_path / "model"))
    ours, cfg = load_pretrained(folder)
    path = export_open_clip(folder, tmp_path / "open_clip.pt")
    theirs = open_clip.model.CLIP(**json.loads(path.with_suffix(".json").read_text())).eval()
    theirs.load_state_dict(torch.load(path), strict=True)  # every key has its counterpart, none left over

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red cat", "a blue dog under a tree", "sun", "moon and car"])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images, normalize=True), atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True), atol=1e-5)
        assert torch.allclose(ours.logit_scale.exp(), theirs.logit_scale.exp())
