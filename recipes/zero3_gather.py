"""ZeRO-3 parameters gathered once for a gradient-cached step, not once per chunk and pass.

Under ZeRO-3 DeepSpeed's hooks run around every submodule call: gather the module's parameters before it
(prefetching the next ones along a recorded trace of module calls), release them after, and the same in backward.
A plain step is one forward and one backward, and with the shipped budgets (`stage3_max_live_parameters` and
`stage3_max_reuse_distance`, 1e9 elements) what the forward gathered stays until the backward has used it: one
gather of the model per step. The gradient cache makes three passes per chunk (a no-grad forward, the replayed
forward, its backward). Each forward resets DeepSpeed's step, the trace it recorded stops matching, and parameters
are released after every module and gathered again in the next pass: ~3 gathers of the model per chunk
(bench/zero_memory.py counted 5.99× the model for 2 chunks), plus the hooks' bookkeeping on every call.

`gathered_for_step(engine)` instead gathers every partitioned parameter in one coalesced all-gather, lets
DeepSpeed's module hooks step aside while the passes run, then gives them back and partitions what it gathered.
The hooks step aside by each module's hook dicts being swapped for copies without DeepSpeed's entries: nothing is
re-registered, DeepSpeed's trace and counters are left as they were, and hooks of anyone else still run. The
gradient reduction (each rank reduce-scatters into its partition) hangs on the parameters, not on the modules, so
it is untouched. Cost: the whole 16-bit model stays on every rank for the step, which is what the plain step holds
at its peak under the shipped budgets anyway; `gather_once_blocker` says when the config does not allow it.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

# Module attributes holding forward pre-hooks and forward hooks: where ZeRO-3 registers all of its module hooks
# (its backward fetch and release are Functions those forward hooks attach to the tensors).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def gather_once_blocker(engine) -> str | None:
    """Why the model may not stay gathered for a whole step under this engine's config; None when it may."""
    offload = engine.zero_offload_param()
    if offload is not None and offload.device != "none":
        return f"parameters are offloaded (offload_param.device = {offload.device})"
    numel = sum(p.ds_numel for p in engine.module.parameters())
    budget = engine.zero_max_live_parameters()
    if numel > budget:
        return f"the model's {numel:,} parameters exceed stage3_max_live_parameters = {budget:,}"
    return None


def _deepspeed_hook_ids(engine) -> set[int]:
    """The ids of the module hooks ZeRO-3 registered (DeepSpeedZeRoOffload keeps their handles)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    handles = [*getattr(offload, "forward_hooks", ()), *getattr(offload, "backward_hooks", ())]
    if offload is None or not handles or not hasattr(offload, "fwd_pre_hook"):
        raise RuntimeError("ZeRO-3 engine without DeepSpeedZeRoOffload's hook handles (optimizer.parameter_offload"
                           ".forward_hooks/backward_hooks/fwd_pre_hook): this DeepSpeed registers its hooks "
                           "differently; set grad_cache.gather=pass")
    return {h.id for h in (*handles, offload.fwd_pre_hook)}


@contextmanager
def gathered_for_step(engine) -> Iterator[None]:
    """Every parameter gathered once, DeepSpeed's module hooks out of the way, for the body; all as before after.

    A collective (the all-gather): every rank enters together, as every rank runs the same cached step.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ours = _deepspeed_hook_ids(engine)
    params = list(engine.module.parameters())
    inflight = [p.ds_id for p in params if p.ds_status == ZeroParamStatus.INFLIGHT]
    if inflight:  # a prefetch still running: nothing between steps leaves one (the optimizer step waits for all)
        raise RuntimeError(f"ZeRO-3 parameters {inflight[:5]} are still being gathered at the start of a step")
    # Sorted by ds_id: the coalesced all-gather must list the same parameters in the same order on every rank.
    gathered = sorted((p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE), key=lambda p: p.ds_id)
    stashed = []
    for module in engine.module.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr)
            if not ours.isdisjoint(hooks):
                stashed.append((module, attr, hooks))
                setattr(module, attr, OrderedDict((k, fn) for k, fn in hooks.items() if k not in ours))
    try:
        if gathered:  # the call DeepSpeed's own fetch makes: one flat buffer, one collective per process group
            gathered[0].all_gather_coalesced(gathered).wait()
        yield
    finally:
        for module, attr, hooks in stashed:
            setattr(module, attr, hooks)
        back = [p for p in gathered if p.ds_status == ZeroParamStatus.AVAILABLE]
        if back:
            back[0].partition(param_list=back)
