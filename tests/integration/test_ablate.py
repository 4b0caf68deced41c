"""recipes.ablate end to end on a seconds-long setting: variants x seeds, each trained in its own process (1 rank),
evaluated, tabulated; a second call with one more seed trains only the new cells."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.integration.launch import tiny_run
from tests.integration.test_periodic_eval import write_labelled_eval_shard

pytestmark = pytest.mark.integration


def test_ablate_trains_evaluates_tabulates_and_skips_finished_cells(tmp_path, synthetic_shards, monkeypatch, capsys):
    from recipes.ablate import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shards = synthetic_shards(n_shards=2, per_shard=16)
    eval_spec = write_labelled_eval_shard(tmp_path / "eval", 9)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        rgba = np.zeros((32, 32, 4), dtype=np.uint8)
        rgba[4 + 4 * i:20 + 4 * i, 8:24] = (200, 100, 0, 255)
        Image.fromarray(rgba, "RGBA").save(masks / f"{i}.png")
    common = [o for o in tiny_run(shards, tmp_path, steps=2, layers=2, workers=0) if not o.startswith(("checkpoint.dir", "logging.dir"))]
    common += [f"data.eval_shards={eval_spec}", "train.ds_config=ds_configs/zero2.json", "checkpoint.every_steps=2",
               "eval.batch_size=4"]
    args = ["--config", "recipes/configs/demo.yaml", "--out", str(tmp_path / "ab"), "--variant", "clip=",
            "--variant", "hier=model.vision.attention=hier,model.text.attention=hier",
            "--induction-images", str(masks)]

    main([*args, "--seeds", "0", *common])
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "ab").glob("*/seed0/*") if p.is_file()}
    assert (tmp_path / "ab" / "clip" / "seed0" / "train.log").read_text().count("recipes.pretrain") == 1

    main([*args, "--variants", "clip", "--seeds", "0,1", *common])
    out = capsys.readouterr().out
    assert out.count("finished earlier, kept") == 1 and out.count("training (") == 3  # 2 + 1 new, none repeated
    assert {p: p.stat().st_mtime_ns for p in first} == first  # seed-0 cells untouched, logs included

    results = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert sorted((c["variant"], c["seed"]) for c in results["cells"]) == [("clip", 0), ("clip", 1)]
    assert "clip (n=2)" in (tmp_path / "ab" / "table.md").read_text()
    main([*args, "--seeds", "0", *common])  # nothing left to train: the table of both variants from disk
    assert capsys.readouterr().out.count("training (") == 0
    results = json.loads((tmp_path / "ab" / "results.json").read_text())
    for c in results["cells"]:
        assert 0 <= c["metrics"]["shards/zeroshot_top1"] <= 1 and (c["induction"] is None) == (c["variant"] == "clip")
        assert (tmp_path / "ab" / c["variant"] / f"seed{c['seed']}" / "metrics.jsonl").is_file()
    hier = results["cells"][-1]["induction"]
    assert hier["images"] == 3 and len(hier["layers"]) == 2 and len(hier["thresholds"]) == 2
    table = (tmp_path / "ab" / "table.md").read_text()
    assert "clip (n=1)" in table and "hier (n=1)" in table and "| hier | 2 |" in table
    assert (tmp_path / "ab" / "ablation.png").stat().st_size > 1000


def test_ablate_refuses_an_override_it_owns(tmp_path):
    from recipes.ablate import main

    with pytest.raises(SystemExit, match="train.seed=3.*sets train.seed"):
        main(["--config", "recipes/configs/demo.yaml", "--out", str(tmp_path), "train.seed=3"])
