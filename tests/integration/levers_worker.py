"""Run under torchrun: for each case, one training step's full parameter gradients with activation checkpointing
and without it, through two DeepSpeed engines holding the same weights; rank 0 writes one JSON line per case.

    torchrun --nproc_per_node 2 tests/integration/levers_worker.py OUT_FILE CASES_JSON

A case: {"name", "stage": 2|3, "checkpointing": blocks|every_k, "patch_dropout", "grad_cache": bool}. The model is
HiCLIP x PyramidCLIP (hier attention in both towers, regions by ROI-align), fp32, dropout 0.1; set-up as in
tests/integration/grad_cache_worker.py.
"""
import dataclasses
import sys

import deepspeed
import torch
import torch.distributed as dist

from bench.zero_memory import counting_gathers
from model import transformer
from model.losses import LossConfig, compute_loss
from recipes.config import load_config
from recipes.engine import build_engine, deepspeed_config
from recipes.grad_cache import GradCacheConfig, cached_backward
from recipes.step import split_levels
from tests.integration.grad_cache_worker import BATCH, CHUNK, full_grads, make_batch, run_cases
from tests.unit.test_pyramid_model import small_config


def build(case: dict, checkpointing: str):
    cfg = load_config(None, [f"train.ds_config=ds_configs/zero{case['stage']}.json", f"train.batch_size={BATCH}",
                             "train.lr=0.0", "train.grad_clip=0.0", "train.precision=fp32", "train.warmup_steps=1"])
    model = small_config("hier", dropout=0.1)
    model.vision = dataclasses.replace(model.vision, layers=4, checkpointing=checkpointing, checkpoint_every=2,
                                       patch_dropout=case["patch_dropout"])
    model.text = dataclasses.replace(model.text, checkpointing=checkpointing, checkpoint_every=2)
    cfg.model = model
    ds = deepspeed_config(cfg)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter under ZeRO-3
    torch.manual_seed(0)
    return build_engine(cfg, ds)  # lr = 0: engine.step() clears gradients and leaves weights alone


def count_recomputations(counter: list[int]):
    """Wrap the towers' checkpoint so the worker can see it ran (it does nothing without autograd)."""
    original = transformer._checkpoint

    def counted(fn, *args, **kwargs):
        def recompute_counted(*a, **k):
            counter[0] += 1
            return fn(*a, **k)
        return original(recompute_counted, *args, **kwargs)

    transformer._checkpoint = counted


def one_step(engine, batch: dict, case: dict, seed: int) -> tuple[dict, float, int]:
    """(full gradients, loss, parameter all-gather calls) of one step; the dropout stream starts at `seed`."""
    loss_cfg = LossConfig(kind="pyramid")

    def loss_fn(out):
        image, text, masks = split_levels(out)
        return compute_loss(loss_cfg, image, text, masks, out["logit_scale"], gather=True)

    torch.manual_seed(seed)
    with counting_gathers() as gathers:
        if case["grad_cache"]:
            loss, _ = cached_backward(engine, batch, loss_fn, GradCacheConfig(CHUNK))
        else:
            loss, _ = loss_fn(engine(batch))
            engine.backward(loss * dist.get_world_size())
    grads = full_grads(engine)
    engine.step()
    return grads, loss.item(), gathers["calls"]


def run_case(case: dict, info) -> dict:
    rank = info.rank
    batch = make_batch({"missing_on_rank1": False, "loss": "pyramid"}, rank)
    results, block_runs = {}, [0]
    count_recomputations(block_runs)
    for mode in ("none", case["checkpointing"]):
        engine = build(case, mode)
        one_step(engine, batch, case, seed=50 + rank)  # step 1 records ZeRO-3's module trace
        block_runs[0] = 0
        results[mode] = one_step(engine, batch, case, seed=100 + rank)
        results[f"{mode}-checkpointed-block-runs"] = block_runs[0]  # forward + recomputation
        results[f"{mode}-other-seed"] = one_step(engine, batch, case, seed=200 + rank)[0]
        del engine
    (ref, ref_loss, ref_gathers), (got, loss, gathers) = results["none"], results[case["checkpointing"]]
    rel = {name: ((got[name] - g).norm() / g.norm().clamp(min=1e-30)).item() for name, g in ref.items()}
    other = results["none-other-seed"]
    worst = max(rel, key=rel.get)
    return {**case, "max_rel_err": rel[worst], "worst_param": worst, "loss_diff": abs(loss - ref_loss),
            "gathers_none": ref_gathers, "gathers_checkpointed": gathers,
            "checkpointed_block_runs": results[f"{case['checkpointing']}-checkpointed-block-runs"],
            "checkpointed_block_runs_none": results["none-checkpointed-block-runs"],
            "zero_grads": [n for n, g in ref.items() if g.norm() == 0],
            "other_seed_rel_err": max(((other[n] - g).norm() / g.norm()).item() for n, g in ref.items())}


if __name__ == "__main__":
    deepspeed.utils.logger.setLevel("WARNING")
    run_cases(run_case, sys.argv[1], sys.argv[2])
