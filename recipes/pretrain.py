"""Pretrain CLIP / HiCLIP / PyramidCLIP with DeepSpeed.

    torchrun --nproc_per_node 2 -m recipes.pretrain --config recipes/configs/demo.yaml train.steps=200

Phases: config -> process group -> model + engine -> data -> resume -> loop (step, guard, log, checkpoint) -> done.
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
from model.flops import count_flops
from recipes import checkpointing, preemption, universal
from recipes.config import Config, load_config, to_dict
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
from recipes.evaluate import check_eval_sets, evaluate_live
from recipes.finite import DIVERGED_EXIT_CODE, Diverged
from recipes.guard import Guard
from recipes.level_check import warn_missing_levels
from recipes.logger import RunLogger
from recipes.metrics import StepMeter, peak_tflops, skip_metrics
from recipes.step import reduce_metrics, train_step

log = logging.getLogger("hiclip")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. recipes/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 checkpoint.resume=latest")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, ZeRO model-state memory and steps; build on meta, read no data")
    parser.add_argument("--world-size", type=int, default=32, help="--dry-run: GPUs in the job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--dry-run: GPUs per node")
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
    # The preemption handler goes in first (a signal before it would kill the rank) and before data workers fork.
    preempt = preemption.PreemptionFlag(cfg.checkpoint.preempt_signal, dist_info.device,
                                        cfg.checkpoint.preempt_check_every)
    resume = checkpointing.plan_resume(cfg.checkpoint.dir, cfg.checkpoint.resume, to_dict(cfg), dist_info.world_size)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    ds = deepspeed_config(cfg)
    if resume and resume.reshard:  # another world size: load through a universal checkpoint
        universal.enable(ds)
    engine = build_engine(cfg, ds, warm_start=resume is None)  # on resume the checkpoint wins over model.init_from
    if resume and cfg.model.init_from and dist_info.is_main:
        log.info("model.init_from %s ignored: resuming from %s", cfg.model.init_from, resume.tag)
    seed_everything(cfg.train.seed + dist_info.rank)  # rank-distinct dropout / augmentation streams

    tokenizer = Tokenizer(cfg.model.text.context_length)
    loader = build_train_loader(
        cfg.data, tokenizer, image_size=cfg.model.vision.image_size, batch_size=cfg.train.batch_size,
        rank=dist_info.rank, world_size=dist_info.world_size, pyramid=cfg.loss.kind == "pyramid",
        # per-rank data positions do not survive a world-size change: a fresh stream, seeded by the step
        seed=cfg.train.seed + (resume.step if resume and resume.reshard else 0),
    )

    if cfg.eval.every_steps:
        check_eval_sets(cfg.eval, cfg.data)
    step = 0
    guard = Guard(cfg.train.guard, rank=dist_info.rank, device=dist_info.device)
    if resume:
        state = checkpointing.load(engine, resume)
        if state["data"] is not None:  # None after a world-size change
            loader.load_state_dict(state["data"])
        guard.load_state_dict(state.get("guard"))
        step = state["step"]
        if dist_info.is_main:
            log.info("resumed from %s/%s at step %d", cfg.checkpoint.dir, resume.tag, step)

    end = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
    batches = warn_missing_levels(endless(loader), cfg.loss, enabled=dist_info.is_main)
    if resume:
        guard.skip_on_resume(batches)
    peak, peak_source = peak_tflops(dist_info.device, cfg.logging.peak_tflops,
                                    torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    meter = StepMeter(train_flops_per_sample=count_flops(cfg.model, pyramid=cfg.loss.kind == "pyramid").train,
                      global_batch=cfg.train.batch_size * dist_info.world_size, world_size=dist_info.world_size,
                      peak_tflops=peak, device=dist_info.device)
    if dist_info.is_main:
        log.info("MFU against %.3g TFLOP/s per device (%s)", peak, peak_source)
    # The logger (its files, the progress bar, the wandb run) is closed on every way out of the loop.
    with RunLogger(cfg.logging.dir, enabled=dist_info.is_main, total_steps=end, start_step=step,
                   use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project, config=to_dict(cfg),
                   progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard) as logger:
        stop = False
        while step < end and not stop:
            t0 = time.perf_counter()
            batch = to_device(next(batches), dist_info.device)
            meter.step(data_seconds=time.perf_counter() - t0)
            guard.begin(batch)
            metrics = train_step(engine, batch, cfg.loss, cfg.grad_cache, guard)
            applied, roll_back = guard.end(engine)  # every rank agrees on both
            if roll_back:  # reload `latest`; the data stream goes on past the bad window (recipes/guard.py)
                restart = guard.roll_back(engine, cfg.checkpoint.dir, to_dict(cfg), dist_info.world_size)
                logger.advance(restart - step)
                step = restart
            if not applied or roll_back:  # a skipped step advances neither `step` nor the LR schedule
                logger.show(guard.metrics())
                continue
            step += 1
            if step % cfg.logging.every_steps == 0 or step == end:
                logger.log(step, {**reduce_metrics(metrics), "lr": engine.get_lr()[0],
                                  "grad_norm": engine.get_global_grad_norm(), **guard.metrics(), **meter.read(),
                                  **skip_metrics(loader.skip_counts())})
            logger.advance()
            # Periodic zero-shot eval: every rank takes part (ZeRO-3 gathers parameters collectively).
            if cfg.eval.every_steps and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
                logger.log(step, evaluate_live(engine.module, tokenizer, cfg.eval, cfg.data, rank=dist_info.rank,
                                               world_size=dist_info.world_size, device=dist_info.device))
                meter.restart()  # eval time is not training throughput
            stop = preempt.agreed(step) and step < end  # collective: every rank stops after the same step
            if step % cfg.checkpoint.every_steps == 0 or step == end or stop:
                checkpointing.save(engine, cfg.checkpoint.dir, step,
                                   {"data": loader.state_dict(), "config": to_dict(cfg), "guard": guard.state_dict()},
                                   cfg.checkpoint.keep_last)
    leave_distributed()  # every rank is here, after the same step and checkpoint
    if stop:
        raise preemption.Preempted(step)
    return step


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        if args.dry_run:
            from recipes.dry_run import dry_run

            print(dry_run(load_config(args.config, args.overrides), args.world_size, args.gpus_per_node).table())
            return
        train(load_config(args.config, args.overrides))
    except preemption.Preempted as e:
        log.warning("%s", e)
        preemption.exit_for_requeue(e.step)  # launch_scripts/slurm.sbatch requeues the job
    except Diverged as e:  # not requeued: launch_scripts/slurm.sbatch requeues only the preemption code
        print(f"error: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
        sys.exit(f"error: {e}")  # bad input: one line naming the culprit, no traceback


if __name__ == "__main__":
    main()
