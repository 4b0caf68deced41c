"""Zero-shot evaluation (recipes/evaluate.py) and the offline eval sets (data_pipeline/eval_sets.py)."""
import io
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data_pipeline.config import DataConfig
from data_pipeline.eval_sets import EvalSetConfig, build_eval_set, spread
from data_pipeline.tokenizer import Tokenizer
from model.clip import CLIP
from model.config import PRESETS
from recipes.evaluate import evaluate, format_table, retrieval_recall, topk_accuracy

CLASSES = ["cat", "dog", "car", "tree", "house"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


class AgreeingTowers(nn.Module):
    """Towers built to agree: an image whose pixels hold class c and any prompt naming class c embed identically."""

    def __init__(self, tokenizer: Tokenizer, dim: int = 16):
        super().__init__()
        self.cfg = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=8),
                                         text=types.SimpleNamespace(context_length=tokenizer.context_length))
        self.table = nn.Parameter(torch.randn(len(CLASSES), dim))
        self.class_token = torch.stack([tokenizer(name)[0, 1] for name in CLASSES])  # one BPE token per name

    def encode_image(self, image):
        return F.normalize(self.table[image[:, 0, 0, 0].round().long()], dim=-1)

    def encode_text(self, tokens):
        cls = (tokens[:, :, None] == self.class_token).any(dim=1).float().argmax(dim=1)
        return F.normalize(self.table[cls], dim=-1)


def class_batches(labels: list[int], batch_size: int = 4) -> list[dict]:
    images = torch.tensor(labels, dtype=torch.float)[:, None, None, None].expand(-1, 3, 8, 8)
    return [{"image": images[i:i + batch_size], "label": torch.tensor(labels[i:i + batch_size])}
            for i in range(0, len(labels), batch_size)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=16)


def test_agreeing_towers_classify_perfectly(tokenizer):
    labels = [i % len(CLASSES) for i in range(23)]
    results = evaluate(AgreeingTowers(tokenizer), tokenizer, class_batches(labels), CLASSES, TEMPLATES)
    assert results["zeroshot_top1"] == 1.0 and results["samples"] == 23
    assert "image_to_text_R@1" not in results  # no texts in the split: no retrieval


def test_agreeing_towers_with_shuffled_class_names_score_zero(tokenizer):
    # Same towers, class names listed in a rotated order: every prediction names the wrong class.
    labels = [i % len(CLASSES) for i in range(10)]
    results = evaluate(AgreeingTowers(tokenizer), tokenizer, class_batches(labels), CLASSES[1:] + CLASSES[:1],
                       TEMPLATES)
    assert results["zeroshot_top1"] == 0.0


def test_random_model_is_near_chance_on_animal_mnist():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model, tok = CLIP(cfg), Tokenizer(cfg.text.context_length)
    eval_set = build_eval_set(EvalSetConfig(kind="animal_mnist", max_samples=300), DataConfig(workers=0), tok,
                              image_size=cfg.vision.image_size, batch_size=100)
    results = evaluate(model, tok, eval_set.batches, eval_set.classnames, eval_set.templates)
    assert results["samples"] == 300 and results["classes"] == 10
    assert results["zeroshot_chance_top1"] == pytest.approx(0.1, abs=0.01)  # the spread subset stays balanced
    assert abs(results["zeroshot_top1"] - 0.1) < 0.08
    assert "zero-shot top-1" in format_table(results)


