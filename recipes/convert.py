r"""Consolidate a ZeRO-2/3 checkpoint into a model folder: safetensors weights, config.json, tokenizer files.

    python -m recipes.convert --checkpoint runs/demo/checkpoints --out runs/demo/model [--tag step_200] \
        [--dtype bf16] [--max-shard-mb 2000] [--open-clip runs/demo/open_clip.pt]

DeepSpeed's lazy mode memory-maps the optimizer shard files (only the fp32 partitions are ever read, not the Adam
moments) and materialises one parameter at a time; save_pretrained writes one output shard at a time. Under
ZeRO-3 the private memory therefore follows the largest output shard; the mapped file pages it reads are page
cache the kernel can drop. Under ZeRO-2 DeepSpeed itself concatenates each rank's flat partition into one fp32
vector of the whole model (bench/consolidation_memory.py measures both).

`--open-clip` also writes the vanilla CLIP as an open_clip state dict, with `<name>.json` holding the matching
open_clip model config: `open_clip.model.CLIP(**json.load(f))` then `load_state_dict(torch.load(pt))`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from model.config import ModelConfig, model_config_from_dict
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


# ----------------------------------------------------------------------------------------- open_clip export

def open_clip_config(cfg: ModelConfig) -> dict:
    """The open_clip `CLIP(**config)` arguments of the same architecture (GELU, pre-LN, CLS and argmax pooling)."""
    v, t = cfg.vision, cfg.text
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
    }


def to_open_clip(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose the projections of) a vanilla CLIP state dict into open_clip's layout.
    PyramidCLIP's region branch has no open_clip counterpart and is left out."""
    if cfg.vision.attention != "vanilla" or cfg.text.attention != "vanilla" or not cfg.text.causal:
        raise ValueError("only the vanilla CLIP (vanilla attention in both towers, causal text) has an open_clip "
                         f"equivalent; this model has vision.attention={cfg.vision.attention!r}, "
                         f"text.attention={cfg.text.attention!r}, text.causal={cfg.text.causal}")
    block_names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
                   "attn.qkv.bias": "attn.in_proj_bias", "attn.out": "attn.out_proj", "mlp.fc": "mlp.c_fc",
                   "mlp.proj": "mlp.c_proj"}
    top_names = {"logit_scale": "logit_scale", "visual.cls_token": "visual.class_embedding",
                 "visual.pos_embed": "visual.positional_embedding", "visual.patch_embed.weight": "visual.conv1.weight",
                 "visual.ln_pre": "visual.ln_pre", "visual.ln_post": "visual.ln_post",
                 "text.token_embed.weight": "token_embedding.weight", "text.pos_embed": "positional_embedding",
                 "text.ln_final": "ln_final"}
    out = {}
    for name, tensor in state.items():
        tower, _, rest = name.partition(".")
        if name in ("visual.proj.weight", "text.proj.weight"):  # nn.Linear [out, in] -> open_clip's x @ P, [in, out]
            out["visual.proj" if tower == "visual" else "text_projection"] = tensor.t().contiguous()
        elif name == "logit_scale":
            out[name] = tensor.reshape(())  # shape [1] here (ZeRO cannot hold 0-d parameters), a scalar there
        elif rest.startswith("transformer.blocks."):
            index, _, leaf = rest.removeprefix("transformer.blocks.").partition(".")
            prefix = "visual.transformer" if tower == "visual" else "transformer"
            key = next(k for k in block_names if leaf.startswith(k))
            out[f"{prefix}.resblocks.{index}.{block_names[key]}{leaf.removeprefix(key)}"] = tensor
        elif name.startswith("visual.regions."):
            continue
        else:
            key = next((k for k in top_names if name == k or name.startswith(k + ".")), None)
            if key is None:
                raise ValueError(f"no open_clip counterpart for parameter {name!r}")
            out[top_names[key] + name.removeprefix(key)] = tensor
    return out


def export_open_clip(model_folder: str | Path, out: str | Path) -> Path:
    """From a consolidated folder: `<out>` (open_clip state dict, fp32) and `<out>.json` (its model config)."""
    from model.pretrained import CONFIG_NAME, load_state_dict

    cfg = model_config_from_dict(json.loads(Path(model_folder, CONFIG_NAME).read_text()))
    state = to_open_clip({k: v.float() for k, v in load_state_dict(model_folder).items()}, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    out.with_suffix(".json").write_text(json.dumps(open_clip_config(cfg), indent=2))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (holds the tags and 'latest')")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--tag", default="latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-mb", type=int, default=0, help="split weights into shards of this size (0: one file)")
    p.add_argument("--open-clip", default="", help="also write an open_clip state dict here (vanilla CLIP only)")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_mb)
        if args.open_clip:
            print(f"wrote {export_open_clip(out, args.open_clip)}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
