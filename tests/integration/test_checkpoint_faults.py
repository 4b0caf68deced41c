"""Faults around checkpoints, for real: a rank SIGKILLed mid-training, and a rank SIGKILLed in the middle of a save."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from recipes.checkpoint_layout import complete_tags, incomplete_reason, resolve_tag
from recipes.checkpointing import KILL_DURING_SAVE_ENV
from tests.conftest import ROOT, free_port
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics

pytestmark = pytest.mark.integration


def tiny_run(tmp_path, spec: str, steps: int) -> list[str]:
    return launch.tiny_run(spec, tmp_path, steps=steps) + ["checkpoint.every_steps=2", "checkpoint.keep_last=2"]


def logged(tmp_path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    return read_metrics(tmp_path) if path.is_file() and path.stat().st_size else []


def test_kill_one_rank_then_relaunch_resumes_from_last_complete(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=4, per_shard=16)
    overrides = tiny_run(tmp_path, spec, steps=1000)  # far more steps than it will live
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "recipes.pretrain", "--config", "recipes/configs/demo.yaml",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(logged(tmp_path)) < 5 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert len(logged(tmp_path)) >= 5, "training did not get going"
        rank1 = [p for p in psutil.Process(launcher.pid).children()
                 if p.environ().get("RANK") == "1" and "recipes.pretrain" in " ".join(p.cmdline())]
        assert len(rank1) == 1
        os.kill(rank1[0].pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, "the launcher must report the dead rank"
    first = {m["step"]: m["loss"] for m in logged(tmp_path)}

    ckpt = tmp_path / "ckpt"
    tag = resolve_tag(str(ckpt), "latest")  # the newest complete tag, whatever the kill interrupted
    start = int(tag.split("_")[1])
    assert start >= 2 and incomplete_reason(ckpt, tag) is None
    proc = pretrain(2, overrides + ["checkpoint.resume=auto", f"train.stop_at={start + 2}"])
    assert f"resumed from {ckpt}/{tag} at step {start}" in proc.stderr
    again = [m for m in logged(tmp_path)][len(first):]
    assert [m["step"] for m in again] == [start + 1, start + 2]
    for m in again:  # steps the killed run had already logged are recomputed bit for bit
        if m["step"] in first:
            assert m["loss"] == first[m["step"]], m["step"]


def test_kill_during_save_keeps_previous_latest(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=4, per_shard=16)
    proc = pretrain(2, tiny_run(tmp_path, spec, steps=6), env={KILL_DURING_SAVE_ENV: "4:1"}, check=False)
    assert proc.returncode != 0
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "step_2"
    assert complete_tags(ckpt) == ["step_2"]  # the previous good one survives
    assert (ckpt / "step_4.partial").is_dir() and not (ckpt / "step_4").exists()
    assert resolve_tag(str(ckpt), "auto") == "step_2"
    # Even if `latest` were pointed at the dead save, loading would fall back to the newest complete tag.
    (ckpt / "latest").write_text("step_4.partial")
    assert resolve_tag(str(ckpt), "latest") == "step_2"
    json.loads((ckpt / "step_2" / "complete.json").read_text())  # the manifest is intact

    # A run with another model shape refuses the checkpoint, naming the field, before building anything.
    other = pretrain(1, tiny_run(tmp_path, spec, steps=6) + ["checkpoint.resume=latest", "model.embed_dim=32"],
                     check=False)
    assert other.returncode != 0
    assert "model.embed_dim" in other.stderr and "in the checkpoint" in other.stderr
