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
