"""The engine's optimizer step is plain AdamW with global-norm clipping: two steps through DeepSpeed (each shipped
ZeRO config, CPU offload included, on 2 gloo ranks, with the recipe's fused AdamW and its fp32 gradient norms)
equal the same steps in plain torch.
"""
import json

import pytest

from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("ds_config", ["zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_engine_step_equals_plain_torch(tmp_path, ds_config):
    out = tmp_path / "result.json"
    torchrun(2, ["tests/integration/optimizer_step_worker.py", str(out), ds_config], timeout=180)
    r = json.loads(out.read_text())

    for got, want in zip(r["engine_norms"], r["reference_norms"], strict=True):
        assert abs(got - want) <= 1e-5 * want, (r["engine_norms"], r["reference_norms"])
        assert want > 0.05, "the clipping threshold must bind for the test to see it"
    assert r["max_update"] > 1e-4
    assert r["max_diff"] <= 1e-3 * r["max_update"], r
    # Negative control: a clipping norm 10% off moves the parameters visibly more than the tolerance.
    assert r["max_diff_wrong_norm"] > 1e-2 * r["max_update"], r
