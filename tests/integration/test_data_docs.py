"""docs/data.md, run as written: a folder of captioned cut-out stamps (PNG with transparency, category folders) ->
shards with a held-out labelled split -> annotate -> train (1 CPU rank, the demo's tiny model, 2 steps of 8) ->
consolidate -> zero-shot evaluation over the folder classes. The commands are the docs' own code blocks."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipeline.tar_io import iter_samples
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

CATEGORIES = {"circle": "ellipse", "square": "rectangle", "triangle": "polygon"}
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
PER_CLASS = 20
# the blocks of docs/data.md for the folder path, in order, by their first line
BLOCKS = ("# shards: a folder", "# shard specs", "# annotate", "# train", "# evaluate")


def stamp_folder(root) -> None:
    """root/<shape>/<i>.png: a coloured shape on a fully transparent background, and <i>.txt its caption."""
    rng = np.random.default_rng(0)
    for shape, draw_call in CATEGORIES.items():
        (root / shape).mkdir(parents=True)
        for i in range(PER_CLASS):
            name, colour = list(COLOURS.items())[i % len(COLOURS)]
            image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            x, y = rng.integers(2, 12, 2)
            box = [int(x), int(y), int(x) + 24, int(y) + 24]
            draw = ImageDraw.Draw(image)
            if shape == "triangle":
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=(*colour, 255))
            else:
                getattr(draw, draw_call)(box, fill=(*colour, 255))
            image.save(root / shape / f"{i:04d}.png")
            (root / shape / f"{i:04d}.txt").write_text(f"a {name} {shape} stamp, cut out")


def docs_blocks() -> str:
    text = (ROOT / "docs" / "data.md").read_text()
    blocks = {b.split("\n", 1)[0]: b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)}
    missing = [name for name in BLOCKS if name not in blocks]
    assert not missing, f"docs/data.md lost the blocks {missing}"
    return "\n".join(blocks[name] for name in BLOCKS)


def test_docs_data_path_from_a_folder_to_a_zero_shot_evaluation(tmp_path):
    stamp_folder(tmp_path / "stamps")
    env = {**os.environ, "IMAGES": str(tmp_path / "stamps"), "DATA": str(tmp_path / "data"),
           "RUN": str(tmp_path / "run"), "NPROC": "1", "BATCH": "8", "STEPS": "2", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", docs_blocks()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    data = tmp_path / "data"
    train, held_out = (json.load(open(data / split / "stats.json")) for split in ("train", "eval"))
    assert (train["samples"], held_out["samples"]) == (54, 6)  # 10% of 60 images held out
    assert train["alpha_composited"] + held_out["alpha_composited"] == 60
    sample = next(iter_samples(str(data / "train" / "shard-0000.tar")))
    assert (np.asarray(Image.open(io.BytesIO(sample.fields["png"])))[0, 0] == 255).all()  # transparent -> white
    classes = json.load(open(data / "eval" / "classnames.json"))
    assert classes["classnames"] == sorted(CATEGORIES)
    labels = [json.loads(s.fields["json"])["label"] for s in iter_samples(str(data / "eval" / "shard-0000.tar"))]
    assert len(labels) == 6 and set(labels) <= {0, 1, 2}

    # the offline annotator and then the trainer both said which PyramidCLIP levels are missing
    assert "objects in 0 of 54 samples" in log
    assert "objects present in 0% of samples: 2 of 6 loss terms inactive" in log
    assert "regions present in 0% of samples: 2 of 6 loss terms inactive" in log

    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["classes"] == 3 and results["samples"] == 6 and 0 <= results["zeroshot_top1"] <= 1
    assert results["images"] == 6 and "majority class" in log and "(6 held-out samples, 3 classes)" in log
