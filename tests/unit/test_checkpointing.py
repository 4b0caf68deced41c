"""Checkpoint bookkeeping without processes: manifests, digests, `latest` fallback, pruning, config compatibility,
client state that cannot run code, one-line I/O failures."""
import json
import logging
import os
import pickle
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from recipes.checkpoint_layout import (MANIFEST, CheckpointError, complete_tags, damage_reason, file_digests,
                                       files_in, incomplete_reason, manifest_text, read_client_state, resolve_tag)
from recipes.checkpointing import (_commit, check_compatible, io_failure, plan_resume, prune,
                                   rng_state, set_rng_state)
from recipes.universal import _repair_optimizer
from tests.conftest import PicklePayload
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


# ------------------------------------------------------------------------------------------------ hostile

def corrupt_in_place(path) -> None:
    """Same-size damage: 4 KiB of 0xFF in the middle (a size check cannot see it)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = b"\xff" * len(data[middle:middle + 4096])
    path.write_bytes(bytes(data))


def big_save(root, step: int) -> None:
    staging = root / f"step_{step}.partial"
    staging.mkdir(parents=True)
    (staging / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(64 * 1024))
    (staging / "client_rank0.json").write_text(json.dumps({"step": step, "config": {}}))
    _commit(root, staging.name, f"step_{step}", step, 1)


def test_same_size_corruption_is_named_and_skipped(tmp_path, caplog):
    big_save(tmp_path, 2)
    big_save(tmp_path, 4)
    optim = tmp_path / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    corrupt_in_place(optim)
    assert incomplete_reason(tmp_path, "step_4") is None  # sizes alone say nothing
    assert damage_reason(tmp_path, "step_4") == f"{optim} is corrupt (its sha256 differs from the one the save recorded)"
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert resolve_tag(str(tmp_path), "latest") == "step_2"
        assert resolve_tag(str(tmp_path), "auto") == "step_2"
    assert f"skipping checkpoint step_4: {optim} is corrupt" in caplog.text
    with pytest.raises(CheckpointError, match="'step_4' is corrupt"):
        resolve_tag(str(tmp_path), "step_4")  # an explicit tag is never replaced
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'step_4'} is corrupt, not converting it"):
        resolve_tag(str(tmp_path), "latest", skip_damaged=False)  # conversion refuses, it does not fall back
    corrupt_in_place(tmp_path / "step_2" / "client_rank0.json")
    with pytest.raises(CheckpointError, match="no checkpoint .* is intact .*step_4.*step_2"):
        resolve_tag(str(tmp_path), "auto")  # never a silent fresh start over damaged checkpoints


def test_rng_state_survives_json_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3))
    assert expected[:4] == again[:4] and torch.equal(expected[4], again[4])




def test_planted_pickles_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    root = tmp_path / "ckpt"
    big_save(root, 2)
    client = root / "step_2" / "client_rank0.json"
    client.write_bytes(pickle.dumps(PicklePayload(marker)))
    with pytest.raises(CheckpointError, match="client_rank0.json"):
        plan_resume(str(root), "step_2", {}, world_size=1)  # the digest refuses it first
    folder = root / "step_2"  # even with a manifest that vouches for the planted file:
    (folder / MANIFEST).write_text(manifest_text(folder, 2, 1, file_digests(folder, files_in(folder))))
    with pytest.raises(CheckpointError, match="client_rank0.json: not a readable JSON client state"):
        plan_resume(str(root), "step_2", {}, world_size=1)
    client.unlink()
    torch.save(PicklePayload(marker), client.with_suffix(".pt"))  # the pickle an older hiclip wrote is never loaded
    with pytest.raises(CheckpointError, match="client_rank0.pt there: saved by an older hiclip as a pickle"):
        read_client_state(root, "step_2", 0)
    universal = root / "step_2" / "universal" / "zero"
    universal.mkdir(parents=True)
    torch.save({"param_groups": [], "bad": PicklePayload(marker)}, universal / "optimizer_state.pt")
    with pytest.raises(CheckpointError, match="optimizer_state.pt: not a readable optimizer state"):
        _repair_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), universal.parent)
    assert not marker.exists()


def test_io_failures_name_the_cause(tmp_path):
    with pytest.raises(OSError) as full, open("/dev/full", "w") as f:  # the kernel's ENOSPC, as a JSON write meets it
        f.write("{}")
        f.flush()
    assert io_failure("saving checkpoint ckpt/step_2.partial", tmp_path, full.value) == \
        "saving checkpoint ckpt/step_2.partial failed: no space left on device"
    other = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore")
    assert io_failure("saving x", tmp_path, other).startswith("saving x failed: RuntimeError: [enforce fail")


def test_full_disk_in_torch_save_is_named(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tiny tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("mount not permitted here")
    try:
        with pytest.raises(RuntimeError, match="unexpected pos") as error:  # what DeepSpeed's torch.save raises
            torch.save(torch.zeros(2**20), small / "shard.pt")
        assert io_failure("saving checkpoint", small, error.value) == "saving checkpoint failed: no space left on device"
    finally:
        subprocess.run(["umount", "-l", str(small)])  # lazily: the failed writer may still hold its file
