"""Linear probe (recipes/linear_probe.py): the C sweep, streaming features, the CLI on a packaged set."""
import json

import numpy as np
import pytest
import torch

from data_pipeline.eval_sets import EvalSetConfig
from data_pipeline.tokenizer import Tokenizer
from model.clip import CLIP
from model.config import PRESETS
from model.pretrained import save_pretrained
from recipes.linear_probe import COARSE, choose_c, features, linear_probe, split


def blobs(n: int, classes: int = 4, dim: int = 16, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def test_separable_classes_are_learnt_and_shuffled_labels_are_not():
    x, y = blobs(400)
    results = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert results["top1"] > 0.95 and results["train"] == 240 and results["val"] == 60 and results["test"] == 100
    shuffled = np.random.default_rng(1).permutation(y)
    assert linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:])["top1"] < 0.45  # 4 classes


def test_sweep_is_coarse_then_fine_and_returns_its_best():
    x, y = blobs(200, spread=2.0)  # overlapping classes: regularisation matters
    c, sweep = choose_c(x[:150], y[:150], x[150:], y[150:])
    cs = [s[0] for s in sweep]
    assert set(COARSE) <= set(cs) and len(cs) == len(COARSE) + 8
    assert max(s[1] for s in sweep) == dict(sweep)[c]


def test_split_is_a_fixed_partition():
    rest, part = split(10, 0.3, seed=0)
    assert len(part) == 3 and sorted(np.concatenate([rest, part]).tolist()) == list(range(10))
    assert np.array_equal(split(10, 0.3, seed=0)[1], part)


def test_features_are_computed_batch_by_batch():
    model = CLIP(PRESETS["tiny"])
    seen = []
    encode = model.encode_image
    model.encode_image = lambda images: seen.append(len(images)) or encode(images)
    x, y = features(model, EvalSetConfig(kind="animal_mnist", max_samples=40), 64, batch_size=8)
    assert x.shape == (40, PRESETS["tiny"].embed_dim) and x.dtype == np.float32 and len(y) == 40
    assert seen == [8] * 5
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_cli_probes_animal_mnist_from_a_model_folder(tmp_path, capsys):
    from recipes.linear_probe import main

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    save_pretrained(tmp_path / "m", CLIP(cfg).state_dict(), cfg)
    Tokenizer(cfg.text.context_length).save(str(tmp_path / "m"))
    main(["--model", str(tmp_path / "m"), "--max-samples", "200", "--workers", "0", "--device", "cpu",
          "--json", str(tmp_path / "p.json")])
    results = json.loads((tmp_path / "p.json").read_text())
    assert results["test"] == 40 and results["train"] + results["val"] == 160
    assert results["top1"] > results["chance_top1"]  # even random features of silhouettes carry the class a bit
    assert "linear probe top-1" in capsys.readouterr().out


def test_cli_bad_fraction_is_a_one_line_error(tmp_path):
    from recipes.linear_probe import main

    with pytest.raises(SystemExit, match="--val-fraction must be in"):
        main(["--model", str(tmp_path), "--val-fraction", "1.5"])
