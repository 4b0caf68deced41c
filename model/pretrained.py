"""Consolidated model folders: `model.safetensors` (+ shards above a size), `config.json`, tokenizer files.

A folder written here rebuilds the model with nothing else: no DeepSpeed, no training config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from model.clip import CLIP
from model.config import ModelConfig, model_config_from_dict
from model.config_tree import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_pretrained(folder: str | Path, tensors: Mapping[str, Any], cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32, max_shard_bytes: int = 0) -> list[Path]:
    """Write weights (one file, or shards of at most max_shard_bytes plus an index) and the model config.

    `tensors` may hold lazy tensors (anything with .shape and .contiguous(), e.g. DeepSpeed's lazy ZeRO
    state): only one shard is materialised at a time, so peak memory follows the shard, not the model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(t.shape) * itemsize for name, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, filename in zip(shards, names):
        materialised = {k: tensors[k].contiguous().to(dtype) for k in shard}
        save_file(materialised, folder / filename, metadata={"format": "pt"})
        del materialised
    if len(shards) > 1:
        weight_map = {k: filename for shard, filename in zip(shards, names) for k in shard}
        (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}, indent=2))
    (folder / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return [folder / n for n in names]


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names in order into shards of at most max_bytes (a larger tensor gets a shard alone)."""
    if max_bytes <= 0:
        return [list(sizes)]
    shards, current, total = [], [], 0
    for name, nbytes in sizes.items():
        if current and total + nbytes > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += nbytes
    shards.append(current)
    return shards


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        state = {}
        for name in sorted(set(weight_map.values())):
            state.update(load_file(folder / name))
        return state
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a consolidated model folder (no {WEIGHTS_NAME} or {INDEX_NAME})")
    return load_file(folder / WEIGHTS_NAME)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, ModelConfig]:
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a consolidated model folder (no {CONFIG_NAME})")
    try:
        cfg = model_config_from_dict(json.loads(config_path.read_text()))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    model = CLIP(cfg)
    state = {k: v.float() for k, v in load_state_dict(folder).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), cfg
