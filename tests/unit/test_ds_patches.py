"""Our patches into DeepSpeed take effect, and say so loudly when their target is gone (recipes/ds_patches.py)."""
import importlib
import logging

import deepspeed
import pytest
import torch
from deepspeed.runtime.zero import stage3, stage_1_and_2

from recipes import ds_patches


@pytest.fixture
def restore_norm_dtype():
    saved = stage_1_and_2.get_norm_dtype, stage3.get_norm_dtype
    yield
    stage_1_and_2.get_norm_dtype, stage3.get_norm_dtype = saved


def test_tested_version_is_installed():
    """requirements.txt pins the DeepSpeed these patches were tested with; bumping it means re-testing them."""
    assert deepspeed.__version__ in ds_patches.TESTED_DEEPSPEED
    assert ds_patches.check_version()


def test_fp32_grad_norms_takes_effect(restore_norm_dtype):
    assert ds_patches.fp32_grad_norms()
    for module in (stage_1_and_2, stage3):
        assert module.get_norm_dtype() == torch.float32  # what the ZeRO optimizers now call per gradient


def test_fp32_grad_norms_missing_target_is_loud(monkeypatch, caplog, restore_norm_dtype):
    monkeypatch.delattr(stage3, "get_norm_dtype")
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert not ds_patches.fp32_grad_norms()
    assert "patch fp32_grad_norms NOT applied" in caplog.text and "stage3.get_norm_dtype does not exist" in caplog.text
    assert stage_1_and_2.get_norm_dtype() == torch.float64  # nothing half-applied


def test_fp32_grad_norms_unused_target_is_loud(monkeypatch, caplog, restore_norm_dtype):
    """DeepSpeed keeps the name but stops calling it: the rebinding would be a silent no-op."""
    source = ds_patches.inspect.getsource
    monkeypatch.setattr(ds_patches.inspect, "getsource",
                        lambda m: source(m).replace("get_norm_dtype()", "norm_dtype") if m is stage3 else source(m))
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert not ds_patches.fp32_grad_norms()
    assert "no longer contains 'get_norm_dtype()'" in caplog.text


@pytest.fixture
def restore_offload_hooks():
    from deepspeed.runtime.zero import parameter_offload

    saved = parameter_offload.apply_to_tensors_only
    yield parameter_offload
    parameter_offload.apply_to_tensors_only = saved


def test_backward_hooks_where_grad_flows_takes_effect(restore_offload_hooks):
    """ZeRO-3's two hooks reach the name patched; the Function is applied exactly to the tensors that carry grad."""
    offload = restore_offload_hooks
    assert ds_patches.backward_hooks_where_grad_flows()
    wrapped = []

    def marker(t):  # stands in for PreBackwardFunctionForModule.apply
        wrapped.append(t)
        return t.view_as(t)

    leaf, const = torch.ones(2, requires_grad=True), torch.ones(3)
    with torch.no_grad():
        out = {"a": leaf * 2, "b": [const, leaf + 1]}
        assert offload.apply_to_tensors_only(marker, out) is out and wrapped == []
    y = leaf * 2
    out = offload.apply_to_tensors_only(marker, {"a": y, "b": [const, (y + 1, 7)]})
    assert [t.shape for t in wrapped] == [(2,), (2,)]  # y and y + 1; not the constant, not the int
    assert out["b"][0] is const and out["b"][1][1] == 7 and out["a"] is not y


def test_backward_hooks_where_grad_flows_is_loud_when_gone(monkeypatch, caplog, restore_offload_hooks):
    offload = restore_offload_hooks
    source = ds_patches.inspect.getsource
    monkeypatch.setattr(ds_patches.inspect, "getsource", lambda m: source(m).replace(
        "apply_to_tensors_only(module.post_bwd_fn.apply", "wrap(module.post_bwd_fn.apply") if m is offload else source(m))
    original = offload.apply_to_tensors_only
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert not ds_patches.backward_hooks_where_grad_flows()
    assert "patch backward_hooks_where_grad_flows NOT applied" in caplog.text
    assert offload.apply_to_tensors_only is original  # nothing half-applied


def test_no_shm_comm_takes_effect_and_is_loud_when_gone(monkeypatch, caplog):
    ops = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(ops, "deepspeed_shm_comm", True)
    assert ds_patches.no_shm_comm() and ops["deepspeed_shm_comm"] is False
    source = ds_patches.inspect.getsource(importlib.import_module("deepspeed.comm.torch"))
    assert "deepspeed.ops.__compatible_ops__" in source  # where DeepSpeed decides to build the op
    monkeypatch.delitem(ops, "deepspeed_shm_comm")
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert not ds_patches.no_shm_comm()
    assert "patch no_shm_comm NOT applied" in caplog.text


def test_untested_version_is_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    monkeypatch.setattr(ds_patches, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="hiclip"):
        assert not ds_patches.check_version()
        assert not ds_patches.check_version()
    assert caplog.text.count("DeepSpeed 0.99.0 is untested here") == 1
