"""Pretrain CLIP / HiCLIP / PyramidCLIP with DeepSpeed.

    torchrun --nproc_per_node 2 -m recipes.pretrain --config recipes/configs/demo.yaml train.steps=200

Phases: config -> process group -> model + engine -> data -> resume -> loop (step, log, checkpoint) -> done.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time

import numpy as np
import torch

from data_pipeline.loader import build_train_loader
from data_pipeline.tokenizer import Tokenizer
from model.clip import CLIP
from recipes import checkpointing
from recipes.config import Config, load_config, to_dict
from recipes.engine import build_engine, deepspeed_config, init_distributed, model_init_context
from recipes.logger import RunLogger
from recipes.step import reduce_metrics, train_step

log = logging.getLogger("hiclip")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. recipes/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 checkpoint.resume=latest")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def endless(loader):
    """Epoch-mode loaders end; training continues into the next epoch."""
    while True:
        yield from loader


def train(cfg: Config) -> int:
    dist_info = init_distributed()
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    ds = deepspeed_config(cfg)
    with model_init_context(ds):
        model = CLIP(cfg.model)
    engine = build_engine(model, cfg, ds)
    seed_everything(cfg.train.seed + dist_info.rank)  # rank-distinct dropout / augmentation streams

    tokenizer = Tokenizer(cfg.model.text.context_length)
    loader = build_train_loader(
        cfg.data, tokenizer, image_size=cfg.model.vision.image_size, batch_size=cfg.train.batch_size,
        rank=dist_info.rank, world_size=dist_info.world_size, seed=cfg.train.seed, pyramid=cfg.loss.kind == "pyramid",
    )

    step = 0
    if cfg.checkpoint.resume:
        tag = checkpointing.resolve_tag(cfg.checkpoint.dir, cfg.checkpoint.resume)
        state = checkpointing.load(engine, cfg.checkpoint.dir, tag)
        loader.load_state_dict(state["data"])
        step = state["step"]
        if dist_info.is_main:
            log.info("resumed from %s/%s at step %d", cfg.checkpoint.dir, tag, step)

    end = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
    logger = RunLogger(cfg.logging.dir, enabled=dist_info.is_main, total_steps=end, start_step=step,
                       use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project, config=to_dict(cfg),
                       progress=cfg.logging.progress)
    batches = endless(loader)
    global_batch = cfg.train.batch_size * dist_info.world_size
    while step < end:
        t0 = time.perf_counter()
        batch = to_device(next(batches), dist_info.device)
        t_data = time.perf_counter() - t0
        metrics = train_step(engine, batch, cfg.loss, cfg.grad_cache)
        step += 1
        if step % cfg.logging.every_steps == 0 or step == end:
            elapsed = time.perf_counter() - t0
            logger.log(step, {**reduce_metrics(metrics), "lr": engine.get_lr()[0], "samples_per_s": global_batch / elapsed,
                              "data_wait": t_data / elapsed})
        logger.advance()
        if step % cfg.checkpoint.every_steps == 0 or step == end:
            checkpointing.save(engine, cfg.checkpoint.dir, step,
                               {"data": loader.state_dict(), "config": to_dict(cfg)}, cfg.checkpoint.keep_last)
    logger.close()
    return step


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
        sys.exit(f"error: {e}")  # bad input: one line naming the culprit, no traceback


if __name__ == "__main__":
    main()
