"""A tampered consolidated folder (or DeepSpeed config) is one line naming the file: changed shapes, truncated or foreign weights, bad
JSON, a stale index beside the single file, a value of the wrong type; a pickle planted in it never runs."""
import json
import os
import pickle

import pytest
import torch

from model.clip import CLIP
from model.config import PRESETS
from model.pretrained import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from tests.conftest import PicklePayload


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    save_pretrained(tmp_path / "model", CLIP(cfg).state_dict(), cfg)
    return tmp_path / "model"


def edit_config(folder, change) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    change(cfg)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def one_line_error(folder) -> str:
    with pytest.raises(ValueError) as error:  # ModelFolderError, or the config builder's ConfigError
        load_pretrained(folder)
    assert len(str(error.value).splitlines()) == 1
    return str(error.value)


def test_intact_folder_loads(folder):
    load_pretrained(folder)


def test_changed_embed_dim_names_the_tensor(folder):
    edit_config(folder, lambda c: c.update(embed_dim=c["embed_dim"] * 2))
    assert "weights do not match config.json (visual.proj.weight is" in one_line_error(folder)


def test_truncated_weights_name_the_file(folder):
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert one_line_error(folder).startswith(f"{weights}: not a readable safetensors file")


def test_bad_json_names_the_file(folder):
    (folder / CONFIG_NAME).write_text('{"embed_dim": 64,')
    assert one_line_error(folder).startswith(f"{folder / CONFIG_NAME}: not readable JSON")


def test_wrong_type_names_the_file(folder):
    edit_config(folder, lambda c: c.update(dropout="a lot"))
    assert one_line_error(folder).startswith(f"{folder / CONFIG_NAME}: ")


def test_stale_index_beside_single_file_is_refused(folder):
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {"logit_scale": "model-00001-of-00002.safetensors"}}))
    assert "holds both model.safetensors and model.safetensors.index.json" in one_line_error(folder)


def test_index_cannot_point_outside_the_folder(folder, tmp_path):
    os.replace(folder / WEIGHTS_NAME, tmp_path / "elsewhere.safetensors")
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {"logit_scale": "../elsewhere.safetensors"}}))
    assert "no 'weight_map' of tensor names to file names in this folder" in one_line_error(folder)




@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_planted_pickle_never_runs(folder, tmp_path, name):
    (folder / name).write_bytes(pickle.dumps(PicklePayload(tmp_path / "PWNED")))
    one_line_error(folder)
    assert not (tmp_path / "PWNED").exists()


def test_bad_ds_config_json_names_the_file(tmp_path):
    from recipes.config import load_config
    from recipes.engine import deepspeed_config

    bad = tmp_path / "zero3.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    with pytest.raises(ValueError, match=f"train.ds_config: {bad} is not readable JSON") as error:
        deepspeed_config(load_config("recipes/configs/demo.yaml", [f"train.ds_config={bad}"]))
    assert len(str(error.value).splitlines()) == 1
