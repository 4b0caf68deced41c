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
import os
import shutil
import sys
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from model.config import ModelConfig, model_config_from_dict
from model.interop import export_state, open_clip_config
from model.pretrained import save_pretrained
from recipes.checkpoint_layout import PARTIAL_SUFFIX, CheckpointError, read_client_state, resolve_tag

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def consolidate(ckpt_dir: str, out: str, tag: str = "latest", dtype: str = "fp32", max_shard_mb: int = 0) -> Path:
    """Write the model folder `out` from a verified tag. It is built beside `out` and swapped in whole, so no
    file of an earlier conversion (e.g. a stale shard index) survives, and a failed conversion leaves `out` as it was."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(ckpt_dir, tag, skip_damaged=False)
    run_config = read_client_state(Path(ckpt_dir), tag, 0)["config"]
    model_cfg = model_config_from_dict(run_config["model"])
    out = Path(out)
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag, lazy_mode=True)
    except Exception as e:  # DeepSpeed's own reading of its shards
        raise CheckpointError(f"DeepSpeed could not read checkpoint {Path(ckpt_dir, tag)}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
    save_pretrained(staging, state, model_cfg, dtype=DTYPES[dtype], max_shard_bytes=max_shard_mb * 2**20)
    Tokenizer(model_cfg.text.context_length).save(staging)
    replace_folder(staging, out)
    return out


def replace_folder(new: Path, old: Path) -> None:
    """Put folder `new` where `old` is. Two renames: at every moment `old` is either the previous folder whole
    or the new one whole (or, between the renames, absent), never a mix of both."""
    if not old.exists():
        os.replace(new, old)
        return
    retired = old.with_name(old.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(old, retired)
    os.replace(new, old)
    shutil.rmtree(retired, ignore_errors=True)


# ----------------------------------------------------------------------------------------- open_clip export

def to_open_clip(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A vanilla CLIP state dict in open_clip's layout (model/interop.py holds the key table)."""
    return export_state(state, cfg, "open_clip")


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


# ------------------------------------------------------------------------------------ Hugging Face export

def export_hf(model_folder: str | Path, out: str | Path, model_class: str = "auto") -> Path:
    """From a consolidated folder: a transformers folder with the tokenizer and the image processor, so
    `pipeline("zero-shot-image-classification", model=out)` runs offline.

    model_class `clip`: transformers' own `CLIPModel` (vanilla attention only; PyramidCLIP's region branch is
    left out, as in the open_clip export), loadable with no code of ours. `hiclip`: our model whole behind
    `model.hf.HiCLIPModel` (`import model.hf`, then `AutoModel.from_pretrained`). `auto`: clip where possible.
    Written without instantiating a model: the config through transformers, the weights renamed tensor by
    tensor into one safetensors file (peak memory: one copy of the weights).
    """
    from safetensors.torch import save_file

    from model.interop import check_exportable, hf_clip_config
    from model.pretrained import CONFIG_NAME, load_state_dict

    cfg = model_config_from_dict(json.loads(Path(model_folder, CONFIG_NAME).read_text()))
    if model_class == "auto":
        vanilla = cfg.vision.attention == cfg.text.attention == "vanilla" and cfg.text.causal
        model_class = "clip" if vanilla else "hiclip"
    if model_class == "clip":
        check_exportable(cfg, "transformers CLIPModel")
    state = {k: v.float() for k, v in load_state_dict(model_folder).items()}
    out = Path(out)
    if model_class == "clip":
        from transformers import CLIPConfig

        CLIPConfig(**hf_clip_config(cfg)).save_pretrained(out)
        weights = export_state(state, cfg, "hf")
    else:
        import dataclasses

        from model.hf import HiCLIPConfig

        HiCLIPConfig(model=dataclasses.asdict(cfg)).save_pretrained(out)
        weights = {f"model.{k}": v for k, v in state.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    Tokenizer(cfg.text.context_length).save_transformers(out)
    _image_processor(cfg.vision.image_size).save_pretrained(out)
    return out


def _image_processor(size: int):
    """Our eval preprocessing in transformers' terms: bicubic resize of the short side, centre crop, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    from data_pipeline.transforms import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (holds the tags and 'latest')")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--tag", default="latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-mb", type=int, default=0, help="split weights into shards of this size (0: one file)")
    p.add_argument("--open-clip", default="", help="also write an open_clip state dict here (vanilla CLIP only)")
    p.add_argument("--hf", default="", help="also write a Hugging Face transformers folder here (docs/interop.md)")
    p.add_argument("--hf-class", choices=("auto", "clip", "hiclip"), default="auto",
                   help="--hf: transformers' CLIPModel (vanilla only), our HiCLIPModel, or CLIPModel where possible")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_mb)
        if args.open_clip:
            print(f"wrote {export_open_clip(out, args.open_clip)}")
        if args.hf:
            print(f"wrote {export_hf(out, args.hf, args.hf_class)}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