def test_retrieval_recall_hand_computed():
    # Similarities (rows: images, columns: texts) chosen so that the ranks are known:
    #   image 0: its text 0 scores best            -> rank 0
    #   image 1: text 2 beats text 1               -> rank 1
    #   image 2: texts 0 and 1 beat text 2         -> rank 2
    sim = torch.tensor([[0.9, 0.1, 0.0],
                        [0.2, 0.5, 0.8],
                        [0.7, 0.6, 0.3]])
    image, text = sim, torch.eye(3)  # image @ text.T == sim
    r = retrieval_recall(image, text, ks=(1, 2, 3))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@3"] == 1.0
    # text -> image reads the columns: text 0 [0.9, 0.2, 0.7] rank 0; text 1 [0.1, 0.5, 0.6] rank 1;
    # text 2 [0.0, 0.8, 0.3] image 2 scores 0.3 < 0.8 -> rank 1
    assert r["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert r["text_to_image_R@2"] == 1.0


def test_retrieval_recall_with_several_captions_per_image():
    # Two images, four captions: captions 0, 1 describe image 0; captions 2, 3 describe image 1.
    sim = torch.tensor([[0.1, 0.8, 0.9, 0.0],   # image 0: best own caption (0.8) is beaten by caption 2 -> rank 1
                        [0.5, 0.2, 0.1, 0.6]])  # image 1: own caption 3 scores best -> rank 0
    owner = torch.tensor([0, 0, 1, 1])
    r = retrieval_recall(sim, torch.eye(4), owner, ks=(1, 2))
    assert r["image_to_text_R@1"] == 0.5 and r["image_to_text_R@2"] == 1.0
    # captions: 0 -> [0.1, 0.5] rank 1; 1 -> [0.8, 0.2] rank 0; 2 -> [0.9, 0.1] rank 1; 3 -> [0.0, 0.6] rank 0
    assert r["text_to_image_R@1"] == 0.5


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_labels_follow_sorted_folders(tmp_path, tokenizer):
    for folder, count in (("b_dog", 2), ("a_cat", 3)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            (tmp_path / folder / f"{i}.png").write_bytes(_png(40 * i))
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    eval_set = build_eval_set(EvalSetConfig(kind="image_folder", root=str(tmp_path)), DataConfig(workers=0),
                              tokenizer, image_size=8, batch_size=4, rank=1, world_size=2)
    batches = list(eval_set.batches)
    assert eval_set.classnames == ["a_cat", "b_dog"]
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1]  # items 1 and 3 of [c, c, c, d, d]
    assert batches[0]["image"].shape[1:] == (3, 8, 8)


def test_karpathy_captions_carry_owners(tmp_path, tokenizer):
    images = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(50 * i))
        images.append({"filename": f"{i}.png", "split": "test" if i < 2 else "train",
                       "sentences": [{"raw": f"caption {i} {j}"} for j in range(6)]})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images}))
    cfg = EvalSetConfig(kind="coco", root=str(tmp_path), annotations=str(tmp_path / "ann.json"))
    eval_set = build_eval_set(cfg, DataConfig(workers=0), tokenizer, image_size=8, batch_size=8)
    (batch,) = list(eval_set.batches)
    assert batch["index"].tolist() == [0, 1]  # the train image is left out
    assert batch["owner"].tolist() == [0] * 5 + [1] * 5  # five captions per image, as the benchmarks use
    assert batch["text"].shape == (10, tokenizer.context_length) and eval_set.classnames == []


def test_spread_keeps_sorted_classes_balanced():
    idx = spread(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
    assert [i // 100 for i in idx] == list(range(10))
    assert spread(5, 0) == [0, 1, 2, 3, 4]



@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from model.pretrained import save_pretrained

    folder = tmp_path_factory.mktemp("model")
    cfg = PRESETS["tiny"]
    save_pretrained(folder, CLIP(cfg).state_dict(), cfg)
    Tokenizer(cfg.text.context_length).save(str(folder))
    return str(folder)


def test_cli_evaluates_a_consolidated_folder_and_writes_json(model_folder, tmp_path, capsys):
    from recipes.evaluate import main

    main(["--model", model_folder, "--set", "animal_mnist", "--max-samples", "40", "--workers", "0",
          "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["samples"] == 40 and results["classes"] == 10
    assert "zero-shot top-1" in capsys.readouterr().out


def test_cli_missing_root_is_a_one_line_error(model_folder, tmp_path):
    from recipes.evaluate import main

    with pytest.raises(SystemExit, match="root folder not found"):
        main(["--model", model_folder, "--set", "imagenet", "--root", str(tmp_path / "nope"), "--device", "cpu"])


def test_table_names_the_chance_convention_of_each_row(tokenizer):
    labels = [0] * 6 + [1, 2, 3, 4]  # majority class 0: 60%
    results = evaluate(AgreeingTowers(tokenizer), tokenizer, class_batches(labels), CLASSES, TEMPLATES)
    results.update({"images": 10, "texts": 10, "retrieval_chance_R@1": 0.1, **{
        f"{d}_R@{k}": 0.5 for d in ("image_to_text", "text_to_image") for k in (1, 5)}})
    rows = {line[:18].strip(): line[18:].split() for line in format_table(results).splitlines()[2:8]}
    assert rows["zero-shot top-1"] == ["100.0%", "60.0%", "majority", "class"]
    assert rows["zero-shot top-5"] == ["100.0%", "100.0%", "uniform,", "5/5", "classes"]
    assert rows["image->text R@5"] == ["50.0%", "50.0%", "uniform,", "5/10", "images"]


def test_help_documents_the_label_format(capsys):
    from recipes.evaluate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "integer `label`" in text and "classnames.json next to the first eval shard" in text
    assert '"templates": [' in text and "majority class" in text
