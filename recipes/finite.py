"""Is the training state finite? The check before a checkpoint is promoted, and how a diverged run ends.

A checkpoint whose parameters or optimizer moments hold a NaN or an infinity must never become `latest`: a
requeued job would resume into it and the run would be lost for good. `require_finite` runs on every rank over
what that rank holds (its partition of the fp32 master weights and Adam moments under ZeRO, plus its 16-bit
working copy) and one all-reduce makes the verdict common, so every rank raises or none does.

A run that cannot go on (non-finite state, or the divergence guard out of rollbacks, recipes/guard.py) raises
`Diverged`; the trainer turns it into one line on stderr and DIVERGED_EXIT_CODE, which is not the requeue code
(75) and which launch_scripts/slurm.sbatch does not requeue: a requeued diverged run only burns its allocation.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

DIVERGED_EXIT_CODE = 3


class Diverged(RuntimeError):
    """The run stopped because training diverged; `latest` still names a finite checkpoint."""


def _local_state(engine) -> Iterator[torch.Tensor]:
    """Every floating tensor of the training state this rank holds, each once."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's ZeRO wrappers hold ours
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p  # the fp32 master partition under ZeRO
            yield from (v for v in optimizer.state.get(p, {}).values()
                        if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0)
    for p in engine.module.parameters():
        yield getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition; the full-size param is empty


def state_is_finite(engine) -> bool:
    """Collective. One fp64 sum per tensor (NaN and ±inf survive a sum; fp64 cannot overflow on finite fp32
    values), so the pass reads each byte once and allocates nothing of the model's size."""
    device = engine.device  # the collective's device; offloaded state sits on the CPU
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in _local_state(engine):
        total += t.detach().sum(dtype=torch.float64).to(device)
    bad = (~torch.isfinite(total)).float()[None]
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def require_finite(engine, step: int) -> None:
    """Collective: raise Diverged on every rank when any rank's state holds a non-finite value."""
    if not state_is_finite(engine):
        raise Diverged(f"step {step}: parameters or optimizer state hold non-finite values; the checkpoint was "
                       f"not written and `latest` still names the last finite one")
