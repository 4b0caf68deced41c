"""The preemption flag in one process (a gloo group of one): the signal only sets a flag, which ranks read at
the agreed steps; the launcher's marker file is written on exit."""
import os
import signal

import pytest
import torch
import torch.distributed as dist

from recipes import preemption


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)
    dist.destroy_process_group()


def test_signal_is_acted_on_at_the_next_check_step(group):
    flag = preemption.PreemptionFlag("SIGUSR1", torch.device("cpu"), check_every=5)
    assert not flag.agreed(5)
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
    assert not flag.agreed(6) and not flag.agreed(9)  # between check steps: no collective, no stop
    assert flag.agreed(10)


def test_disabled_flag_never_stops(group):
    flag = preemption.PreemptionFlag("", torch.device("cpu"))
    assert not flag.agreed(10)


@pytest.mark.parametrize("configured", ["SIGUSR1", ""])
def test_sigterm_is_always_a_preemption(group, configured):
    flag = preemption.PreemptionFlag(configured, torch.device("cpu"), check_every=2)
    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's time limit, a plain scancel, torchrun stopping
    assert not flag.agreed(3) and flag.agreed(4)


def test_exit_for_requeue_leaves_marker_and_code(tmp_path, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(preemption.REQUEUE_MARKER_ENV, str(marker))
    with pytest.raises(SystemExit) as exit_info:
        preemption.exit_for_requeue(40)
    assert exit_info.value.code == preemption.REQUEUE_EXIT_CODE
    assert marker.read_text().strip() == "40"
