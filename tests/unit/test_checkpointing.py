"""Checkpoint bookkeeping without processes: manifests, `latest` fallback, pruning, config compatibility."""
import pytest

from recipes.checkpoint_layout import MANIFEST, CheckpointError, complete_tags, incomplete_reason, resolve_tag
from recipes.checkpointing import _commit, check_compatible, prune
from recipes.config import load_config, to_dict


def fake_save(root, step: int, world_size: int = 2) -> None:
    """What `save` leaves on disk, minus DeepSpeed: shard files in a staging folder, then the commit."""
    staging = root / f"step_{step}.partial"
    staging.mkdir(parents=True)
    for rank in range(world_size):
        (staging / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (10 + rank))
        (staging / f"client_rank{rank}.json").write_bytes(b"y" * 5)
    _commit(root, staging.name, f"step_{step}", step, world_size)


def test_commit_writes_manifest_and_latest(tmp_path):
    fake_save(tmp_path, 2)
    assert (tmp_path / "latest").read_text() == "step_2"
    assert (tmp_path / "step_2" / MANIFEST).is_file() and not (tmp_path / "step_2.partial").exists()
    assert incomplete_reason(tmp_path, "step_2") is None


def test_missing_or_truncated_rank_file_is_incomplete(tmp_path):
    fake_save(tmp_path, 2)
    fake_save(tmp_path, 4)
    (tmp_path / "step_4" / "client_rank1.json").unlink()
    assert "client_rank1.json is missing" in incomplete_reason(tmp_path, "step_4")
    (tmp_path / "step_2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert "has 1 bytes" in incomplete_reason(tmp_path, "step_2")
    assert complete_tags(tmp_path) == []


def test_latest_falls_back_to_newest_complete_tag(tmp_path):
    fake_save(tmp_path, 2)
    fake_save(tmp_path, 4)
    fake_save(tmp_path, 6)
    (tmp_path / "step_6" / "client_rank0.json").unlink()  # `latest` names a damaged tag
    assert resolve_tag(str(tmp_path), "latest") == "step_4"
    (tmp_path / "latest").unlink()  # or no `latest` at all
    assert resolve_tag(str(tmp_path), "latest") == "step_4"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_tag(str(tmp_path), "step_6")  # an explicit tag is never silently replaced


def test_auto_starts_fresh_only_when_nothing_is_there(tmp_path):
    assert resolve_tag(str(tmp_path), "auto") is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_tag(str(tmp_path), "latest")
    (tmp_path / "step_2.partial").mkdir()  # a save that never finished is not a checkpoint
    assert resolve_tag(str(tmp_path), "auto") is None
    fake_save(tmp_path, 4)
    assert resolve_tag(str(tmp_path), "auto") == "step_4"


def test_prune_keeps_last_k_and_drops_dead_partials(tmp_path):
    for step in (2, 4, 6, 8):
        fake_save(tmp_path, step)
    (tmp_path / "step_10.partial").mkdir()
    prune(tmp_path, keep_last=2)
    assert complete_tags(tmp_path) == ["step_6", "step_8"]
    assert not (tmp_path / "step_10.partial").exists()


def test_resave_of_same_step_replaces_it(tmp_path):
    fake_save(tmp_path, 2, world_size=2)
    fake_save(tmp_path, 2, world_size=1)
    assert complete_tags(tmp_path) == ["step_2"]
    assert not (tmp_path / "step_2" / "client_rank1.json").exists()


def test_incompatible_model_config_names_the_field(tmp_path):
    saved = to_dict(load_config("recipes/configs/demo.yaml", ["model.vision.width=64"]))
    current = to_dict(load_config("recipes/configs/demo.yaml", ["model.vision.width=128", "train.lr=0.1"]))
    with pytest.raises(CheckpointError, match=r"model\.vision\.width=64 in the checkpoint, 128 here"):
        check_compatible(saved, current, where="ckpt/step_2")
    # Fields outside the model, and model fields that shape no tensor, may change on resume.
    same = to_dict(load_config("recipes/configs/demo.yaml", ["model.vision.width=64", "model.dropout=0.3",
                                                            "train.lr=0.1", "train.batch_size=3"]))
    check_compatible(saved, same, where="ckpt/step_2")
