"""Run under torchrun: for each case, the gradient-cached step and a plain full-batch step through the same
DeepSpeed engine, and the relative error between their full parameter gradients. Rank 0 writes one JSON line per
case to OUT_FILE.

    torchrun --nproc_per_node 2 tests/integration/grad_cache_worker.py OUT_FILE CASES_JSON

A case: {"name", "stage": 2|3, "loss": clip|pyramid, "attention": vanilla|hier, "region_source", "dropout", "reduction",
"missing_on_rank1": bool (rank 1's samples have no regions and no summaries), "replay_rng": bool, optional
"patch_dropout", "gather" (grad_cache.gather) and "fail_first" (a cached step whose loss raises runs first)}.
Also counted: the parameter all-gathers of the cached step, and whether every module's hooks are the same after
it as before.
"""
import json
import sys
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from unittest import mock

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from bench.zero_memory import counting_gathers
from model.losses import LossConfig, compute_loss
from recipes import grad_cache
from recipes.config import load_config
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
from recipes.grad_cache import GradCacheConfig, cached_backward, split_batch
from recipes.step import split_levels
from tests.unit.test_pyramid_model import pyramid_batch, small_config

BATCH, CHUNK = 6, 4  # per rank: two chunks of unequal size


def build(case: dict, info):
    cfg = load_config(None, [f"train.ds_config=ds_configs/zero{case['stage']}.json", f"train.batch_size={BATCH}",
                             "train.lr=0.0", "train.grad_clip=0.0", "train.precision=fp32", "train.warmup_steps=1"])
    cfg.model = small_config(case["attention"], region_source=case["region_source"], dropout=case["dropout"])
    cfg.model.vision.patch_dropout = case.get("patch_dropout", 0.0)
    ds = deepspeed_config(cfg)
    # Partition every parameter under ZeRO-3, however small (the recipe's threshold keeps tiny ones whole).
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    torch.manual_seed(0)
    return build_engine(cfg, ds)  # lr = 0: engine.step() clears gradients and leaves weights alone


def make_batch(case: dict, rank: int) -> dict:
    batch = pyramid_batch(BATCH, seed=rank + 1)
    if case["missing_on_rank1"] and rank == 1:
        batch["boxes_mask"] = torch.zeros_like(batch["boxes_mask"])
        batch["summary_mask"] = torch.zeros_like(batch["summary_mask"])
    if case["loss"] == "clip":
        batch = {k: batch[k] for k in ("image", "text")}
    return batch


@contextmanager
def count_reductions(counter: list[int]):
    """Count the engine's gradient-reduction collectives (the loss's own gathers go through torch.distributed)."""
    names = [n for n in dir(deepspeed.comm) if "reduce" in n and callable(getattr(deepspeed.comm, n))]

    def counted(fn):
        def wrapper(*args, **kwargs):
            counter[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    with ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(deepspeed.comm, name, counted(getattr(deepspeed.comm, name))))
        yield


def full_grads(engine) -> dict[str, torch.Tensor]:
    # A collective under ZeRO-3 (the partitions are gathered): every rank walks the parameters in one order.
    return {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}


def reference_backward(engine, batch: dict, loss_fn, full_batch: bool) -> torch.Tensor:
    """The plain step: one autograd graph over the whole local batch, one backward of the global loss.

    full_batch: one forward of the whole batch, exactly recipes/step.py's plain path. Otherwise (dropout on) the
    forward visits the batch in the cache's chunks so that dropout draws the same masks in the same order: the
    model's randomness is consumed per call, and the comparison is about gradients, not RNG bookkeeping.
    """
    outs = [engine(chunk) for chunk in split_batch(batch, BATCH if full_batch else CHUNK)]
    out = {k: outs[0][k] if k == "logit_scale" else torch.cat([o[k] for o in outs]) for k in outs[0]}
    loss, _ = loss_fn(out)
    engine.backward(loss * dist.get_world_size())
    return loss.detach()


