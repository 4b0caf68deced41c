"""Hostile checkpoints, for real (2 gloo ranks, ZeRO-3): same-size corruption of model and optimizer states and a
planted pickle are refused before DeepSpeed reads them, resume falls back to the newest intact tag with the curve
of a run resumed from that tag; conversion refuses a damaged tag and replaces its output folder whole; a ZeRO-stage
change is one line; SIGTERM on every process of both ranks checkpoints at the agreed step, exits 75, and the resumed
run continues the uninterrupted curve."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from data_pipeline.synthetic import make_shards
from model.pretrained import INDEX_NAME, WEIGHTS_NAME, load_pretrained
from recipes.checkpoint_layout import CheckpointError, complete_tags
from recipes.convert import consolidate
from recipes.preemption import REQUEUE_EXIT_CODE
from tests.conftest import ROOT, free_port
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics

pytestmark = pytest.mark.integration


def run(spec: str, run_dir, steps: int, *extra: str) -> list[str]:
    return launch.tiny_run(spec, run_dir, steps=steps) + ["checkpoint.every_steps=2", "checkpoint.keep_last=0", *extra]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(str(folder), 4, 16)
    return str(folder / "shard-{0000..0003}.tar")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spec):
    """A 2-rank ZeRO-3 run of 6 steps with tags step_2, step_4, step_6 (read-only for the tests: they copy it)."""
    run_dir = tmp_path_factory.mktemp("trained")
    pretrain(2, run(spec, run_dir, 6))
    assert complete_tags(run_dir / "ckpt") == ["step_2", "step_4", "step_6"]
    return run_dir / "ckpt"


def corrupt_in_place(path) -> None:
    """What the issue did: up to 1 MiB of 0xFF in the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    n = min(2**20, len(data) // 4)
    data[len(data) // 2:len(data) // 2 + n] = b"\xff" * n
    path.write_bytes(bytes(data))


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_corrupt_states_fall_back_to_the_intact_tag_with_its_curve(tmp_path, spec, trained):
    marker = tmp_path / "PWNED"
    damaged, reference = tmp_path / "damaged", tmp_path / "reference"
    for run_dir in (damaged, reference):
        shutil.copytree(trained, run_dir / "ckpt")
    model_states = damaged / "ckpt/step_6/zero_pp_rank_0_mp_rank_00_model_states.pt"
    optim_states = damaged / "ckpt/step_4/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    corrupt_in_place(model_states)
    corrupt_in_place(optim_states)
    planted = damaged / "ckpt/step_6/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # DeepSpeed would unpickle it
    size = planted.stat().st_size
    payload = pickle.dumps(Payload(marker))
    planted.write_bytes(payload + b"\0" * (size - len(payload)))

    with pytest.raises(CheckpointError, match=f"{damaged / 'ckpt/step_6'} is corrupt, not converting it"):
        consolidate(str(damaged / "ckpt"), str(tmp_path / "model"))  # conversion refuses, it does not fall back
    proc = pretrain(2, run(spec, damaged, 8, "checkpoint.resume=latest"))
    assert f"skipping checkpoint step_6: {planted.parent}/" in proc.stderr
    assert f"skipping checkpoint step_4: {optim_states} is corrupt" in proc.stderr
    assert f"resumed from {damaged / 'ckpt'}/step_2 at step 2" in proc.stderr
    pretrain(2, run(spec, reference, 8, "checkpoint.resume=step_2"))
    resumed, expected = read_metrics(damaged), read_metrics(reference)
    assert [m["step"] for m in resumed] == list(range(3, 9))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]  # bit for bit
    assert not marker.exists()


def test_convert_twice_into_one_folder_loads_the_second(tmp_path, trained):
    out = tmp_path / "model"
    consolidate(str(trained), str(out), tag="step_2", max_shard_mb=1)
    assert (out / INDEX_NAME).is_file()  # sharded
    consolidate(str(trained), str(out), tag="step_6")
    assert sorted(p.name for p in out.glob("*.safetensors*")) == [WEIGHTS_NAME]  # nothing of the first survives
    fresh = consolidate(str(trained), str(tmp_path / "fresh"), tag="step_6")
    model, _ = load_pretrained(out)
    for (name, p), q in zip(model.state_dict().items(), load_pretrained(fresh)[0].state_dict().values()):
        assert torch.equal(p, q), name


def test_another_zero_stage_is_one_line(tmp_path, spec, trained):
    shutil.copytree(trained, tmp_path / "ckpt")
    proc = pretrain(2, run(spec, tmp_path, 8, "checkpoint.resume=latest", "train.ds_config=ds_configs/zero2.json"),
                    check=False)
    assert proc.returncode != 0
    assert f"error: checkpoint {tmp_path / 'ckpt/step_6'} was saved with ZeRO stage 3, this run uses stage 2" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_checkpoints_at_the_agreed_step_and_resume_continues(tmp_path, spec):
    steps = 40
    overrides = run(spec, tmp_path / "preempted", steps, "checkpoint.every_steps=1000", "checkpoint.preempt_check_every=2")
    port = str(free_port())
    ranks = []
    for rank in range(2):  # as srun starts them: one process (and its data worker) per rank, each signalled
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        ranks.append(subprocess.Popen([sys.executable, "-m", "recipes.pretrain", "--config", "recipes/configs/demo.yaml",
                                       *overrides], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in ranks), ranks[0].stderr.read()[-3000:]
            time.sleep(0.05)
        for p in ranks:
            os.killpg(p.pid, signal.SIGTERM)  # the rank and its DataLoader worker, as SLURM signals a job step
        errors = [p.communicate(timeout=120)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [REQUEUE_EXIT_CODE] * 2, errors[0][-3000:]
    logged = [m["step"] for m in read_metrics(tmp_path / "preempted")]
    tags = complete_tags(tmp_path / "preempted" / "ckpt")
    assert len(tags) == 1 and tags[0] == f"step_{logged[-1]}"  # a checkpoint at the step the ranks stopped after
    stopped = logged[-1]
    assert 3 <= stopped < steps and stopped % 2 == 0
    assert f"SIGTERM received: checkpointing at step {stopped}" in errors[0]

    pretrain(2, overrides + ["checkpoint.resume=auto"])
    pretrain(2, run(spec, tmp_path / "uninterrupted", steps, "checkpoint.every_steps=1000"))
    resumed = read_metrics(tmp_path / "preempted")
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in read_metrics(tmp_path / "uninterrupted")]
