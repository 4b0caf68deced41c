"""The optimizer's view of the model: which parameters train (tower locking), their parameter groups (decay,
per-tower LR, layer-wise LR decay), and the warm-up + cosine schedule.

    group LR at step s = train.lr · tower_scale · layer_decay^(depth - layer) · cosine_with_warmup(s)

A tower of L blocks has layers 0 (embeddings: patch/token embedding, CLS, positions, ln_pre), 1..L (block i is
layer i + 1, its HiCLIP prior included) and L + 1 (the head: final LayerNorm, projection, PyramidCLIP's region
tokens); depth = L + 1, so the head trains at the tower's LR and each layer below at `layer_decay` times the
one above (BEiT / EVA-CLIP). The temperature trains at train.lr. Parameters of equal (LR, decay) share one
group, so a recipe without these knobs has exactly the two groups it always had (checkpoints stay loadable).

Locking (LiT) sets requires_grad=False before the engine is built: a locked parameter is in no group, so no
ZeRO stage allocates fp32 master weights, gradients or Adam moments for it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from model.config_tree import require

TOWERS = ("visual", "text")
_EMBEDDINGS = {"visual": ("patch_embed", "cls_token", "pos_embed", "ln_pre"), "text": ("token_embed", "pos_embed")}
_BLOCK = re.compile(r"^(visual|text)\.transformer\.blocks\.(\d+)\.")


@dataclass
class TowerLock:
    """`train.lock.<tower>`: none trains the tower; all locks it (LiT); all_but_last keeps the last
    `unlocked_blocks` blocks and the head (final LayerNorm + projection) trainable."""

    mode: Literal["none", "all", "all_but_last"] = "none"
    unlocked_blocks: int = 0  # with all_but_last
    unlocked_norms: bool = False  # every LayerNorm of the tower stays trainable (gains and biases are cheap)

    def __post_init__(self):
        require(self.unlocked_blocks >= 0, "unlocked_blocks", self.unlocked_blocks, "≥ 0")


@dataclass
class LockConfig:
    visual: TowerLock = field(default_factory=TowerLock)
    text: TowerLock = field(default_factory=TowerLock)


@dataclass
class TowerLR:
    """`train.tower_lr.<tower>`: the tower's peak LR as a multiple of train.lr, and the layer-wise decay."""

    scale: float = 1.0
    layer_decay: float = 1.0  # 1 = no decay; EVA-CLIP uses 0.75-0.9

    def __post_init__(self):
        require(self.scale >= 0, "scale", self.scale, "≥ 0")
        require(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "in (0, 1]")


@dataclass
class TowerLRConfig:
    visual: TowerLR = field(default_factory=TowerLR)
    text: TowerLR = field(default_factory=TowerLR)


def _shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are empty outside forward


def _numel(p: nn.Parameter) -> int:
    return math.prod(_shape(p))


def tower_depth(model: nn.Module, tower: str) -> int:
    return getattr(model, tower).cfg.layers + 1


def layer_of(name: str, depth: int) -> int:
    """Layer id of a tower parameter: 0 embeddings, i + 1 for block i, depth for the head (see module doc)."""
    block = _BLOCK.match(name)
    if block:
        return int(block.group(2)) + 1
    tower, _, rest = name.partition(".")
    return 0 if rest.split(".")[0] in _EMBEDDINGS[tower] else depth


def apply_lock(model: nn.Module, lock: LockConfig) -> dict[str, int]:
    """requires_grad=False on the locked parameters; returns locked parameter counts per tower."""
    locked = {}
    for tower in TOWERS:
        rule: TowerLock = getattr(lock, tower)
        locked[tower] = 0
        if rule.mode == "none":
            continue
        depth = tower_depth(model, tower)
        first_unlocked = depth - rule.unlocked_blocks if rule.mode == "all_but_last" else depth + 1
        norms = {f"{tower}.{m}.{p}" for m, mod in getattr(model, tower).named_modules()
                 if isinstance(mod, nn.LayerNorm) for p, _ in mod.named_parameters(recurse=False)}
        for name, p in model.named_parameters():
            if not name.startswith(tower + "."):
                continue
            keep = layer_of(name, depth) >= first_unlocked or (rule.unlocked_norms and name in norms)
            if not keep:
                p.requires_grad_(False)
                locked[tower] += _numel(p)
    return locked


