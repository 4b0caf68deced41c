"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) on this CPU machine within the target's limits.

`triton.compile` of each launch spec for GPUTarget("cuda", 80 | 90, 32), then `ptxas -v` (model/kernels/aot.py).
Fails when a kernel asks for more shared memory than one block may have (the launch would fail on that GPU),
or needs more registers than a thread has, or spills past SPILL_BUDGET bytes per thread (slow, not wrong).

Covered here: every tile configuration the launchers can pick (each dtype × head dim of the hierarchy-aware
attention, at its largest variant: the group prior with CLS in multiply mode, four table gathers per tile) and
every contrastive kernel. `python -m model.kernels.aot` compiles all variants (text causal or not, both modes,
fp16 too) and prints the table recorded in docs/performance.md. Marked integration: ~36 compilations of
3–10 s each on 2 shared cores (Triton caches them under ~/.triton, so a second run takes seconds).
"""
import pytest
import torch

from model.kernels import contrastive_triton, hier_attention_triton
from model.kernels.aot import MAX_REGISTERS, SHARED_LIMIT, compile_for
from model.losses import MASKED_LOGIT

pytestmark = pytest.mark.integration

SPILL_BUDGET = 1024  # bytes of spill stores per thread: a few local-memory round trips per tile, not a loop's worth

SPECS = [
    *hier_attention_triton.compile_specs(dtypes=(torch.float32, torch.bfloat16), kinds=("group",), modes=("multiply",)),
    *contrastive_triton.compile_specs(MASKED_LOGIT, dtypes=(torch.float32, torch.bfloat16)),
]


@pytest.mark.parametrize("capability", sorted(SHARED_LIMIT))
@pytest.mark.parametrize("spec", SPECS, ids=[spec.label for spec in SPECS])
def test_kernel_compiles_within_target_limits(spec, capability):
    usage = compile_for(spec, capability)
    print(f"sm_{capability} {spec.label}: {usage}")
    assert usage.shared <= SHARED_LIMIT[capability], f"{usage.shared} B shared > sm_{capability}'s limit"
    assert usage.registers <= MAX_REGISTERS
    assert usage.spill_stores <= SPILL_BUDGET, f"spills {usage.spill_stores} B per thread"


def test_every_tile_configuration_is_covered():
    """The specs above include each (dtype, head dim) tile configuration the attention launcher can pick."""
    picked = {(str(spec.constexprs["BLOCK_M"]), spec.num_warps, spec.num_stages, spec.constexprs["BLOCK_D"])
              for spec in hier_attention_triton.compile_specs()}
    covered = {(str(spec.constexprs["BLOCK_M"]), spec.num_warps, spec.num_stages, spec.constexprs["BLOCK_D"])
               for spec in SPECS if "BLOCK_D" in spec.constexprs and spec.fn.__name__.startswith("_fwd")}
    assert picked == covered
