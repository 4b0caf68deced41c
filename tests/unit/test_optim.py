"""Parameter groups, layer-wise LR decay, tower locking and the schedule (recipes/optim.py)."""
import math
import re
import warnings

import pytest
import torch

from model.clip import CLIP
from recipes.config import load_config
from recipes.optim import apply_lock, build_optimizer, cosine_with_warmup, group_table, param_groups
from tests.unit.test_pyramid_model import small_config

LR = 2e-3


def _cfg(*overrides):
    cfg = load_config(None, [f"train.lr={LR}", "train.warmup_steps=3", "train.steps=20", "train.weight_decay=0.1",
                             *overrides])
    cfg.model = small_config("hier")  # priors inside blocks: they must follow their block's layer
    return cfg


def expected_scale(name: str, cfg) -> float:
    """The documented formula, written out independently: layers 0 (embeddings), i + 1 (block i), L + 1 (head)."""
    tower = name.split(".")[0]
    if tower not in ("visual", "text"):
        return 1.0
    layers = getattr(cfg.model, "vision" if tower == "visual" else "text").layers
    block = re.match(rf"{tower}\.transformer\.blocks\.(\d+)\.", name)
    if block:
        layer = int(block.group(1)) + 1
    elif name.split(".")[1] in ("patch_embed", "cls_token", "pos_embed", "ln_pre", "token_embed"):
        layer = 0
    else:
        layer = layers + 1
    rule = getattr(cfg.train.tower_lr, tower)
    return rule.scale * rule.layer_decay ** (layers + 1 - layer)


def test_every_groups_lr_follows_the_formula_at_every_step():
    cfg = _cfg("train.tower_lr.visual.scale=0.5", "train.tower_lr.visual.layer_decay=0.7",
               "train.tower_lr.text.layer_decay=0.9")
    model = CLIP(cfg.model)
    optimizer, schedule = build_optimizer(model, cfg.train)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # nothing locked: every parameter is in exactly one group
    scales = {expected_scale(n, cfg) for n in names}
    assert len(scales) == 9  # visual L0-L4 (5), text L0-L2 (3), and 1.0 shared by the text head and temperature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedule.step() before optimizer.step(): fine here
        for step in range(cfg.train.steps + 2):
            for name, p in names.items():
                lr = LR * expected_scale(name, cfg) * cosine_with_warmup(step, 3, 20)
                assert group_of[id(p)]["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-18), (step, name)
            schedule.step()


def test_default_recipe_keeps_two_groups():
    """Without the knobs: decay / no-decay, as before the LR options (universal checkpoints count groups)."""
    cfg = _cfg()
    model = CLIP(cfg.model)
    groups = param_groups(model, 0.1, cfg.train.tower_lr)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    decay = {id(p) for p in next(g for g in groups if g["weight_decay"] == 0.1)["params"]}
    decayed = {n for n, p in model.named_parameters() if id(p) in decay}
    assert "visual.proj.weight" in decayed and "text.transformer.blocks.0.attn.qkv.weight" in decayed
    assert not any(k in n for n in decayed for k in ("bias", "ln_", "token_embed", "pos_embed", "logit_scale"))


@pytest.mark.parametrize("mode,blocks,norms", [("all", 0, False), ("all_but_last", 1, False), ("all_but_last", 0, True)])
def test_lock_leaves_locked_parameters_out_of_the_optimizer(mode, blocks, norms):
    cfg = _cfg(f"train.lock.visual.mode={mode}", f"train.lock.visual.unlocked_blocks={blocks}",
               f"train.lock.visual.unlocked_norms={str(norms).lower()}")
    model = CLIP(cfg.model)
    optimizer, _ = build_optimizer(model, cfg.train)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    layers = cfg.model.vision.layers
    for name, p in model.named_parameters():
        block = re.match(r"visual\.transformer\.blocks\.(\d+)\.", name)
        head = name.startswith(("visual.ln_post", "visual.proj", "visual.regions"))
        norm = re.search(r"(^|\.)ln(_\w+)?\.", name) is not None
        if not name.startswith("visual."):
            trainable = True
        elif mode == "all":
            trainable = norms and norm
        else:
            trainable = head or (block is not None and int(block.group(1)) >= layers - blocks) or (norms and norm)
        assert p.requires_grad == trainable, name
        assert (id(p) in in_optimizer) == trainable, name
    assert "locked" in group_table(model, optimizer.param_groups)


def test_everything_locked_is_an_error():
    cfg = _cfg("train.lock.visual.mode=all", "train.lock.text.mode=all")
    model = CLIP(cfg.model)
    model.logit_scale.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter is locked"):
        build_optimizer(model, cfg.train)


def test_bad_values_name_the_key():
    from recipes.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.tower_lr\.text: layer_decay must be in \(0, 1\], got 1\.5"):
        _cfg("train.tower_lr.text.layer_decay=1.5")
    with pytest.raises(ConfigError, match=r"train\.lock\.visual: unlocked_blocks must be ≥ 0, got -1"):
        _cfg("train.lock.visual.unlocked_blocks=-1")
    with pytest.raises(ConfigError, match=r"train\.lock\.visual\.mode must be one of none \| all \| all_but_last"):
        _cfg("train.lock.visual.mode=some")


def test_apply_lock_counts():
    cfg = _cfg("train.lock.text.mode=all")
    model = CLIP(cfg.model)
    locked = apply_lock(model, cfg.train.lock)
    assert locked == {"visual": 0, "text": sum(p.numel() for n, p in model.named_parameters() if n.startswith("text."))}
    assert math.isclose(sum(p.numel() for p in model.parameters() if not p.requires_grad), locked["text"])
