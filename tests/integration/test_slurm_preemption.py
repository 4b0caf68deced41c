"""A real one-node SLURM cluster: the sbatch script trains on 2 CPU tasks, SIGUSR1 preempts it mid-run, the
ranks checkpoint at one agreed step, the job requeues itself, resumes from `latest` and finishes the run with
the loss curve of an uninterrupted run."""
import os
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics
from tests.integration.slurm_cluster import LocalSlurm, ensure_installed

pytestmark = pytest.mark.integration

STEPS = 30


def run_overrides(tmp_path, spec: str, name: str) -> list[str]:
    return launch.tiny_run(spec, tmp_path / name, steps=STEPS) + ["checkpoint.every_steps=1000", "checkpoint.keep_last=0"]


def wait_for(condition, what: str, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_steps(log_dir) -> list[int]:
    path = log_dir / "metrics.jsonl"
    return [m["step"] for m in read_metrics(log_dir)] if path.is_file() and path.stat().st_size else []


def test_preempted_job_checkpoints_requeues_and_finishes(tmp_path, synthetic_shards):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    spec = synthetic_shards(n_shards=4, per_shard=16)
    job_out = tmp_path / "job.out"
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    with LocalSlurm(cpus=2) as cluster:
        os.environ.update(env)  # sbatch exports the submitter's environment to the job
        submit = cluster.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--cpus-per-task=1",
                              f"--chdir={ROOT}", f"--output={job_out}", "launch_scripts/slurm.sbatch",
                              "recipes/configs/demo.yaml", *run_overrides(tmp_path, spec, "slurm")])
        job_id = submit.stdout.strip().split(";")[0]
        log_dir = tmp_path / "slurm"
        wait_for(lambda: len(logged_steps(log_dir)) >= 2, "the first training steps", timeout=180)
        cluster.run(["scancel", "--signal=USR1", job_id])  # what --signal=USR1@120 sends before the time limit

        def requeued():
            job = cluster.job(job_id)
            return job["Restarts"] == "1" and job["JobState"] == "PENDING"

        wait_for(requeued, "the job to requeue itself", timeout=120, poll=0.5)

        def finished():
            job = cluster.job(job_id)
            return job if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

        job = wait_for(finished, "the requeued job to finish", timeout=300, poll=1.0)
        out = job_out.read_text()
        assert job["JobState"] == "COMPLETED", f"{job}\n{out[-4000:]}\n{cluster.logs()}"
    assert job["Restarts"] == "1", job  # requeued exactly once
    assert "preempted after a checkpoint: requeueing" in out

    tags = sorted(p.name for p in (log_dir / "ckpt").glob("step_*"))
    preempt_tags = [t for t in tags if t != f"step_{STEPS}"]
    assert len(preempt_tags) == 1, tags  # the one collective preemption save, plus the final one
    preempted_at = int(preempt_tags[0].split("_")[1])
    assert 2 <= preempted_at < STEPS and preempted_at % 10 == 0  # checkpoint.preempt_check_every=10
    assert f"resumed from {log_dir / 'ckpt'}/step_{preempted_at} at step {preempted_at}" in out
    assert logged_steps(log_dir) == list(range(1, STEPS + 1))  # same final step count, no step twice

    # The curve continues: the same run uninterrupted (torchrun) logs the same losses.
    pretrain(2, run_overrides(tmp_path, spec, "uninterrupted"))
    resumed = [m["loss"] for m in read_metrics(log_dir)]
    reference = [m["loss"] for m in read_metrics(tmp_path / "uninterrupted")]
    assert resumed == pytest.approx(reference, rel=0, abs=1e-5)
