"""Consolidated weights equal the live gathered parameters, under ZeRO-2 and ZeRO-3."""
import pytest
import torch

from model.pretrained import load_pretrained
from recipes.checkpoint_layout import CheckpointError
from recipes.convert import consolidate
from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration


# hier under ZeRO-3 also proves the prior's parameters are re-gathered for backward (they once were not).
# (ZeRO-3 vanilla: test_checkpoint_consolidate.py, in bf16 and sharded.)
@pytest.mark.parametrize("stage,attention", [("zero2", "vanilla"), ("zero3", "hier")])
def test_consolidated_equals_live(tmp_path, stage, attention):
    torchrun(2, ["tests/integration/live_params_worker.py", str(tmp_path), f"ds_configs/{stage}.json", attention])
    live = torch.load(tmp_path / "live.pt")
    folder = consolidate(str(tmp_path / "ckpt"), str(tmp_path / "model"))
    model, _ = load_pretrained(folder)
    state = model.state_dict()
    assert set(state) == set(live)
    for name, tensor in live.items():
        assert torch.equal(state[name], tensor.reshape(state[name].shape)), name
    assert (folder / "vocab.json").is_file() and (folder / "config.json").is_file()


def test_convert_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        consolidate(str(tmp_path), str(tmp_path / "out"))
