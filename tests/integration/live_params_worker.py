"""Run under torchrun: train a few steps, checkpoint, and dump the live gathered parameters from rank 0."""
import sys

import deepspeed
import torch
import torch.distributed as dist

from recipes import checkpointing
from recipes.config import load_config, to_dict
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
from recipes.step import train_step


def main(out_dir: str, ds_config: str, attention: str) -> None:
    cfg = load_config("recipes/configs/demo.yaml", [f"train.ds_config={ds_config}", "train.batch_size=4",
                                                   "model.vision.layers=2", "model.text.layers=2",
                                                   "model.vision.region_split=-1",
                                                   f"model.vision.attention={attention}", f"model.text.attention={attention}"])
    info = init_distributed()
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    gen = torch.Generator().manual_seed(info.rank)
    for _ in range(3):
        tokens = torch.randint(1, 49000, (4, 77), generator=gen)
        tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 49406, 49407, 0
        batch = {"image": torch.randn(4, 3, 64, 64, generator=gen), "text": tokens}
        train_step(engine, batch, cfg.loss)
    checkpointing.save(engine, f"{out_dir}/ckpt", 3, {"data": {}, "config": to_dict(cfg)})
    live = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            live[name] = param.detach().clone()
    if info.rank == 0:
        torch.save(live, f"{out_dir}/live.pt")
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
