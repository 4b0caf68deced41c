import pytest

from recipes.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


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


def test_unknown_key_names_key_and_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.'lrr'.*did you mean 'lr'"):
        load_config(write(tmp_path, "train:\n  lrr: 1\n"))
    with pytest.raises(ConfigError, match=r"model\.vision\.'patch_sise'.*'patch_size'"):
        load_config(None, ["model.vision.patch_sise=8"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="unknown model preset 'vit_b61'.*'vit_b16'"):
        load_config(None, ["model.preset=vit_b61"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.steps"])
    # an int where a float is expected is fine
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
