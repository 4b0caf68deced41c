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


def local_state(engine) -> Iterator[torch.Tensor]:
    """Every floating tensor of the training state this rank holds: 16-bit weights, fp32 masters, Adam moments."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's ZeRO wrappers hold ours
    moments = sorted({k for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim()})
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        # ZeRO-3: each parameter's partition ends, on the last ranks, in padding that is never initialised (it
        # held 3.8e24 in one run): read only the elements that belong to the parameter.
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        rank = dist.get_rank() if dist.is_initialized() else 0
        for p in engine.module.parameters():
            size = p.ds_tensor.numel()
            valid = max(0, min(size, p.ds_numel - rank * size))
            yield p.ds_tensor[:valid]
            if p.requires_grad:
                yield safe_get_local_fp32_param(p)[:valid]
                yield from (safe_get_local_optimizer_state(p, k)[:valid] for k in moments)
        return
    # ZeRO-1/2 (zero-padded flat partitions) and no ZeRO: the optimizer's own parameters are the fp32 masters.
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p
            yield from (optimizer.state[p][k] for k in moments if k in optimizer.state.get(p, {}))
    yield from engine.module.parameters()


def state_is_finite(engine) -> bool:
    """Collective. One fp64 sum per tensor (NaN and ±inf survive a sum; fp64 cannot overflow on finite fp32
    values), so the pass reads each byte once and allocates nothing of the model's size."""
    device = engine.device  # the collective's device; offloaded state sits on the CPU
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in local_state(engine):
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
