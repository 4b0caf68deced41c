"""`model.init_from` applied to a freshly built model, under any ZeRO stage, before the engine exists.

Under ZeRO-3 the model is already partitioned: module by module, its own parameters are gathered, rank 0
writes the source values (read one tensor at a time) and DeepSpeed re-partitions them from rank 0
(`GatheredParameters(modifier_rank=0)`). No rank ever holds more than one module's full parameters plus one
chunk of source rows beyond its own partition (bench/warm_start.py measures it). Without ZeRO-3 every rank holds the whole model anyway and reads the
same values itself. A resumed run never gets here: the checkpoint wins (recipes/pretrain.py).
"""
from __future__ import annotations

import logging
import math

import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.interop import Source, WarmStart, plan_warm_start

log = logging.getLogger("hiclip")


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def load_warm_start(model: nn.Module, cfg: ModelConfig) -> WarmStart:
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan = plan_warm_start({n: _shape(p) for n, p in model.named_parameters()},
                           Source(cfg.init_from, cfg.init_format), cfg.init_priors)
    if rank == 0:
        shapes = {n: _shape(p) for n, p in model.named_parameters()}
        log.info("%s", plan.table(lambda n: math.prod(shapes[n])))
    wanted = plan.targets()
    for prefix, module in model.named_modules():
        params = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        params = [(n, p) for n, p in params if n in wanted]
        if not params:
            continue
        zero3 = hasattr(params[0][1], "ds_id")
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    _assign(plan, params)
        else:
            _assign(plan, params)
    return plan


def _assign(plan: WarmStart, params: list[tuple[str, nn.Parameter]]) -> None:
    for name, p in params:
        plan.copy_into(name, p.data)
