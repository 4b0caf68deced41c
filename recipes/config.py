"""The typed config tree, loaded from a YAML recipe plus dotted `a.b.c=value` overrides.

Each part is defined beside the code it configures; this file only assembles them and owns the loading rules:
unknown keys are errors naming the key and its nearest valid spelling, and `model.preset` starts the model from
a named size before the recipe's own model keys apply.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.config import DataConfig
from model.config import PRESETS, ModelConfig
from model.losses import LossConfig
from recipes.evaluate import EvalConfig
from recipes.grad_cache import GradCacheConfig


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps for the whole run (sets the LR schedule)
    stop_at: int = 0  # leave after this many steps (checkpointed), as if preempted; 0 runs to `steps`
    batch_size: int = 64  # per rank
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 0
    ds_config: str = "ds_configs/zero3.json"


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = 500
    keep_last: int = 3
    resume: str = ""  # "" starts fresh; "latest" or a tag resumes from `dir`; "auto": latest if any, else fresh
    preempt_signal: str = "SIGUSR1"  # on it: checkpoint at a step all ranks agree on, exit 75 (requeue); "" ignores
    # Steps between the ranks' all-reduce of the flag: it syncs host and device, so not every step; with the
    # signal 120 s before the limit, 10 steps are plenty.
    preempt_check_every: int = 10


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    every_steps: int = 10
    wandb: bool = True  # offline unless WANDB_API_KEY is set; WANDB_MODE overrides
    wandb_project: str = "hiclip"
    tensorboard: bool = False  # also write TensorBoard events under `dir` (needs the tensorboard package)
    progress: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look the device up (recipes/metrics.py)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form a.b.c=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return _build(Config, raw, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    tree[leaf] = value


def _build(cls, raw: dict, prefix: str, base=None):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    raw = dict(raw)
    if cls is ModelConfig and "preset" in raw:
        name = raw.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}{_suggest(str(name), PRESETS)}")
        base = copy.deepcopy(PRESETS[name])
    obj = base if base is not None else cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key!r}{_suggest(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{key}.", base=getattr(obj, key))
        else:
            value = _coerce(value, hint, f"{prefix}{key}")
        setattr(obj, key, value)
    return obj


def _coerce(value, hint, name: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return value  # optional / union fields take the YAML value as written
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = (typing.get_args(hint) or (None,))[0]
        if dataclasses.is_dataclass(item):  # e.g. a list of data sources
            return origin(_build(item, v, f"{name}[{i}].") for i, v in enumerate(value))
        return origin(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