def _decays(name: str, p: nn.Parameter) -> bool:
    """No decay on gains, biases, embeddings and the temperature (as CLIP does)."""
    return not (len(_shape(p)) < 2 or "embed" in name or "token" in name or "logit_scale" in name)


def param_groups(model: nn.Module, weight_decay: float, tower_lr: TowerLRConfig | None = None) -> list[dict]:
    """Trainable parameters grouped by (LR scale, weight decay), in first-seen order of named_parameters.

    Each group carries `lr_scale` (its LR over train.lr) and `name` (its members, for the table). A scale of 0
    (tower_lr.*.scale = 0) still trains nothing but keeps optimizer state: lock the tower instead.
    """
    tower_lr = tower_lr or TowerLRConfig()
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = name.partition(".")[0]
        if tower in TOWERS:
            rule: TowerLR = getattr(tower_lr, tower)
            depth = tower_depth(model, tower)
            layer = layer_of(name, depth)
            scale = rule.scale * rule.layer_decay ** (depth - layer)
            member = f"{tower}.L{layer}"
        else:
            scale, member = 1.0, name
        wd = weight_decay if _decays(name, p) else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr_scale": scale,
                                                "members": []})
        group["params"].append(p)
        if member not in group["members"]:
            group["members"].append(member)
    return [{**g, "name": _members(g.pop("members"))} for g in groups.values()]


def _members(members: list[str]) -> str:
    """visual.L0, visual.L1, visual.L2, logit_scale -> visual.L0-2 logit_scale (layer ranges per tower)."""
    runs: dict[str, list[int]] = {}
    for m in members:
        tower, _, layer = m.partition(".L")
        runs.setdefault(m if not layer.isdigit() else tower, []).extend([int(layer)] if layer.isdigit() else [])
    out = []
    for key, layers in runs.items():
        if not layers:
            out.append(key)
            continue
        spans, start = [], layers[0]
        for a, b in zip(layers, layers[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(f"{key}.L{','.join(spans)}")
    return " ".join(out)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class OptimizerSettings(Protocol):
    """What the optimizer reads of `train:` (recipes.config.TrainConfig), named here so this module sits below
    the config tree that embeds its sections."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    steps: int
    lock: LockConfig
    tower_lr: TowerLRConfig


def build_optimizer(model: nn.Module, t: OptimizerSettings):
    """Lock, group, and build torch's fused AdamW with the warm-up + cosine schedule over every group."""
    apply_lock(model, t.lock)
    groups = param_groups(model, t.weight_decay, t.tower_lr)
    if not groups:
        raise ValueError("train.lock: every parameter is locked, nothing would train")
    for g in groups:
        g["lr"] = t.lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(
        groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
        fused=True,  # one kernel over all parameters (CUDA and CPU); the per-tensor loop makes temporaries
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, t.warmup_steps, t.steps))
    return optimizer, schedule


def group_table(model: nn.Module, groups: list[dict]) -> str:
    """The parameter groups as printed at start: peak LR, decay, size, members; then what is locked."""
    rows = [("group", "peak lr", "lr scale", "weight decay", "tensors", "params", "members")]
    for i, g in enumerate(groups):
        peak = g.get("initial_lr", g["lr"])  # the schedule keeps the peak here and moves g["lr"]
        rows.append((str(i), f"{peak:.4g}", f"{g['lr_scale']:.4g}", f"{g['weight_decay']:g}", str(len(g["params"])),
                     f"{sum(_numel(p) for p in g['params']):,}", g["name"]))
    locked = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if locked:
        rows.append(("locked", "-", "-", "-", str(len(locked)), f"{sum(_numel(p) for _, p in locked):,}",
                     " ".join(sorted({n.partition('.')[0] for n, _ in locked}))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
