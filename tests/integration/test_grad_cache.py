"""The gradient-cached step gives the plain step's gradients through DeepSpeed (ZeRO-2/3, 1 and 2 gloo ranks).

Each world size is one torchrun of tests/integration/grad_cache_worker.py running several cases in a row; the
worker compares the full fp32 parameter gradients of both steps (dropout on) and counts the engine's gradient
reductions.
"""
import json

import pytest

from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration

BASE = dict(attention="vanilla", dropout=0.1, reduction="coalesce", missing_on_rank1=False, replay_rng=True,
            region_source="boxes")
CHUNKS_PER_STEP = 2  # the worker's batch of 6 per rank in chunks of 4

MATRIX = [dict(BASE, name=f"zero{stage}-{loss}", stage=stage, loss=loss)
          for stage in (2, 3) for loss in ("clip", "pyramid")]
CASES = {
    1: MATRIX + [
        dict(BASE, name="hier-zero2", stage=2, loss="pyramid", attention="hier"),
        # Dropout off: the reference is literally one forward of the whole batch (recipes/step.py's plain path).
        dict(BASE, name="full-batch-reference", stage=3, loss="pyramid", dropout=0.0),
        # A cached step that raises after its no-grad passes (parameters gathered, hooks aside) comes first.
        dict(BASE, name="zero3-after-a-failed-step", stage=3, loss="clip", fail_first=True),
    ],
    2: MATRIX + [
        dict(BASE, name="rank1-lacks-regions-and-summaries", stage=3, loss="pyramid", missing_on_rank1=True),
        dict(BASE, name="hier-zero3", stage=3, loss="pyramid", attention="hier"),
        # Each replayed chunk draws the same kept rows and columns as its first pass (the RNG replay covers it).
        dict(BASE, name="hier-zero3-patch-dropout", stage=3, loss="pyramid", attention="hier", patch_dropout=0.5),
        dict(BASE, name="boundary-reduction", stage=3, loss="pyramid", reduction="boundary"),
        # DeepSpeed's own per-module gathers in every pass (`auto`'s fallback when the model may not stay whole).
        dict(BASE, name="gather-per-pass", stage=3, loss="pyramid", attention="hier", gather="pass"),
        # Regions from precomputed detector features (a linear embedding) instead of ROI-align over the tower.
        dict(BASE, name="detector-features-zero3", stage=3, loss="pyramid", region_source="features"),
        # Negative control: the comparison can fail. Without RNG replay the dropout masks change between passes.
        dict(BASE, name="no-rng-replay", stage=2, loss="pyramid", replay_rng=False),
    ],
}


@pytest.mark.parametrize("world", [1, 2])
def test_cached_gradients_equal_full_batch(tmp_path, world):
    out = tmp_path / "results.jsonl"
    torchrun(world, ["tests/integration/grad_cache_worker.py", str(out), json.dumps(CASES[world])], timeout=240)
    results = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(results) == [c["name"] for c in CASES[world]]

    for name, r in results.items():
        assert r["grad_norm"] > 1.0 and r["logit_scale_grad"] != 0.0, name
        if not r["replay_rng"]:
            assert r["max_rel_err"] > 1e-2, f"{name}: the comparison did not notice different dropout masks"
            continue
        assert r["max_rel_err"] <= 1e-5, f"{name}: {r['worst_param']} off by {r['max_rel_err']:.2e}"
        assert r["loss_diff"] <= 1e-6, name
        # The region branch is trained by the pyramid loss and untouched by the CLIP loss.
        assert (r["region_grad_norm"] > 0) == (r["loss"] == "pyramid"), name
        # One gradient reduction per optimizer step, as many as the plain step, not one per chunk.
        expected = r["reductions_plain"] * (CHUNKS_PER_STEP if r["reduction"] == "boundary" else 1)
        assert r["reductions"] == expected, name
        assert r["hooks_restored"], f"{name}: a module's hooks differ after the cached step"
        if r.get("fail_first"):
            assert r["recovered"], f"{name}: hooks or gathered parameters left behind by the failed step"
        if world == 2 and r["stage"] == 3:
            # ZeRO-3: the whole model in one all-gather per step, or (gather: pass) in every one of 3 passes per chunk.
            if r.get("gather") == "pass":
                assert r["gathers"] >= 3 * CHUNKS_PER_STEP, name
            else:
                assert r["gathers"] == 1, f"{name}: {r['gathers']} parameter all-gathers in one cached step"

    if world == 2:
        # 6 samples per rank, one of them without regions or a summary; rank 1 contributes none in the "lacks" case.
        assert results["zero3-pyramid"]["pairs_region_summary"] == 10
        assert results["rank1-lacks-regions-and-summaries"]["pairs_region_summary"] == 5
