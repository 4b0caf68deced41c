import dataclasses
import json
from pathlib import Path

import pytest

from model.config import PRESETS
from model.pretrained import load_pretrained
from recipes.config import Config, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(match: str, path=None, overrides=()) -> str:
    """load_config fails with exactly one line matching `match`."""
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, list(overrides))
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_yaml_preset_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: vit_b16\n  vision:\n    attention: hier\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.steps=7", "model.text.causal=false", "train.betas=[0.9, 0.95]"])
    assert cfg.model.vision.patch_size == 16 and cfg.model.vision.width == 768  # from the preset
    assert cfg.model.vision.attention == "hier"  # recipe key on top of the preset
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.model.text.causal is False
    assert cfg.train.betas == (0.9, 0.95)


def test_presets_are_not_mutated(tmp_path):
    load_config(write(tmp_path, "model:\n  preset: tiny\n  embed_dim: 7\n"))
    assert load_config(write(tmp_path, "model:\n  preset: tiny\n")).model.embed_dim != 7
    assert PRESETS["tiny"].embed_dim == 64


def test_unknown_key_names_key_and_suggestion(tmp_path):
    one_line_error(r"unknown config key 'train\.lrr'.*did you mean 'lr'", write(tmp_path, "train:\n  lrr: 1\n"))
    one_line_error(r"'model\.vision\.patch_sise'.*'patch_size'", overrides=["model.vision.patch_sise=8"])


def test_bad_values_and_files(tmp_path):
    one_line_error("train.steps must be int", overrides=["train.steps=ten"])
    one_line_error("unknown model preset 'vit_b61'.*'vit_b16'", overrides=["model.preset=vit_b61"])
    one_line_error("config file not found", tmp_path / "missing.yaml")
    one_line_error("not of the form", overrides=["train.steps"])
    one_line_error(r"recipe\.yaml: not valid YAML", write(tmp_path, "train: [1,\n"))
    # an int where a float is expected is fine
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_section_validation_runs_on_load():
    """Each section's __post_init__ sees the loaded values (it used to see only the defaults)."""
    one_line_error(r"loss: lambda_global \+ mu_local must be ≤ 1 \(the peer terms get 1 − λ − μ = -0\.1\)",
                   overrides=["loss.lambda_global=0.8", "loss.mu_local=0.3"])
    one_line_error(r"grad_cache: chunk_size must be ≥ 0.*got -1", overrides=["grad_cache.chunk_size=-1"])
    one_line_error(r"loss\.kind must be one of clip \| pyramid, got 'bogus'", overrides=["loss.kind=bogus"])
    one_line_error(r"model\.hier\.attn_impl must be one of auto \| reference \| sdpa \| triton, got 'flash'",
                   overrides=["model.hier.attn_impl=flash"])
    one_line_error(r"model\.vision\.attention must be one of vanilla \| hier, got 'heir' \(did you mean 'hier'",
                   overrides=["model.vision.attention=heir"])


@pytest.mark.parametrize("override, match", [
    ("train.steps=-5", r"train: steps must be ≥ 1, got -5"),
    ("train.batch_size=0", r"train: batch_size must be ≥ 1, got 0"),
    ("train.precision=fp16", r"train\.precision must be one of bf16 \| fp32, got 'fp16'"),
    ("train.betas=[0.9]", r"train\.betas must have 2 items"),
    ("checkpoint.every_steps=0", r"checkpoint: every_steps must be ≥ 1, got 0"),
    ("logging.every_steps=0", r"logging: every_steps must be ≥ 1, got 0"),
    ("checkpoint.keep_last=-1", r"checkpoint: keep_last must be ≥ 0 \(0 keeps every tag\), got -1"),
    ("checkpoint.preempt_signal=SIGUSR3", r"checkpoint: preempt_signal must be a catchable signal.*got 'SIGUSR3' \(did you mean 'SIGUSR2'"),
    ("checkpoint.preempt_signal=SIGKILL", r"checkpoint: preempt_signal must be a catchable signal.*got 'SIGKILL'"),
    ("model.vision.patch_size=0", r"model\.vision: patch_size must be ≥ 1 and a divisor of image_size \(224\)"),
    ("model.vision.heads=7", r"model\.vision: heads must be ≥ 1 and a divisor of width \(768\), got 7"),
    ("model.text.heads=0", r"model\.text: heads must be ≥ 1"),
    ("model.dropout=1.5", r"model: dropout must be in \[0, 1\), got 1\.5"),
    ("model.vision.region_split=12", r"model\.vision: region_split must be < layers \(12\)"),
    ("data.workers=-1", r"data: workers must be ≥ 0"),
    ("data.global_scale=[0.9, 0.2]", r"data: global_scale must be a range"),
    ("data.sources=[{shards: a.tar, weight: 0}]", r"data\.sources\[0\]: weight must be > 0, got 0"),
    ("eval.sets=[{kind: imagenett}]", r"eval\.sets\[0\]\.kind must be one of .*did you mean 'imagenet'"),
    ("grad_cache.chunk_size=100", r"grad_cache\.chunk_size \(100\) must be ≤ train\.batch_size \(64\)"),
])
def test_every_value_is_range_checked(override, match):
    one_line_error(match, overrides=[override])


