"""Consolidate a ZeRO-2/3 checkpoint into a model folder: safetensors weights, config.json, tokenizer files.

    python -m recipes.convert --checkpoint runs/demo/checkpoints --out runs/demo/model [--tag step_200]

DeepSpeed's lazy mode keeps the fp32 partitions as they are on disk and materialises one output shard at a time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from model.config import model_config_from_dict
from model.pretrained import save_pretrained
from recipes.checkpointing import CheckpointError, resolve_tag

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def consolidate(ckpt_dir: str, out: str, tag: str = "latest", dtype: str = "fp32", max_shard_mb: int = 0) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(ckpt_dir, tag)
    client = Path(ckpt_dir, tag, "client_rank0.pt")
    if not client.is_file():
        raise CheckpointError(f"{client} is missing: not a hiclip checkpoint, or an incomplete one")
    run_config = torch.load(client, weights_only=False)["config"]
    model_cfg = model_config_from_dict(run_config["model"])
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag, lazy_mode=True)
    save_pretrained(out, state, model_cfg, dtype=DTYPES[dtype], max_shard_bytes=max_shard_mb * 2**20)
    Tokenizer(model_cfg.text.context_length).save(out)
    return Path(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (holds the tags and 'latest')")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--tag", default="latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-mb", type=int, default=0, help="split weights into shards of this size (0: one file)")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_mb)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
