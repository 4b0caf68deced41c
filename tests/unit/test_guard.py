"""The divergence guard's bookkeeping in one process: config checks, the fault spec, spike and rollback triggers,
the LR scale. The multi-rank behaviour is in tests/integration/test_guard.py."""
from types import SimpleNamespace

import pytest
import torch

from recipes.config import load_config
from recipes.guard import Fault, Guard, GuardConfig, _scale_lr, parse_faults


def make_guard(**cfg) -> Guard:
    return Guard(GuardConfig(**cfg), rank=0, device=torch.device("cpu"))


def run(guard: Guard, loss: float, applied_by_engine: bool = True) -> tuple[bool, bool]:
    guard.begin({})
    guard.admit(torch.tensor(loss))
    return guard.end(SimpleNamespace(was_step_applied=lambda: applied_by_engine))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_skips=0), "train.guard.max_skips must be >= 1, got 0"),
    (dict(spike_factor=1.0), "train.guard.spike_factor must be > 1, got 1.0"),
    (dict(rollback_lr_scale=0.0), "train.guard.rollback_lr_scale must be in (0, 1], got 0.0"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        GuardConfig(**kwargs)
    assert str(error.value) == message
    assert load_config(None, ["train.guard.max_rollbacks=1"]).train.guard.max_rollbacks == 1


def test_fault_spec():
    assert parse_faults("nan_loss@3@0; spike@5-7;nan_grad@9-") == [
        Fault("nan_loss", 3, 3, 0), Fault("spike", 5, 7, None), Fault("nan_grad", 9, None, None)]
    assert Fault("spike", 5, 7, None).hits(7, 1) and not Fault("spike", 5, 7, None).hits(8, 1)
    assert Fault("nan_grad", 9, None, 1).hits(100, 1) and not Fault("nan_grad", 9, None, 1).hits(100, 0)
    with pytest.raises(ValueError, match="HICLIP_TEST_FAULT: 'inf@3'"):
        parse_faults("inf@3")


def test_consecutive_skips_roll_back_and_a_good_step_resets_them():
    guard = make_guard(max_skips=2)
    assert run(guard, 1.0) == (True, False)
    assert run(guard, float("nan")) == (False, False)
    assert run(guard, 1.0, applied_by_engine=False) == (False, True)  # DeepSpeed skipped: non-finite grad norm
    guard.consecutive_skips = 0
    assert run(guard, float("inf")) == (False, False)
    assert run(guard, 1.0) == (True, False)
    assert run(guard, float("nan")) == (False, False)
    assert guard.skipped == 4


def test_spikes_against_the_running_median_within_a_span():
    guard = make_guard(median_window=3, spike_factor=2.0, max_spikes=2, spike_span=3)
    for loss in (1.0, 1.2, 0.9):
        assert run(guard, loss) == (True, False)
    assert run(guard, 2.5) == (True, False) and guard.spikes == 1  # 2.5 > 2 x median 1.0
    assert run(guard, 1.9) == (True, False) and guard.spikes == 1  # not a spike; enters the median
    assert run(guard, 1.1) == (True, False)
    assert run(guard, 5.0) == (True, False)  # the first spike left the span of 3 steps
    assert run(guard, 5.0) == (True, True) and guard.spikes == 3
    assert list(guard.losses) == pytest.approx([0.9, 1.9, 1.1])  # spikes stay out of the median


def test_disabled_guard_only_counts():
    guard = make_guard(enabled=False, max_skips=1)
    assert run(guard, float("nan"), applied_by_engine=False) == (False, False)
    assert guard.skipped == 1 and guard.spikes == 0


def test_lr_scale_moves_schedule_and_current_lr():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    optimizer.step()
    schedule.step()
    _scale_lr(SimpleNamespace(lr_scheduler=schedule), 0.5)
    assert optimizer.param_groups[0]["lr"] == 0.25
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 3)


def test_counters_survive_a_checkpoint():
    guard = make_guard()
    run(guard, 1.0)
    run(guard, float("nan"))
    again = make_guard()
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict() and again.iteration == 2 and again.skipped == 1
