"""Resume a ZeRO checkpoint on another number of ranks (universal checkpoint): ZeRO-3 2 -> 1 and 1 -> 2 ranks, and
ZeRO-2 2 -> 1, continue the uninterrupted run's loss curve within 1e-4.

The worker (this file run under torchrun) feeds the same global batch of 8 at every step whatever the world
size (each rank takes its slice) and has no dropout, so runs at different world sizes train the same model.
"""
import argparse
import json
import sys

import pytest

from tests.integration.launch import torchrun

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 8


def run(nproc: int, out, ckpt_out, steps: int, resume_dir=None, tag: str = "",
        ds_config: str = "ds_configs/zero3.json") -> list[float]:
    args = ["tests/integration/test_world_size_change.py", "--out", str(out), "--ckpt-out", str(ckpt_out),
            "--steps", str(steps), "--ds-config", ds_config]
    if resume_dir:
        args += ["--resume-dir", str(resume_dir), "--tag", tag]
    torchrun(nproc, args)
    return json.loads(out.read_text())


def test_resume_on_other_world_sizes(tmp_path):
    # 2 ranks from scratch: steps 1-6, checkpoints after every step.
    two = run(2, tmp_path / "two.json", tmp_path / "ckpt2", steps=6)
    # 2 -> 1: resume the 2-rank step_3 on 1 rank.
    one = run(1, tmp_path / "one.json", tmp_path / "ckpt1", steps=6, resume_dir=tmp_path / "ckpt2", tag="step_3")
    assert sorted(one) == ["4", "5", "6"]
    for step in ("4", "5", "6"):
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    assert (tmp_path / "ckpt2/step_3/universal/zero").is_dir()  # converted on the fly, kept beside the shards
    # 1 -> 2: resume the 1-rank run's step_4 on 2 ranks; its own steps 5-6 are the uninterrupted reference.
    back = run(2, tmp_path / "back.json", tmp_path / "ckpt2b", steps=6, resume_dir=tmp_path / "ckpt1", tag="step_4")
    assert sorted(back) == ["5", "6"]
    for step in ("5", "6"):
        assert abs(back[step] - one[step]) < 1e-4, (step, back[step], one[step])


def test_zero2_resume_on_fewer_ranks(tmp_path):
    # ZeRO-2 shards hold flat optimizer-state slices too: the same universal path reads them back on 1 rank.
    zero2 = "ds_configs/zero2.json"
    two = run(2, tmp_path / "two.json", tmp_path / "ckpt2", steps=4, ds_config=zero2)
    one = run(1, tmp_path / "one.json", tmp_path / "ckpt1", steps=4, resume_dir=tmp_path / "ckpt2", tag="step_2",
              ds_config=zero2)
    assert sorted(one) == ["3", "4"]
    for step in ("3", "4"):
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


# ------------------------------------------------------------------------------------------- worker (torchrun)

def worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from recipes import checkpointing, universal
    from recipes.config import load_config, to_dict
    from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
    from recipes.step import reduce_metrics, train_step

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume-dir", default="")
    p.add_argument("--tag", default="")
    p.add_argument("--ds-config", required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = load_config("recipes/configs/demo.yaml", [
        f"train.batch_size={GLOBAL_BATCH // info.world_size}", f"train.steps={args.steps}", "train.warmup_steps=2",
        "model.dropout=0.0", "model.vision.layers=1", "model.text.layers=1", "model.vision.region_split=-1",
        "model.vision.image_size=32", "model.vision.patch_size=8", f"train.ds_config={args.ds_config}"])
    plan = None
    if args.resume_dir:
        plan = checkpointing.plan_resume(args.resume_dir, args.tag, to_dict(cfg), info.world_size)
        assert plan.reshard, "this test is about a world-size change"
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    if plan:
        universal.enable(ds)
    engine = build_engine(cfg, ds)
    step = checkpointing.load(engine, plan)["step"] if plan else 0

    losses = {}
    while step < args.steps:
        gen = torch.Generator().manual_seed(1000 + step)  # the global batch depends on the step alone
        tokens = torch.randint(1, 49000, (GLOBAL_BATCH, 77), generator=gen)
        tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 49406, 49407, 0
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen)
        rows = slice(info.rank * cfg.train.batch_size, (info.rank + 1) * cfg.train.batch_size)
        metrics = train_step(engine, {"image": images[rows], "text": tokens[rows]}, cfg.loss)
        step += 1
        losses[str(step)] = reduce_metrics(metrics)["loss"]
        checkpointing.save(engine, args.ckpt_out, step, {"data": None, "config": to_dict(cfg)})
    if info.rank == 0:
        with open(args.out, "w") as f:
            json.dump(losses, f)
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    worker(sys.argv[1:])
