import json
import sys

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
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"annotated_shards": 2, "skipped_existing": 0,
                                                                    "samples": 10}
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
