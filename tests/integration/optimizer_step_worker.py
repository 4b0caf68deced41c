"""Run under torchrun: two training steps through the DeepSpeed engine (a shipped ZeRO config, clipping on, the
recipe's fused AdamW and decay groups) against the same two steps in plain torch on one process (the whole
global batch, global-norm clipping as torch's clip_grad_norm_ computes it but in fp64, the reference single-tensor
AdamW). Rank 0 writes one JSON object.

    torchrun --nproc_per_node 2 tests/integration/optimizer_step_worker.py OUT_FILE DS_CONFIG

The reference is taken twice: once as it should be, and once with the clipping norm 10% off, so the test can
show that the comparison notices a wrong norm (Adam is nearly scale-invariant; eps is raised to make it see
the clipping factor).
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from model.clip import CLIP
from model.losses import compute_loss
from recipes.config import load_config
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed, zero_stage
from recipes.optim import cosine_with_warmup, param_groups
from recipes.step import split_levels, train_step
from tests.unit.test_pyramid_model import pyramid_batch, small_config

LOCAL_BATCH, STEPS = 4, 2
LR, EPS, CLIP_NORM, WEIGHT_DECAY = 1e-3, 1e-3, 0.05, 0.1


def reference(cfg, init: dict[str, torch.Tensor], batches: list[dict], norm_error: float = 1.0):
    """Plain torch: returns (final parameters, the fp64 global gradient norm of each step)."""
    model = CLIP(cfg.model)
    model.load_state_dict(init)
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=tuple(t.betas), eps=EPS,
                                  foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, t.warmup_steps, t.steps))
    norms = []
    for batch in batches:
        out = model(batch)
        loss, _ = compute_loss(cfg.loss, *split_levels(out), out["logit_scale"], gather=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])).item()
        norms.append(norm)
        scale = min(1.0, CLIP_NORM / (norm * norm_error + 1e-6))
        for g in grads:
            g.mul_(scale)
        optimizer.step()
        schedule.step()
    return {k: p.detach() for k, p in model.named_parameters()}, norms


def main(out_file: str, ds_name: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    cfg = load_config(None, [f"train.ds_config=ds_configs/{ds_name}.json", f"train.batch_size={LOCAL_BATCH}",
                             f"train.lr={LR}", f"train.eps={EPS}", f"train.grad_clip={CLIP_NORM}",
                             f"train.weight_decay={WEIGHT_DECAY}", "train.precision=fp32", "train.warmup_steps=2",
                             "train.steps=10", "loss.kind=clip"])
    cfg.model = small_config("vanilla")
    ds = deepspeed_config(cfg)
    if zero_stage(ds) == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    torch.manual_seed(0)
    engine = build_engine(cfg, ds)
    # A collective under ZeRO-3: every rank walks the parameters in one order.
    init = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}

    world = dist.get_world_size()
    global_batches, engine_norms = [], []
    for step in range(STEPS):
        shards = [pyramid_batch(LOCAL_BATCH, seed=10 * step + r) for r in range(world)]
        shards = [{k: s[k] for k in ("image", "text")} for s in shards]
        global_batches.append({k: torch.cat([s[k] for s in shards]) for k in shards[0]})
        train_step(engine, shards[info.rank], cfg.loss)
        engine_norms.append(float(engine.get_global_grad_norm()))
    got = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}

    if info.rank == 0:
        want, ref_norms = reference(cfg, init, global_batches)
        wrong, _ = reference(cfg, init, global_batches, norm_error=1.1)
        update = max((want[k] - init[k]).abs().max().item() for k in want)

        def max_diff(params):
            return max((got[k] - params[k]).abs().max().item() for k in got)

        result = {"ds_config": ds_name, "world": world, "engine_norms": engine_norms, "reference_norms": ref_norms,
                  "max_update": update, "max_diff": max_diff(want), "max_diff_wrong_norm": max_diff(wrong),
                  "params": len(got)}
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    deepspeed.utils.logger.setLevel("WARNING")
    main(sys.argv[1], sys.argv[2])
