"""Preemption: turn a signal into a checkpoint at a step every rank agrees on, then a clean exit for requeue.

SLURM sends the signal before the time limit (`#SBATCH --signal=USR1@120`) or on demand
(`scancel --signal=USR1 JOB`); it reaches the ranks at different moments, possibly mid-step. SIGTERM, what SLURM
sends at the time limit itself and on a plain `scancel` (SIGKILL follows after KillWait, 30 s by default), and
what torchrun forwards when it is stopped, is always a preemption too: the same save, if it fits before the
SIGKILL. The handler only sets a flag. Once per step the ranks all-reduce their flags (MAX), so they all see the request after the same
step, save together, and leave with REQUEUE_EXIT_CODE; launch_scripts/slurm.sbatch then requeues the job,
which resumes from `latest` (checkpoint.resume=auto).
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("hiclip")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped early, state saved, run me again"
# A file the launcher asks for (launch_scripts/slurm.sbatch): srun --kill-on-bad-exit turns the first rank's exit 75
# into SIGTERM for the others, so the step's exit code alone cannot say "preempted after a complete save".
REQUEUE_MARKER_ENV = "HICLIP_REQUEUE_MARKER"


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is written."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint saved at step {step}, exiting for requeue")
        self.step = step


def exit_for_requeue(step: int) -> None:
    """After the preemption checkpoint is complete on every rank: tell the launcher, and leave."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{step}\n")
    raise SystemExit(REQUEUE_EXIT_CODE)


class PreemptionFlag:
    """Install in every rank before forking data workers (they inherit the handler and ignore the signal;
    data_pipeline's workers ignore SIGTERM explicitly, since torch's worker handler would die of it)."""

    def __init__(self, signal_name: str, device: torch.device, check_every: int = 1):
        self.signal_names = sorted({signal_name, "SIGTERM"} - {""})
        self.check_every = max(1, check_every)
        self._received = 0  # number of the signal received, 0 for none
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        for name in self.signal_names:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum  # only a flag: the handler may run mid-collective

    def agreed(self, step: int) -> bool:
        """Collective every `check_every` steps: True on all ranks once any rank received a preemption signal."""
        if step % self.check_every:
            return False
        self._flag.fill_(self._received)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        received = int(self._flag.item())
        if received and dist.get_rank() == 0:
            log.warning("%s received: checkpointing at step %d and exiting for requeue", signal.Signals(received).name,
                        step)
        return bool(received)