def module_hooks(engine) -> list:
    """Every module's forward pre-hooks and forward hooks (ZeRO-3 registers all of its module hooks there)."""
    return [(name, list(m._forward_pre_hooks.items()), list(m._forward_hooks.items()))
            for name, m in engine.module.named_modules()]


class Planted(RuntimeError):
    pass


def planted_failure(out):
    raise Planted("a loss that fails after the no-grad passes")


def all_partitioned(engine) -> bool:
    """Under ZeRO-3, no parameter left gathered (the worker partitions every one: persistence threshold 0)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(getattr(p, "ds_status", ZeroParamStatus.NOT_AVAILABLE) == ZeroParamStatus.NOT_AVAILABLE
               for p in engine.module.parameters())


def run_case(case: dict, info) -> dict:
    engine = build(case, info)
    loss_cfg = LossConfig(kind=case["loss"])
    batch = make_batch(case, info.rank)

    def loss_fn(out):
        image, text, masks = split_levels(out)
        return compute_loss(loss_cfg, image, text, masks, out["logit_scale"], gather=True)

    torch.manual_seed(100 + info.rank)
    ref_reductions, reductions = [0], [0]
    with count_reductions(ref_reductions):
        ref_loss = reference_backward(engine, batch, loss_fn, full_batch=case["dropout"] == 0)
    ref = full_grads(engine)
    engine.step()

    hooks_before = module_hooks(engine)
    cfg = GradCacheConfig(CHUNK, case["reduction"], case.get("gather", "auto"))
    recovered = None
    if case.get("fail_first"):  # a step that dies between its passes leaves the engine as it found it
        with suppress(Planted):
            cached_backward(engine, batch, planted_failure, cfg)
        recovered = module_hooks(engine) == hooks_before and all_partitioned(engine)

    torch.manual_seed(100 + info.rank)
    # The negative control: without the RNG replay the chunks' dropout masks differ between the two passes.
    no_replay = mock.patch.object(grad_cache, "_set_rng_state", lambda state: None)
    replay = nullcontext() if case["replay_rng"] else no_replay
    with replay, count_reductions(reductions), counting_gathers() as gathers:
        loss, metrics = cached_backward(engine, batch, loss_fn, cfg)
    hooks_restored = module_hooks(engine) == hooks_before
    got = full_grads(engine)
    engine.step()

    rel = {name: ((got[name] - g).norm() / g.norm().clamp(min=1e-30)).item() for name, g in ref.items()}
    worst = max(rel, key=rel.get)
    return {
        **case, "max_rel_err": rel[worst], "worst_param": worst,
        "loss_diff": abs(loss.item() - ref_loss.item()),
        "reductions": reductions[0], "reductions_plain": ref_reductions[0],
        "gathers": gathers["calls"], "hooks_restored": hooks_restored, "recovered": recovered,
        "grad_norm": torch.stack([g.norm() for g in ref.values()]).norm().item(),
        "region_grad_norm": sum(g.norm().item() for n, g in ref.items() if n.startswith("visual.regions.")),
        "logit_scale_grad": ref["logit_scale"].item(),
        "pairs_region_summary": float(metrics.get("pairs/region_summary", -1)),
    }


def run_cases(run_case, out_file: str, cases_json: str) -> None:
    """The multi-case worker's main: every rank runs each case, rank 0 writes one JSON line per case."""
    torch.set_num_threads(1)
    info = init_distributed()
    results = [run_case(case, info) for case in json.loads(cases_json)]
    if info.rank == 0:
        with open(out_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    dist.barrier()
    leave_distributed()


def main(out_file: str, cases_json: str) -> None:
    run_cases(run_case, out_file, cases_json)


if __name__ == "__main__":
    deepspeed.utils.logger.setLevel("WARNING")
    main(sys.argv[1], sys.argv[2])
