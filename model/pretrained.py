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
from safetensors import SafetensorError
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


class ModelFolderError(ValueError):
    """A consolidated folder that cannot be loaded: the message names the file and the cause, in one line."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFolderError(f"{path}: not readable JSON ({e})") from e


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:  # truncated, or not safetensors at all
        raise ModelFolderError(f"{path}: not a readable safetensors file ({e})") from e


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        if (folder / WEIGHTS_NAME).is_file():  # two conversions mixed in one folder: which one is meant?
            raise ModelFolderError(f"{folder} holds both {WEIGHTS_NAME} and {INDEX_NAME} (left by another "
                                   "conversion): convert into a fresh folder")
        index = _read_json(folder / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and Path(n).name == n
                                                       for n in weight_map.values()):
            raise ModelFolderError(f"{folder / INDEX_NAME}: no 'weight_map' of tensor names to file names in this folder")
        state = {}
        for name in sorted(set(weight_map.values())):
            state.update(_load_weights(folder / name))
        return state
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a consolidated model folder (no {WEIGHTS_NAME} or {INDEX_NAME})")
    return _load_weights(folder / WEIGHTS_NAME)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, ModelConfig]:
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a consolidated model folder (no {CONFIG_NAME})")
    data = _read_json(config_path)
    try:
        cfg = model_config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    try:
        model = CLIP(cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value the config checks let through
        raise ModelFolderError(f"{config_path}: not a model this code can build ({type(e).__name__}: {e})") from e
    state = {k: v.float() for k, v in load_state_dict(folder).items()}
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k} is {list(state[k].shape)} in the weights, {list(v.shape)} by {CONFIG_NAME}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ModelFolderError(f"{folder}: weights do not match {CONFIG_NAME} (" + "; ".join(
            wrong[:3] + [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected)) + ")")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg
