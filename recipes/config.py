"""The typed config tree, loaded from a YAML recipe plus dotted `a.b.c=value` overrides.

Each part is defined beside the code it configures, with its own checks in `__post_init__`; this file only
assembles them and owns the loading rules (the building itself is model/config_tree.py, shared with
consolidated folders):
- a recipe may start from another with `base: other.yaml` (a path relative to the recipe) and say only what it
  changes; mappings merge key by key, anything else (a list included) replaces;
- `model.preset` starts the model from a named size before the recipe's own model keys apply;
- an override names one key once (a repeated key is an error: the shell's brace expansion makes them);
- numbers in scientific notation are floats, as in YAML 1.2 (`lr: 1e-3`; PyYAML alone reads a string).
"""
from __future__ import annotations

import dataclasses
import re
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from data_pipeline.config import DataConfig
from model.config import PRESETS, ModelConfig
from model.config_tree import ConfigError, build, require, suggest
from model.losses import LossConfig
from recipes.evaluate import EvalConfig
from recipes.grad_cache import GradCacheConfig
from recipes.guard import GuardConfig
from recipes.optim import LockConfig, TowerLRConfig

__all__ = ["Config", "ConfigError", "load_config", "to_dict"]

# Signals a handler cannot catch: naming one as the preemption signal could never work.
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")


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
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    ds_config: str = "ds_configs/zero3.json"
    lock: LockConfig = field(default_factory=LockConfig)  # LiT: frozen towers or blocks (recipes/optim.py)
    tower_lr: TowerLRConfig = field(default_factory=TowerLRConfig)  # per-tower LR and layer-wise decay
    guard: GuardConfig = field(default_factory=GuardConfig)  # skip non-finite steps, roll back on divergence

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "≥ 1")
        require(self.stop_at >= 0, "stop_at", self.stop_at, "≥ 0 (0 runs to train.steps)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "≥ 1")
        require(self.lr >= 0, "lr", self.lr, "≥ 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "≥ 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "> 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "≥ 0")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "≥ 0 (0 disables clipping)")
        require(bool(self.ds_config), "ds_config", self.ds_config, "a DeepSpeed JSON path")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = 500
    keep_last: int = 3  # newest complete tags kept (and always the one `latest` names); 0 keeps every tag
    resume: str = ""  # "" starts fresh; "latest" or a tag resumes from `dir`; "auto": latest if any, else fresh
    # On it, and always on SIGTERM (SLURM's time limit, scancel): checkpoint at a step all ranks agree on, exit 75
    # (requeue). "" leaves SIGTERM as the only one.
    preempt_signal: str = "SIGUSR1"
    # Steps between the ranks' all-reduce of the flag: it syncs host and device, so not every step; with the
    # signal 120 s before the limit, 10 steps are plenty.
    preempt_check_every: int = 10

    def __post_init__(self) -> None:
        require(bool(self.dir), "dir", self.dir, "a folder path")
        require(self.every_steps >= 1, "every_steps", self.every_steps, "≥ 1")
        require(self.keep_last >= 0, "keep_last", self.keep_last, "≥ 0 (0 keeps every tag)")
        require(self.preempt_check_every >= 1, "preempt_check_every", self.preempt_check_every, "≥ 1")
        catchable = sorted(s.name for s in signal.Signals if s.name not in UNCATCHABLE_SIGNALS)
        if self.preempt_signal and self.preempt_signal not in catchable:
            close = suggest(self.preempt_signal, catchable)
            raise ValueError(f"preempt_signal must be a catchable signal name (e.g. SIGUSR1, SIGTERM) or '', "
                             f"got {self.preempt_signal!r}{close}")


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    every_steps: int = 10
    wandb: bool = True  # offline unless WANDB_API_KEY is set; WANDB_MODE overrides
    wandb_project: str = "hiclip"
    tensorboard: bool = False  # also write TensorBoard events under `dir` (needs the tensorboard package)
    progress: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = GPU datasheet / measured CPU GEMM (recipes/metrics.py)

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", self.every_steps, "≥ 1")
        require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "≥ 0 (0: the GPU's datasheet or the CPU's measured peak)")


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

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own fields)."""
        chunk, batch = self.grad_cache.chunk_size, self.train.batch_size
        if chunk > batch:
            raise ValueError(f"grad_cache.chunk_size ({chunk}) must be ≤ train.batch_size ({batch}) per rank, "
                             f"or 0 to turn the cache off")
        if self.data.max_regions != self.model.vision.max_regions:
            raise ValueError(f"data.max_regions ({self.data.max_regions}) must equal model.vision.max_regions "
                             f"({self.model.vision.max_regions}): the loader pads boxes to the model's region count")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw = _read_recipe(Path(path)) if path is not None else {}
    keys = Counter(item.partition("=")[0].strip() for item in overrides)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form a.b.c=value")
        key = key.strip()
        if keys[key] > 1:
            raise ConfigError(f"override {key!r} is given {keys[key]} times; one value per key (an unquoted brace "
                              f"pattern such as {key}=dir/{{0000..0007}}.tar is expanded by the shell into one "
                              f"argument per item: quote it)")
        _set_dotted(raw, key, _parse(value))
    return build(Config, _apply_preset(raw))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, whose floats need a dot (`1.0e-3`): `1e-3` would load as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _parse(text: str, source: str = "override"):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    raw = _parse(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a recipe path, got {base!r}")
    return _merge(_read_recipe(path.parent / base, (*seen, path.resolve())), raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_maps else value
    return out


def _apply_preset(raw: dict) -> dict:
    model = raw.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return raw
    model = dict(model)
    name = model.pop("preset")
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}{suggest(str(name), PRESETS)}")
    return {**raw, "model": _merge(dataclasses.asdict(PRESETS[name]), model)}


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    tree[leaf] = value
