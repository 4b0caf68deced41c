"""A 2-rank ZeRO-3 run stopped and resumed in fresh processes matches an uninterrupted run bit for bit."""
import pytest
import torch

from model.pretrained import load_pretrained
from recipes.convert import consolidate
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics

pytestmark = pytest.mark.integration


def tiny_run(tmp_path, spec: str, name: str) -> list[str]:
    return launch.tiny_run(spec, tmp_path / name, steps=6, layers=2, workers=2) + [
        "model.dropout=0.1", "checkpoint.every_steps=3"]


def test_stop_and_resume_is_bit_exact(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=4, per_shard=16)
    pretrain(2, tiny_run(tmp_path, spec, "full"))
    resumed = tiny_run(tmp_path, spec, "resumed")
    pretrain(2, resumed + ["train.stop_at=3"])
    pretrain(2, resumed + ["checkpoint.resume=latest"])

    full, parts = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in parts] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in parts] == [m["loss"] for m in full]  # exact float equality, every step

    a = consolidate(str(tmp_path / "full/ckpt"), str(tmp_path / "full/model"))
    b = consolidate(str(tmp_path / "resumed/ckpt"), str(tmp_path / "resumed/model"))
    model_a, _ = load_pretrained(a)
    model_b, _ = load_pretrained(b)
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_without_checkpoint_is_one_line_error(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=4, per_shard=4)
    proc = pretrain(1, tiny_run(tmp_path, spec, "none") + ["checkpoint.resume=latest"], check=False)
    assert proc.returncode != 0
    assert "holds no checkpoint" in proc.stderr
