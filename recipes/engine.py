"""DeepSpeed set-up: process group, the engine (model + optimizer + LR schedule), and the ZeRO-3 build context.

The only file that turns our config into a DeepSpeed config; the JSON in ds_configs/ holds the strategy
(ZeRO stage, offload, buckets) and this file fills in what the recipe owns (batch, precision, clipping).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from model.clip import CLIP
from recipes import ds_patches, host_memory
from recipes.config import Config, ConfigError
from recipes.grad_cache import check_gather
from recipes.optim import build_optimizer, group_table
from recipes.warm_start import load_warm_start

log = logging.getLogger("hiclip")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group: NCCL on GPUs, gloo on CPU. A plain `python` launch becomes a world of one."""
    import deepspeed

    # DeepSpeed 0.19 calls torch collectives that torch 2.14 renamed: one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ds_patches.no_shm_comm()
        host_memory.keep_freed_memory()  # the CPU's stand-in for CUDA's caching allocator
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def leave_distributed() -> None:
    """Leave the process group: at the end of a run that reached it on every rank, after the last collective.

    Left to interpreter exit, gloo's worker threads can be torn down mid-finalisation and abort the process
    (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489), which a launcher reads as a
    failed run. Not on an error's way out: tearing a group down while another rank is still inside a collective
    can hang (NCCL)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def deepspeed_config(cfg: Config) -> dict:
    path = cfg.train.ds_config
    if not os.path.isfile(path):
        raise ConfigError(f"train.ds_config: DeepSpeed config not found: {path}")
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"train.ds_config: {path} is not readable JSON ({e})") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.train.grad_clip
    # check_grad_overflow: a non-finite gradient norm skips the update in bf16 too (recipes/guard.py relies on it)
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True}
    return ds


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def model_init_context(ds: dict):
    """Under ZeRO-3, build the model already partitioned so no rank ever holds all of it."""
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3)


def build_engine(cfg: Config, ds: dict, warm_start: bool = True):
    """The model (built partitioned under ZeRO-3, then warm-started from `model.init_from` unless resuming),
    AdamW over recipes/optim.py's groups and schedule, wrapped in a DeepSpeed engine. Seed the RNG first: it
    sets the initial weights of whatever the warm start does not load."""
    import deepspeed

    ds_patches.fp32_grad_norms()
    ds_patches.backward_hooks_where_grad_flows()
    with model_init_context(ds):
        model = CLIP(cfg.model)
    if warm_start and cfg.model.init_from:
        # Before deepspeed.initialize: the engine's fp32 master partitions are copied from these values.
        load_warm_start(model, cfg.model)
    optimizer, schedule = build_optimizer(model, cfg.train)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("parameter groups:\n%s", group_table(model, optimizer.param_groups))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds)
    if cfg.grad_cache.chunk_size:
        blocker = check_gather(engine, cfg.grad_cache.gather)
        if blocker is not None:
            log.info("grad_cache.gather=auto: ZeRO-3 gathers parameters per pass, as %s", blocker)
    return engine
