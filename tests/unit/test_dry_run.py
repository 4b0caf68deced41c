"""`--dry-run` of every paper recipe: the paper's setup, sane numbers, and no data read (the shards do not exist)."""
from pathlib import Path

import pytest
import torch

from model.clip import CLIP
from model.config import PRESETS
from model.flops import count_flops
from recipes.config import load_config
from recipes.dry_run import count_params, dry_run
from recipes.pretrain import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [f"{m}_{s}" for m in ("clip", "hiclip", "pyramidclip", "hiclip_pyramid") for s in ("b32", "b16")]


@pytest.fixture(scope="module")
def runs():
    return {name: dry_run(load_config(ROOT / f"recipes/configs/{name}.yaml"), world_size=32) for name in RECIPES}


def test_every_paper_recipe_has_the_paper_setup(runs):
    for name, run in runs.items():
        cfg = load_config(ROOT / f"recipes/configs/{name}.yaml")
        assert not Path(cfg.data.train_shards.split("{")[0]).exists()  # nothing to read: the dry run reads nothing
        assert run.global_batch == 4096 and run.warmup_steps == 2500, name
        assert run.epochs == pytest.approx(32.0, abs=1e-3), name
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.model.init_temperature) == (1e-3, 0.1, 0.07), name
        assert (cfg.loss.kind == "pyramid") == ("pyramid" in name), name
        assert (cfg.model.vision.attention == cfg.model.text.attention == "hier") == name.startswith("hiclip"), name


def test_numbers_relate_as_the_methods_do(runs):
    assert runs["clip_b16"].params == runs["clip_b32"].params - (32**2 - 16**2) * 3 * 768 + (196 - 49) * 768
    assert runs["clip_b16"].params_prior == 0 < runs["hiclip_b16"].params_prior
    assert runs["hiclip_b16"].params == runs["clip_b16"].params + runs["hiclip_b16"].params_prior
    for size in ("b32", "b16"):
        clip, hiclip, pyramid = runs[f"clip_{size}"], runs[f"hiclip_{size}"], runs[f"pyramidclip_{size}"]
        assert 1.0 < hiclip.forward_flops / clip.forward_flops < 1.2  # the paper reports about +15%
        assert pyramid.forward_flops > 2 * clip.forward_flops  # two views, three texts, regions
    # 197 tokens against 50 in the image tower (ViT-B/16 17.6 GMACs, B/32 4.4 GMACs); the text tower is the same
    assert 3.9 < count_flops(PRESETS["vit_b16"]).vision / count_flops(PRESETS["vit_b32"]).vision < 4.1
    assert runs["clip_b16"].forward_flops > runs["clip_b32"].forward_flops
    for run in runs.values():
        assert 0 < run.zero3_gb < run.zero2_gb  # ZeRO-3 also shards the 16-bit parameters
        assert run.zero3_offload_gb < run.zero3_gb


def test_meta_parameter_count_equals_the_real_model():
    cfg = PRESETS["tiny"]
    total, *_ = count_params(CLIP(cfg))
    with torch.device("meta"):
        assert count_params(CLIP(cfg))[0] == total


def test_cli_prints_the_table(capsys):
    main(["--config", str(ROOT / "recipes/configs/hiclip_b16.yaml"), "--dry-run", "--world-size", "16"])
    out = capsys.readouterr().out
    assert "parameters" in out and "ZeRO-3" in out and "global batch 2048" in out


def test_world_size_must_fill_whole_nodes():
    with pytest.raises(ValueError, match="multiple of"):
        dry_run(load_config(ROOT / "recipes/configs/clip_b32.yaml"), world_size=12, gpus_per_node=8)


def test_levers_change_the_activation_memory_and_what_fits():
    from recipes.dry_run import activation_bytes_per_sample, batch_that_fits

    cfg = load_config(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml")
    none = activation_bytes_per_sample(cfg.model, pyramid=True)
    run = dry_run(cfg, world_size=32)
    assert run.activation_gb_none * 1e9 == pytest.approx(none) and run.activation_gb == run.activation_gb_none
    # Checkpointed blocks keep their input only, plus one block recomputed: about a tenth of none at 12 layers.
    assert 0.05 < run.activation_gb_blocks / run.activation_gb_none < 0.15
    every_2 = load_config(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml",
                          ["model.vision.checkpointing=every_k", "model.text.checkpointing=every_k"])
    assert run.activation_gb_blocks * 1e9 < activation_bytes_per_sample(every_2.model, True) < none
    # Patch dropout 0.5 on the hier grid keeps 10 x 10 of 14 x 14 patches: the image activations shrink about 2x.
    dropped = load_config(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml", ["model.vision.patch_dropout=0.5"])
    assert 0.4 < activation_bytes_per_sample(dropped.model, True) / none < 0.75
    assert batch_that_fits(none) == 128 and run.fits(run.activation_gb_blocks) == 1024
    big = load_config(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml", ["train.batch_size=512"])
    assert "checkpointing=blocks makes it fit" in dry_run(big, world_size=32).memory_advice()
    huge = load_config(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml", ["train.batch_size=4096"])
    assert "grad_cache.chunk_size=1024 with checkpointing=blocks, or 128 without" in dry_run(huge, 32).memory_advice()
