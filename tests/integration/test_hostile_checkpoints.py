"""Hostile checkpoints, for real (2 gloo ranks, ZeRO-3, one uninterrupted reference run shared by all): same-size
corruption of model and optimizer states and a planted pickle are refused before DeepSpeed reads them, and resume
falls back to the newest intact tag and continues the uninterrupted curve; conversion refuses a damaged tag and
replaces its output folder whole; a ZeRO-stage change is one line; SIGTERM on every process of both ranks
checkpoints at the agreed step, exits 75, and the resumed run continues the uninterrupted curve."""
import os
import pickle
import re
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
from tests.conftest import ROOT, PicklePayload, free_port
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics

pytestmark = pytest.mark.integration


STEPS = 16


def run(spec: str, run_dir, *extra: str, every: int = 2) -> list[str]:
    return launch.tiny_run(spec, run_dir, steps=STEPS) + [f"checkpoint.every_steps={every}", "checkpoint.keep_last=3",
                                                          *extra]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(str(folder), 4, 16)
    return str(folder / "shard-{0000..0003}.tar")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spec):
    """An uninterrupted 2-rank ZeRO-3 run, its tags step_12, step_14, step_16 and its loss curve (the tests copy
    the checkpoints before they touch them)."""
    run_dir = tmp_path_factory.mktemp("trained")
    pretrain(2, run(spec, run_dir))
    assert complete_tags(run_dir / "ckpt") == ["step_12", "step_14", "step_16"]
    return run_dir / "ckpt", [m["loss"] for m in read_metrics(run_dir)]


def corrupt_in_place(path) -> None:
    """What the issue did: up to 1 MiB of 0xFF in the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    n = min(2**20, len(data) // 4)
    data[len(data) // 2:len(data) // 2 + n] = b"\xff" * n
    path.write_bytes(bytes(data))




def test_corrupt_states_fall_back_to_the_intact_tag_with_its_curve(tmp_path, spec, trained):
    ckpt, curve = trained
    marker = tmp_path / "PWNED"
    shutil.copytree(ckpt, tmp_path / "ckpt")
    model_states = tmp_path / "ckpt/step_16/zero_pp_rank_0_mp_rank_00_model_states.pt"
    optim_states = tmp_path / "ckpt/step_14/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    corrupt_in_place(model_states)
    corrupt_in_place(optim_states)
    planted = tmp_path / "ckpt/step_16/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # DeepSpeed would unpickle it
    size = planted.stat().st_size
    payload = pickle.dumps(PicklePayload(marker))
    planted.write_bytes(payload + b"\0" * (size - len(payload)))

    with pytest.raises(CheckpointError, match=f"{tmp_path / 'ckpt/step_16'} is corrupt, not converting it"):
        consolidate(str(tmp_path / "ckpt"), str(tmp_path / "model"))  # conversion refuses, it does not fall back
    proc = pretrain(2, run(spec, tmp_path, "checkpoint.resume=latest"))
    assert f"skipping checkpoint step_16: {planted.parent}/" in proc.stderr
    assert f"skipping checkpoint step_14: {optim_states} is corrupt" in proc.stderr
    assert f"resumed from {tmp_path / 'ckpt'}/step_12 at step 12" in proc.stderr
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == list(range(13, STEPS + 1))
    # bit for bit the uninterrupted curve (so also that of any run resumed from step_12: tests/integration/test_train_resume.py)
    assert [m["loss"] for m in resumed] == curve[12:]
    assert not marker.exists()


def test_convert_twice_into_one_folder_loads_the_second(tmp_path, trained):
    ckpt, _ = trained
    out = tmp_path / "model"
    consolidate(str(ckpt), str(out), tag="step_12", max_shard_mb=1)
    assert (out / INDEX_NAME).is_file()  # sharded
    consolidate(str(ckpt), str(out), tag="step_16")
    assert sorted(p.name for p in out.glob("*.safetensors*")) == [WEIGHTS_NAME]  # nothing of the first survives
    fresh = consolidate(str(ckpt), str(tmp_path / "fresh"), tag="step_16")
    model, _ = load_pretrained(out)
    for (name, p), q in zip(model.state_dict().items(), load_pretrained(fresh)[0].state_dict().values()):
        assert torch.equal(p, q), name


def test_another_zero_stage_is_one_line(tmp_path, spec, trained):
    shutil.copytree(trained[0], tmp_path / "ckpt")
    proc = pretrain(2, run(spec, tmp_path, "checkpoint.resume=latest", "train.ds_config=ds_configs/zero2.json"),
                    check=False)
    assert proc.returncode != 0
    assert f"error: checkpoint {tmp_path / 'ckpt/step_16'} was saved with ZeRO stage 3, this run uses stage 2" \
        in proc.stderr
    assert not re.search(r'File ".*/recipes/', proc.stderr)  # no traceback from the ranks (torchrun prints its own)


def test_sigterm_checkpoints_at_the_agreed_step_and_resume_continues(tmp_path, spec, trained):
    overrides = run(spec, tmp_path, "checkpoint.preempt_check_every=2", every=1000)
    port = str(free_port())
    ranks = []
    for rank in range(2):  # as srun starts them: one process (and its data worker) per rank, each signalled
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        ranks.append(subprocess.Popen([sys.executable, "-m", "recipes.pretrain", "--config", "recipes/configs/demo.yaml",
                                       *overrides], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    metrics = tmp_path / "metrics.jsonl"
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
    logged = [m["step"] for m in read_metrics(tmp_path)]
    stopped = logged[-1]
    assert complete_tags(tmp_path / "ckpt") == [f"step_{stopped}"]  # a checkpoint at the step the ranks stopped after
    assert 3 <= stopped < STEPS and stopped % 2 == 0
    assert f"SIGTERM received: checkpointing at step {stopped}" in errors[0]

    pretrain(2, overrides + ["checkpoint.resume=auto"])
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == trained[1]  # the uninterrupted run's curve, bit for bit
