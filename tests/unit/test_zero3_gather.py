"""When the gradient cache may keep the ZeRO-3 model gathered for a step, and what it says when it may not
(recipes/zero3_gather.py, grad_cache.gather). The gathering itself runs in tests/integration/test_grad_cache.py:
one all-gather per cached step on 2 ranks, the plain step's gradients, every module's hooks the same afterwards."""
from types import SimpleNamespace

import pytest
import torch

from recipes.grad_cache import check_gather
from recipes.zero3_gather import _deepspeed_hook_ids, gather_once_blocker


def fake_engine(stage=3, numel=(1000, 500), budget=10_000, offload="none"):
    """The engine methods the decision reads, with ZeRO-3 parameters of the given sizes."""
    params = [SimpleNamespace(ds_numel=n) for n in numel]
    return SimpleNamespace(
        zero_optimization_stage=lambda: stage,
        zero_offload_param=lambda: None if offload is None else SimpleNamespace(device=offload),
        zero_max_live_parameters=lambda: budget,
        module=SimpleNamespace(parameters=lambda: iter(params)),
        optimizer=SimpleNamespace(),
    )


def test_a_model_within_the_live_budget_may_stay_gathered():
    assert gather_once_blocker(fake_engine()) is None
    assert gather_once_blocker(fake_engine(offload=None)) is None  # no offload section at all
    assert check_gather(fake_engine(), "auto") is None and check_gather(fake_engine(), "step") is None


@pytest.mark.parametrize("engine, culprit", [
    (fake_engine(budget=1499), "the model's 1,500 parameters exceed stage3_max_live_parameters = 1,499"),
    (fake_engine(offload="cpu"), "parameters are offloaded (offload_param.device = cpu)"),
])
def test_what_keeps_the_model_from_staying_gathered(engine, culprit):
    assert gather_once_blocker(engine) == culprit
    assert check_gather(engine, "auto") == culprit  # auto falls back to per-pass gathers (engine.py logs it)
    with pytest.raises(ValueError) as err:
        check_gather(engine, "step")
    assert str(err.value) == f"grad_cache.gather=step: {culprit}; set grad_cache.gather to auto or pass"
    assert check_gather(engine, "pass") is None


def test_only_zero3_has_anything_to_gather():
    for stage in (0, 1, 2):
        assert check_gather(fake_engine(stage=stage, offload="cpu"), "step") is None


def test_a_deepspeed_without_the_hook_handles_is_named():
    with pytest.raises(RuntimeError, match="set grad_cache.gather=pass"):
        _deepspeed_hook_ids(fake_engine())
    module = torch.nn.Linear(2, 2)
    handles = SimpleNamespace(forward_hooks=[module.register_forward_pre_hook(lambda *a: None)],
                              backward_hooks=[module.register_forward_hook(lambda *a: None)],
                              fwd_pre_hook=module.register_forward_pre_hook(lambda *a: None))
    engine = fake_engine()
    engine.optimizer.parameter_offload = handles
    assert _deepspeed_hook_ids(engine) == {h.id for h in (*handles.forward_hooks, *handles.backward_hooks,
                                                          handles.fwd_pre_hook)}
