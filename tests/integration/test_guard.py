"""The divergence guard end to end (recipes/guard.py), faults planted with HICLIP_TEST_FAULT.

- A skipped step leaves every state tensor bit-identical (each shipped ZeRO flavour, bf16 and fp32, gradient
  cache), and a non-finite state is never checkpointed (tests/integration/guard_skip_worker.py).
- One 2-rank ZeRO-3 run with a NaN loss on rank 0 at iteration 3, a NaN gradient on rank 1 at iteration 4, and
  loss spikes at iterations 5 and 6 (-> rollback to step 2) ends bit-equal to an independent construction that
  never uses the guard: stop after step 2, resume past 4 batches. Its sample log shows no sample drawn twice
  and exactly the skipped and rolled-back batches missing.
- Out of rollbacks: a one-line error, exit code 3, `latest` names a finite checkpoint.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from recipes.checkpointing import resolve_tag
from recipes.finite import DIVERGED_EXIT_CODE
from recipes.guard import FAULT_ENV, SAMPLE_LOG_ENV
from tests.conftest import ROOT
from tests.integration import launch
from tests.integration.launch import pretrain, read_metrics, torchrun

pytestmark = pytest.mark.integration

WORLD, BATCH = 2, 4


def test_skipped_steps_leave_the_state_bit_identical(tmp_path):
    out = tmp_path / "result.json"
    torchrun(2, ["tests/integration/guard_skip_worker.py", str(out)], timeout=300)
    for rank_results in json.loads(out.read_text()):
        for r in rank_results:
            if r["name"].endswith("no-overflow-check"):  # negative control: the NaN update goes through
                assert r["applied"][1] and not r["grad_skip_identical"] and not r["finite_after"], r
                continue
            assert r["applied"] == [True, False, False, True] and r["skipped"] == 2, r
            assert r["grad_skip_identical"] and r["loss_skip_identical"], r
            assert r["clean_step_changes"] and r["equals_run_without_poisoned_batches"] and r["finite_after"], r
        poisoned = rank_results[0]
        assert "non-finite" in poisoned["poisoned_save"] and poisoned["latest"] == "step_4", poisoned
        assert "step_5" not in poisoned["tags"] and "step_5.partial" not in poisoned["tags"], poisoned


def fp32_params(ckpt: Path) -> dict[str, torch.Tensor]:
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=resolve_tag(str(ckpt), "latest"))


def test_skip_and_rollback_equal_an_independent_construction(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=8, per_shard=16)  # 16 batches per rank and epoch: no sample comes twice
    steps = 6

    def run(name: str, extra: list[str], env: dict | None = None):
        overrides = launch.tiny_run(spec, tmp_path / name, steps=steps) + [
            "data.resampled=false", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
            "train.guard.median_window=3", "train.guard.max_spikes=2", "train.guard.spike_span=10", *extra]
        pretrain(WORLD, overrides, env=env, timeout=300)

    samples = tmp_path / "samples"
    samples.mkdir()
    # Iterations 1-2 make steps 1-2 (checkpointed); 3 and 4 are skipped; 5 and 6 are spikes (applied as steps
    # 3 and 4), and the second spike rolls back to step 2 before step 4 is saved; iterations 7-10 make steps 3-6.
    run("guarded", [], env={FAULT_ENV: "nan_loss@3@0;nan_grad@4@1;spike@5-6", SAMPLE_LOG_ENV: str(samples)})
    run("independent", ["train.stop_at=2"])
    run("independent", ["checkpoint.resume=latest", "train.guard.skip_batches=4"])

    guarded, independent = read_metrics(tmp_path / "guarded"), read_metrics(tmp_path / "independent")
    last = guarded[-1]
    assert (last["step"], last["iteration"]) == (steps, 10)
    assert (last["guard/skipped_steps"], last["guard/spikes"], last["guard/rollbacks"],
            last["guard/discarded_batches"]) == (2, 2, 1, 4)
    assert [r["step"] for r in guarded] == [1, 2, 3, 3, 4, 5, 6]  # step 3 logged, then rolled back
    assert all(r["grad_norm"] > 0 for r in guarded)
    # After the rollback the guarded run trains on exactly the batches the independent one does.
    assert [r["loss"] for r in guarded[-4:]] == [r["loss"] for r in independent[-4:]]
    a, b = fp32_params(tmp_path / "guarded/ckpt"), fp32_params(tmp_path / "independent/ckpt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.isfinite(a[name]).all() and torch.equal(a[name], b[name]), name

    drawn, trained = [], []
    for rank in range(WORLD):
        events = [json.loads(line) for line in (samples / f"samples_rank{rank}.jsonl").read_text().splitlines()]
        assert [e["discarded_iterations"] for e in events if "discarded_iterations" in e] == [[3, 6]]
        steps_taken = [e for e in events if "keys" in e]
        assert [e["iteration"] for e in steps_taken] == list(range(1, 11))
        assert [e["iteration"] for e in steps_taken if not e["applied"]] == [3, 4]
        drawn += [k for e in steps_taken for k in e["keys"]]
        trained += [k for e in steps_taken if e["applied"] and not 3 <= e["iteration"] <= 6 for k in e["keys"]]
    assert len(drawn) == len(set(drawn)) == 10 * WORLD * BATCH  # the stream never served a sample twice
    assert len(trained) == steps * WORLD * BATCH  # what the final model learnt from
    assert len(set(drawn) - set(trained)) == 4 * WORLD * BATCH  # the counted window, and nothing else


def test_out_of_rollbacks_is_one_line_error_not_requeued(tmp_path, synthetic_shards):
    spec = synthetic_shards(n_shards=4, per_shard=16)
    run = tmp_path / "run"
    overrides = launch.tiny_run(spec, run, steps=20) + [
        "checkpoint.every_steps=2", "train.guard.max_skips=2", "train.guard.max_rollbacks=2",
        "train.guard.rollback_lr_scale=0.5"]
    # A world of one under plain python, so the exit code is the trainer's own (torchrun reports 1 for any failure).
    proc = subprocess.run([sys.executable, "-m", "recipes.pretrain", "--config", "recipes/configs/demo.yaml",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**launch.base_env(), FAULT_ENV: "nan_loss@5-"})
    assert proc.returncode == DIVERGED_EXIT_CODE != 75, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: train.guard gave up at iteration 10 after 2 rollbacks"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (run / "ckpt/latest").read_text() == "step_4"
    assert all(torch.isfinite(p).all() for p in fp32_params(run / "ckpt").values())
