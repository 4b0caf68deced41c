import json
import sys

import pytest

from data_pipeline import annotate
from data_pipeline.synthetic import make_shards
from data_pipeline.tar_io import iter_samples, write_shard


def test_extractive_rules():
    assert annotate.head_noun_phrase("a dog with a red ball on the grass") == "a dog"
    assert annotate.head_noun_phrase("red heart") == "red heart"
    assert annotate.head_noun_phrase("man in business suit levitating") == "man"
    objects = annotate.name_objects("smiling face with open mouth and smiling eyes")
    assert objects == [{"label": "face", "attributes": ["smiling"]}, {"label": "mouth", "attributes": ["open"]},
                       {"label": "eyes", "attributes": ["smiling"]}]
    assert annotate.objects_text(objects) == "smiling face, open mouth, smiling eyes"
    assert annotate.objects_text([]) == "" and annotate.objects_text(None) == ""


def strip_annotations(src: str, dst: str) -> None:
    def samples():
        for raw in iter_samples(src):
            yield {"__key__": raw.key, **raw.fields, "json": json.dumps({"label": 1}).encode()}
    write_shard(dst, samples())


def test_offline_default_adds_summary_and_no_objects(tmp_path, monkeypatch, capsys):
    paths = make_shards(str(tmp_path / "raw"), 2, 5, image_size=16)
    for i, path in enumerate(paths):
        strip_annotations(path, str(tmp_path / f"in-{i:04d}.tar"))
    out = tmp_path / "out"
    argv = ["annotate", "--in", f"{tmp_path}/in-{{0000..0001}}.tar", "--out", str(out), "--processes", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    annotate.main()
    printed = capsys.readouterr()
    assert json.loads(printed.out.splitlines()[-1]) == {
        "annotated_shards": 2, "skipped_existing": 0, "samples": 10,
        "levels": {"summary": 10, "objects": 0, "boxes": 0, "summary_is_caption": 0}}
    assert printed.err.count("in 0 of 10 samples") == 2 and "objects in 0 of 10 samples" in printed.err
    before, after = list(iter_samples(f"{tmp_path}/in-0000.tar")), list(iter_samples(f"{out}/in-0000.tar"))
    assert [s.key for s in before] == [s.key for s in after]
    for old, new in zip(before, after):
        meta = json.loads(new.fields["json"])
        caption = new.fields["txt"].decode()
        assert meta["label"] == 1 and meta["objects"] == [] and "boxes" not in meta
        assert meta["summary"] == caption.split(" on ")[0] and old.fields["jpg"] == new.fields["jpg"]
    annotate.main()  # re-run: finished shards are skipped
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped_existing"] == 2


def test_pluggable_detector(tmp_path):
    detector = tmp_path / "detector.py"
    detector.write_text(
        "def detect(image):\n"
        "    w, h = image.size\n"
        "    return [{'label': 'thing', 'attributes': ['small'], 'box': [0.1, 0.2, 0.5, 0.6]}]\n")
    src = make_shards(str(tmp_path / "raw"), 1, 3, image_size=16)[0]
    annotate.annotate_shard(src, str(tmp_path / "out.tar"), None, str(detector))
    for sample in iter_samples(str(tmp_path / "out.tar")):
        meta = json.loads(sample.fields["json"])
        assert meta["objects"] == [{"label": "thing", "attributes": ["small"]}]
        assert meta["boxes"] == [[0.1, 0.2, 0.5, 0.6]]


def tiny_seq2seq(folder, texts: list[str]) -> None:
    """A 1-layer T5 with random weights and a word-level tokenizer trained on `texts`, saved as a local folder.
    Generation must emit at least 3 real words (no pad/unk), so the summaries are visibly the model's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    model.generation_config = GenerationConfig(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                               min_new_tokens=3, bad_words_ids=[[0], [2]])
    model.save_pretrained(folder)


def test_local_seq2seq_summarizer(tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    src = str(tmp_path / "in.tar")
    strip_annotations(make_shards(str(tmp_path / "raw"), 1, 4, image_size=16)[0], src)
    captions = [s.fields["txt"].decode() for s in iter_samples(src)]
    tiny_seq2seq(tmp_path / "summarizer", captions)
    annotate.annotate_shard(src, str(tmp_path / "out.tar"), str(tmp_path / "summarizer"), None)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "summarizer")
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "summarizer").eval()
    summaries = []
    for caption, sample in zip(captions, iter_samples(str(tmp_path / "out.tar")), strict=True):
        summary = json.loads(sample.fields["json"])["summary"]
        ids = model.generate(**tokenizer(caption, return_tensors="pt"), max_new_tokens=20)[0]
        assert summary == tokenizer.decode(ids, skip_special_tokens=True).strip() and len(summary.split()) >= 3
        assert summary != annotate.head_noun_phrase(caption)  # the model's, not the extractive default
        summaries.append(summary)
    assert len(set(summaries)) > 1, "the summaries should depend on the caption"


def test_torchvision_detector_from_a_local_random_weights_file(tmp_path, capsys):
    """The real detector path: a torchvision Faster R-CNN built with random weights (nothing downloaded), saved as
    a state dict the way torchvision publishes its weights, loaded by file name; boxes and objects come out in
    step, boxes normalised, labels from the class list."""
    import torch
    import torchvision

    classes = ["__background__", "ball", "cup", "dog"]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None,
                                         num_classes=len(classes))
    torch.save(model.state_dict(), tmp_path / "detector.pth")
    make_shards(str(tmp_path / "raw"), 1, 3, image_size=48)
    argv = ["--in", f"{tmp_path}/raw/shard-0000.tar", "--out", str(tmp_path / "out"), "--processes", "1",
            "--detector", str(tmp_path / "detector.pth"), "--detector-arch", "fasterrcnn_mobilenet_v3_large_320_fpn",
            "--detector-classes", str(tmp_path / "classes.json"), "--score-threshold", "0", "--max-objects", "4"]
    annotate.main(argv)
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["samples"] == 3 and report["levels"]["objects"] == 3 and report["levels"]["boxes"] == 3
    for sample in iter_samples(str(tmp_path / "out" / "shard-0000.tar")):
        meta = json.loads(sample.fields["json"])
        assert 1 <= len(meta["objects"]) == len(meta["boxes"]) <= 4
        assert all(o["label"] in classes[1:] and o["attributes"] == [] for o in meta["objects"])
        for x0, y0, x1, y1 in meta["boxes"]:
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
    # what the trainer reads from them: boxes through the crop, object phrases for the text tower
    from data_pipeline.transforms import SampleTransform, ViewConfig

    sample = next(iter_samples(str(tmp_path / "out" / "shard-0000.tar")))
    views = SampleTransform(ViewConfig(image_size=32, pyramid=True, global_scale=(1.0, 1.0)))(sample)
    assert views["boxes_mask"].any() and views["objects"]

    # a weights file that does not fit the architecture: one line naming the file
    torch.save({"backbone.nope": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match="wrong.pth do not fit fasterrcnn_mobilenet_v3_large_320_fpn with 4 classes"):
        annotate.main([*argv[:3], str(tmp_path / "again"), *argv[4:6], "--detector", str(tmp_path / "wrong.pth"),
                       *argv[8:]])
