"""Activation checkpointing through DeepSpeed on 2 gloo ranks: the same gradients as without it (HiCLIP x
PyramidCLIP, fp32, dropout on), with and without the gradient cache, ZeRO-2 and ZeRO-3, and the same ZeRO-3
parameter gathers. One torchrun of tests/integration/levers_worker.py runs every case."""
import json

import pytest

from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration

CASES = [
    dict(name="zero3-blocks", stage=3, checkpointing="blocks", patch_dropout=0.0, grad_cache=False),
    dict(name="zero3-blocks-cache", stage=3, checkpointing="blocks", patch_dropout=0.0, grad_cache=True),
    # The cache replays each chunk's patch selection and dropout; every_k checkpoints blocks 0 and 2 of 4.
    dict(name="zero3-every_k-cache-patch-dropout", stage=3, checkpointing="every_k", patch_dropout=0.5,
         grad_cache=True),
    dict(name="zero2-blocks-cache", stage=2, checkpointing="blocks", patch_dropout=0.0, grad_cache=True),
]
# Per step: vision f1 (2 blocks), f2 for the views and for the regions (2 + 2), text (2): 8 block calls per forward.
BLOCK_CALLS = {"blocks": 8, "every_k": 4}


def test_checkpointed_gradients_equal_plain(tmp_path):
    out = tmp_path / "results.jsonl"
    torchrun(2, ["tests/integration/levers_worker.py", str(out), json.dumps(CASES)], timeout=300)
    results = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(results) == [c["name"] for c in CASES]
    for name, r in results.items():
        assert r["max_rel_err"] <= 1e-5, f"{name}: {r['worst_param']} off by {r['max_rel_err']:.2e}"
        assert r["loss_diff"] <= 1e-6, name
        # The comparison can fail: another dropout stream moves the gradients far more than the tolerance.
        assert r["other_seed_rel_err"] > 1e-2, name
        # Checkpointing really ran: each checkpointed block call once in forward and once recomputed (under the
        # cache: the no-grad first pass skips the checkpoint, each replayed chunk runs it), never without it.
        chunks = 2 if r["grad_cache"] else 1
        assert r["checkpointed_block_runs"] == 2 * BLOCK_CALLS[r["checkpointing"]] * chunks, name
        assert r["checkpointed_block_runs_none"] == 0, name
        # The recomputation re-enters modules in backward; ZeRO-3 gathers no parameter more often for it.
        assert r["gathers_checkpointed"] == r["gathers_none"], name
        # Only the last vision block's prior has no gradient: the CLS, which the head reads, has C = 1 to all.
        assert all(".blocks.3.prior." in n for n in r["zero_grads"]), name
