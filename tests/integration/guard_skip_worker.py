"""Run under torchrun: does a step the divergence guard skips leave the training state bit-identical?

For each case (a shipped ZeRO config x precision x plain or gradient-cached step), on 2 gloo ranks: one clean
step, then a step whose gradient is poisoned on rank 1 only (DeepSpeed's norm check must skip it on both ranks)
and a step whose loss is NaN on rank 0 only (the guard's loss all-reduce must stop it before the backward);
every tensor of the optimizer (fp32 masters, Adam moments and step counts), this rank's parameter partition and
the LR schedule are compared bit for bit with the state before. Then a clean step must change the state, to exactly
what an engine trained on the clean batches alone holds. A negative control turns DeepSpeed's bf16 overflow
check off. Last, for the first case, a parameter partition made NaN on rank 1 must make
`checkpointing.save` raise on both ranks and leave `latest` at the earlier, finite tag.
Rank 0 writes one JSON object.

    torchrun --nproc_per_node 2 tests/integration/guard_skip_worker.py OUT_FILE
"""
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from recipes import checkpointing, finite, guard
from recipes.config import load_config, to_dict
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
from recipes.step import train_step
from tests.unit.test_pyramid_model import pyramid_batch, small_config

CASES = [
    dict(name="zero3-bf16", ds="zero3", precision="bf16", chunk=0),
    dict(name="zero2-bf16", ds="zero2", precision="bf16", chunk=0),
    dict(name="zero2_offload-fp32", ds="zero2_offload", precision="fp32", chunk=0),
    dict(name="zero3-fp32-grad-cache", ds="zero3", precision="fp32", chunk=2),
    # Negative control: bf16 without DeepSpeed's overflow check applies the NaN update (recipes/engine.py sets it).
    dict(name="zero2-bf16-no-overflow-check", ds="zero2", precision="bf16", chunk=0, overflow_check=False),
]


def snapshot(engine) -> list[torch.Tensor]:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = [v.detach().clone() for s in base.state.values() for v in s.values() if torch.is_tensor(v)]
    lrs = torch.tensor([g["lr"] for g in base.param_groups] + [engine.lr_scheduler.last_epoch], dtype=torch.float64)
    return [t.detach().clone() for t in finite.local_state(engine)] + state + [lrs]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))  # NaN != NaN: a NaN fails too


def run_case(case: dict, info, tmp: Path) -> dict:
    cfg = load_config(None, [f"train.ds_config=ds_configs/{case['ds']}.json", f"train.precision={case['precision']}",
                             "train.batch_size=4", "train.warmup_steps=2", "train.steps=10", "loss.kind=clip",
                             f"grad_cache.chunk_size={case['chunk']}"])
    cfg.model = small_config("vanilla")
    ds = deepspeed_config(cfg)
    ds["bf16"]["check_grad_overflow"] = case.get("overflow_check", True)
    data = [{k: v for k, v in pyramid_batch(4, seed=10 * i + info.rank).items() if k in ("image", "text")}
            for i in range(4)]

    def build():
        torch.manual_seed(0)
        return build_engine(cfg, ds), guard.Guard(cfg.train.guard, rank=info.rank, device=info.device)

    def step(engine, g, batch, faults: str = "") -> bool:
        g.faults = guard.parse_faults(faults)
        g.begin(batch)
        train_step(engine, batch, cfg.loss, cfg.grad_cache, g)
        return g.end(engine)[0]

    # The same intent without the poisoned batches: a fresh engine trained on batches 0 and 3 only.
    engine, g = build()
    step(engine, g, data[0])
    step(engine, g, data[3])
    independent = snapshot(engine)
    del engine, g

    engine, g = build()
    batches = iter(data)
    applied = [step(engine, g, next(batches))]
    before = snapshot(engine)
    applied.append(step(engine, g, next(batches), f"nan_grad@{g.iteration + 1}@1"))
    after_grad = snapshot(engine)
    applied.append(step(engine, g, next(batches), f"nan_loss@{g.iteration + 1}@0"))
    after_loss = snapshot(engine)
    applied.append(step(engine, g, next(batches)))
    after_clean = snapshot(engine)

    out = {"name": case["name"], "applied": applied, "skipped": g.skipped, "tensors": len(before),
           "grad_skip_identical": identical(before, after_grad), "loss_skip_identical": identical(before, after_loss),
           "clean_step_changes": not identical(before, after_clean),
           "equals_run_without_poisoned_batches": identical(after_clean, independent),
           "finite_after": finite.state_is_finite(engine)}
    if case is CASES[0]:
        ckpt = str(tmp / "ckpt")
        checkpointing.save(engine, ckpt, 4, {"config": to_dict(cfg)})
        if info.rank == 1:
            next(t for t in finite.local_state(engine) if t.numel()).data.view(-1)[0] = float("nan")
        try:
            checkpointing.save(engine, ckpt, 5, {"config": to_dict(cfg)})
            out["poisoned_save"] = "saved"
        except finite.Diverged as e:
            out["poisoned_save"] = str(e)
        out["latest"] = (Path(ckpt) / "latest").read_text()
        out["tags"] = sorted(p.name for p in Path(ckpt).iterdir())
    return out


def main(out_file: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    tmp = Path(os.path.dirname(os.path.abspath(out_file)))
    results = [run_case(case, info, tmp) for case in CASES]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if info.rank == 0:
        Path(out_file).write_text(json.dumps(gathered))
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    deepspeed.utils.logger.setLevel("WARNING")
    main(sys.argv[1])