def test_scientific_notation_is_a_float(tmp_path):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; the --help example `train.lr=1e-3` must work."""
    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    cfg = load_config(write(tmp_path, "train:\n  lr: 5E-4\n  eps: 1e-8\n  weight_decay: 2e-1\n"))
    assert (cfg.train.lr, cfg.train.eps, cfg.train.weight_decay) == (5e-4, 1e-8, 0.2)
    one_line_error("data.train_shards must be str, got 1000.0", overrides=["data.train_shards=1e3"])


def test_repeated_override_is_refused_with_a_brace_hint():
    """`data.train_shards=dir/train-{0..2}.tar` unquoted reaches us as three copies of the key."""
    message = one_line_error(r"override 'data\.train_shards' is given 3 times.*quote it",
                             overrides=[f"data.train_shards=dir/train-{i}.tar" for i in range(3)])
    assert "brace" in message


def test_base_recipe_chain(tmp_path):
    write(tmp_path, "train:\n  steps: 10\n  lr: 1.0e-3\nlogging:\n  every_steps: 5\n", "root.yaml")
    write(tmp_path, "base: root.yaml\ntrain:\n  steps: 20\n", "mid.yaml")
    (tmp_path / "sub").mkdir()
    top = write(tmp_path / "sub", "base: ../mid.yaml\nlogging:\n  dir: runs/x\n", "top.yaml")
    cfg = load_config(top)
    assert (cfg.train.steps, cfg.train.lr, cfg.logging.every_steps, cfg.logging.dir) == (20, 1e-3, 5, "runs/x")
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    one_line_error("loops back", tmp_path / "a.yaml")
    one_line_error("config file not found", write(tmp_path, "base: nowhere.yaml\n", "c.yaml"))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_paper_recipes_resolve_as_before_base():
    """The recipes now say only what they change (`base:`); each resolves to exactly the config it had when every
    file spelled everything out (tests/unit/data/recipes_before_base.json, written by the old loader). Keys added
    since then must sit at their defaults."""
    before = json.loads((Path(__file__).parent / "data" / "recipes_before_base.json").read_text())
    defaults = flatten(json.loads(json.dumps(to_dict(Config()))))
    assert len(before) == 9
    for name, old in before.items():
        new = flatten(json.loads(json.dumps(to_dict(load_config(ROOT / "recipes" / "configs" / name)))))
        assert {k: new[k] for k in old} == old, name
        assert {k: v for k, v in new.items() if k not in old} == {k: defaults[k] for k in new if k not in old}, name


def test_consolidated_folder_config_is_validated(tmp_path):
    """A model config.json goes through the same builder: an unknown or bad key is one line naming the file."""
    cfg = dataclasses.asdict(PRESETS["tiny"])
    cfg["vision"]["patch_sise"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown config key 'vision\.patch_sise'") as info:
        load_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    del cfg["vision"]["patch_sise"]
    cfg["vision"]["attention"] = "bogus"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: vision\.attention must be one of vanilla \| hier"):
        load_pretrained(tmp_path)
