import io
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.tar_io import iter_samples
from data_pipeline.tokenizer import Tokenizer

N = 23  # 20 good + 1 missing image + 1 empty caption + 1 file that is not an image


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        name = f"img{i:03d}." + ("png" if i % 2 else "jpg")
        if i != 5:  # image 5 is listed in the table but missing on disk
            if i == 9:
                (folder / name).write_bytes(b"this is not an image")
            else:
                Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"image": name, "caption": "" if i == 7 else f"picture number {i}", "score": i / 10})
    return folder, rows


def write_table(rows, path):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("image{0}caption{0}score\n".format(sep) + "".join(
            f"{r['image']}{sep}{r['caption']}{sep}{r['score']}\n" for r in rows))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_folder_plus_table_to_shards(image_folder, tmp_path, fmt):
    folder, rows = image_folder
    table = tmp_path / f"captions.{fmt}"
    write_table(rows, table)
    out = str(tmp_path / "out")
    records = build_shards.records_from_table(str(folder), str(table), "image", "caption")
    summary = build_shards.build(records, out, samples_per_shard=10, processes=2)
    assert summary["shards"] == 3 and summary["samples"] == 20
    assert summary["skipped"] == {"missing_image": 1, "missing_caption": 1, "corrupt_image": 1}
    assert json.load(open(os.path.join(out, "stats.json")))["samples"] == 20
    samples = [s for i in range(3) for s in iter_samples(f"{out}/shard-{i:04d}.tar")]
    assert len(samples) == 20 and len({s.key for s in samples}) == 20
    first = samples[0]
    meta = json.loads(first.fields["json"])
    assert first.fields["txt"] == b"picture number 0" and meta["source_file"] == "img000.jpg"
    assert (meta["width"], meta["height"]) == (16, 12) and float(meta["score"]) == 0.0
    assert first.fields["jpg"] == (folder / "img000.jpg").read_bytes()  # bytes copied, not re-encoded


def test_rerun_skips_finished_shards(image_folder, tmp_path):
    folder, rows = image_folder
    write_table(rows, tmp_path / "captions.csv")
    records = build_shards.records_from_table(str(folder), str(tmp_path / "captions.csv"), "image", "caption")
    out = str(tmp_path / "out")
    build_shards.build(records, out, 10, processes=1)
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    os.remove(os.path.join(out, "shard-0001.tar"))
    summary = build_shards.build(records, out, 10, processes=1)
    assert summary["built_now"] == 1 and summary["already_done"] == 2 and summary["samples"] == 20
    for name in ("shard-0000.tar", "shard-0002.tar"):
        assert os.stat(os.path.join(out, name)).st_mtime_ns == stamps[name]


def test_img2dataset_layouts_and_loader_reads_output(tmp_path, monkeypatch, capsys):
    files = tmp_path / "i2d" / "00000"
    files.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(files / f"00000{i:04d}.jpg")
        (files / f"00000{i:04d}.txt").write_text(f"a red square, shade {i}")
        (files / f"00000{i:04d}.json").write_text(json.dumps({"url": f"http://x/{i}.jpg"}))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["build_shards", "--img2dataset", str(tmp_path / "i2d"), "--out", str(out),
                                      "--samples-per-shard", "4", "--processes", "1", "--no-shuffle"])
    build_shards.main()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 6
    # img2dataset's webdataset layout (tars) re-shards the same samples
    again = build_shards.build(build_shards.records_from_img2dataset(str(out)), str(tmp_path / "again"), 3, 1)
    assert again["shards"] == 2 and again["samples"] == 6
    meta = json.loads(next(iter_samples(str(tmp_path / "again" / "shard-0000.tar"))).fields["json"])
    assert meta["url"] == "http://x/0.jpg"
    cfg = DataConfig(train_shards=str(out / "shard-{0000..0001}.tar"), workers=0, shuffle_buffer=2)
    loader = build_train_loader(cfg, Tokenizer(), image_size=16, batch_size=3, rank=0, world_size=1, seed=0,
                                pyramid=False)
    assert next(iter(loader))["image"].shape == (3, 3, 16, 16)


# ---------------------------------------------------------------- bring your own data: order, split, labels, alpha

CATEGORIES = ("bird", "cat", "dog", "fish")


def category_folder(root, per_class: int = 10):
    """root/<category>/<i>.png with a caption file beside each image, and the same rows as a sorted table."""
    rows = []
    for c, category in enumerate(CATEGORIES):
        (root / category).mkdir(parents=True)
        for i in range(per_class):
            name = f"{category}/{i:02d}.png"
            Image.new("RGB", (8, 8), (c * 60, i * 20, 0)).save(root / name)
            (root / category / f"{i:02d}.txt").write_text(f"a {category} number {i}")
            rows.append({"image": name, "caption": f"a {category} number {i}", "score": 0, "kind": category})
    return rows


def shard_samples(folder):
    return [s for path in sorted(folder.glob("*.tar")) for s in iter_samples(str(path))]


def run_main(*argv):
    build_shards.main([*map(str, argv), "--processes", "1"])


def test_alpha_is_composited_onto_the_background_and_counted(tmp_path):
    folder = tmp_path / "images"
    (folder / "stamps").mkdir(parents=True)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red
    rgba[0, 1] = (0, 0, 200, 128)  # half-transparent blue; the rest is fully transparent black
    Image.fromarray(rgba, "RGBA").save(folder / "stamps" / "rgba.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 1), 1)
    palette.save(folder / "stamps" / "palette.png", transparency=0)  # index 0 (black) is transparent
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "stamps" / "opaque.jpg")
    for name in ("rgba", "palette", "opaque"):
        (folder / "stamps" / f"{name}.txt").write_text(f"a {name} stamp")

    def pixels(out):
        samples = {json.loads(s.fields["json"])["source_file"]: s for s in shard_samples(out)}
        return {name.split("/")[1].split(".")[0]: np.asarray(Image.open(io.BytesIO(s.fields.get("png") or s.fields["jpg"])))
                for name, s in samples.items()}, samples

    run_main("--images", folder, "--out", tmp_path / "white")
    white, samples = pixels(tmp_path / "white")
    assert json.load(open(tmp_path / "white" / "stats.json"))["alpha_composited"] == 2
    assert white["rgba"].shape == (4, 4, 3) and "png" in samples["stamps/rgba.png"].fields
    assert (white["rgba"][0, 0] == (200, 10, 10)).all() and (white["rgba"][3, 3] == 255).all()
    assert np.abs(white["rgba"][0, 1].astype(int) - (127, 127, 227)).max() <= 1  # 50% blue over white
    assert (white["palette"][0, 0] == 255).all() and (white["palette"][1, 1] == (0, 255, 0)).all()
    assert samples["stamps/opaque.jpg"].fields["jpg"] == (folder / "stamps" / "opaque.jpg").read_bytes()

    run_main("--images", folder, "--out", tmp_path / "grey", "--background", "#808080")
    grey, _ = pixels(tmp_path / "grey")
    assert (grey["rgba"][3, 3] == 128).all() and (grey["palette"][0, 0] == 128).all()
    with pytest.raises(SystemExit, match="--background 'nocolour'"):
        run_main("--images", folder, "--out", tmp_path / "bad", "--background", "nocolour")


def test_shuffle_is_seeded_and_mixes_a_sorted_table(tmp_path):
    rows = category_folder(tmp_path / "images")
    write_table(rows, tmp_path / "sorted.csv")
    write_table(rows[::-1], tmp_path / "reversed.csv")

    def shards(table, out, *extra):
        run_main("--images", tmp_path / "images", "--captions", tmp_path / table, "--out", tmp_path / out,
                 "--samples-per-shard", 10, *extra)
        return [[s.fields["txt"].decode().split()[1] for s in iter_samples(str(path))]
                for path in sorted((tmp_path / out).glob("*.tar"))]

    kept = shards("sorted.csv", "kept", "--no-shuffle")
    assert [set(shard) for shard in kept] == [{c} for c in CATEGORIES]  # what the issue saw: one class per shard
    mixed = shards("sorted.csv", "seed0")
    assert len(mixed) == 4 and all(len(set(shard)) >= 2 for shard in mixed)
    assert sorted(c for shard in mixed for c in shard) == sorted(c for shard in kept for c in shard)
    again = shards("reversed.csv", "seed0_reversed")  # same seed, input order does not matter
    assert again == mixed
    assert (tmp_path / "seed0" / "shard-0000.tar").read_bytes() == (tmp_path / "seed0_reversed" / "shard-0000.tar").read_bytes()
    assert shards("sorted.csv", "seed1", "--seed", 1) != mixed


def test_val_fraction_writes_two_splits_with_their_own_stats(tmp_path):
    category_folder(tmp_path / "images")
    out = tmp_path / "out"
    run_main("--images", tmp_path / "images", "--out", out, "--val-fraction", 0.25, "--samples-per-shard", 8)
    train, held_out = shard_samples(out / "train"), shard_samples(out / "eval")
    assert (len(train), len(held_out)) == (30, 10)
    names = [{json.loads(s.fields["json"])["source_file"] for s in part} for part in (train, held_out)]
    assert not names[0] & names[1] and len(names[0] | names[1]) == 40
    for split, samples, shards in (("train", 30, 4), ("eval", 10, 2)):
        stats = json.load(open(out / split / "stats.json"))
        assert (stats["samples"], stats["shards"], stats["pattern"]) == (samples, shards, f"shard-{{0000..{shards - 1:04d}}}.tar")
    assert not (out / "stats.json").exists() and not (out / "train" / "classnames.json").exists()
    with pytest.raises(SystemExit, match="describes shards 'shard-\\*', not 'other-\\*'"):
        run_main("--images", tmp_path / "images", "--out", out / "train", "--prefix", "other")
    with pytest.raises(SystemExit, match="--val-fraction must be in"):
        run_main("--images", tmp_path / "images", "--out", tmp_path / "x", "--val-fraction", 1.5)


def test_labels_from_folders_reach_the_eval_shards_and_classnames_json(tmp_path):
    category_folder(tmp_path / "images")
    (tmp_path / "prompts.txt").write_text("a photo of a {}.\n\na {} stamp\n")
    out = tmp_path / "out"
    run_main("--images", tmp_path / "images", "--out", out, "--val-fraction", 0.5, "--labels-from-folders",
             "--templates", tmp_path / "prompts.txt")
    meta = json.load(open(out / "eval" / "classnames.json"))
    assert meta["classnames"] == list(CATEGORIES) and meta["templates"] == ["a photo of a {}.", "a {} stamp"]
    assert meta["chance"] == 0.25 and sum(meta["class_counts"].values()) == 20
    assert meta["majority"] == max(meta["class_counts"].values()) / 20
    for sample in shard_samples(out / "eval"):
        info = json.loads(sample.fields["json"])
        folder = info["source_file"].split("/")[0]
        assert info["classname"] == folder and info["label"] == CATEGORIES.index(folder)
    # what recipes.evaluate reads: the eval loader's labels and classnames.json next to the first shard
    from data_pipeline.loader import build_eval_loader, load_classnames

    cfg = DataConfig(eval_shards=str(out / "eval" / "shard-0000.tar"), workers=0)
    labels = torch.cat([b["label"] for b in build_eval_loader(cfg, Tokenizer(), image_size=8, batch_size=7)])
    assert len(labels) == 20 and set(labels.tolist()) <= set(range(4)) and (labels >= 0).all()
    assert load_classnames(cfg)[0] == list(CATEGORIES)


def test_labels_from_a_table_column(tmp_path):
    rows = category_folder(tmp_path / "images")
    rows[3]["kind"] = ""
    write_table(rows[:3] + rows[4:], tmp_path / "captions.parquet")
    run_main("--images", tmp_path / "images", "--captions", tmp_path / "captions.parquet", "--out", tmp_path / "out",
             "--label-column", "kind")
    assert json.load(open(tmp_path / "out" / "classnames.json"))["classnames"] == list(CATEGORIES)
    labels = {json.loads(s.fields["json"])["source_file"]: json.loads(s.fields["json"])["label"]
              for s in shard_samples(tmp_path / "out")}
    assert labels["dog/05.png"] == 2 and len(labels) == 39
    write_table(rows, tmp_path / "gap.parquet")
    with pytest.raises(SystemExit, match="bird/03.png: no value in label column 'kind'"):
        run_main("--images", tmp_path / "images", "--captions", tmp_path / "gap.parquet", "--out", tmp_path / "x",
                 "--label-column", "kind")


def test_labels_from_img2dataset_json_in_its_tar_shards(tmp_path):
    from data_pipeline.tar_io import write_shard

    (tmp_path / "i2d").mkdir()
    for t in range(2):  # img2dataset's webdataset layout, its JSON holding a saved additional column
        samples = []
        for i in range(6):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buffer, format="JPEG")
            samples.append({"__key__": f"{t:05d}{i:04d}", "jpg": buffer.getvalue(), "txt": f"thing {t} {i}",
                            "json": json.dumps({"url": f"http://x/{t}/{i}", "category": CATEGORIES[i % 3]})})
        write_shard(str(tmp_path / "i2d" / f"{t:05d}.tar"), samples)
    out = tmp_path / "out"
    run_main("--img2dataset", tmp_path / "i2d", "--out", out, "--label-column", "category", "--val-fraction", 0.5)
    assert json.load(open(out / "eval" / "classnames.json"))["classnames"] == list(CATEGORIES[:3])
    for split in ("train", "eval"):
        samples = shard_samples(out / split)
        assert len(samples) == 6
        for sample in samples:
            meta = json.loads(sample.fields["json"])
            assert meta["label"] == CATEGORIES.index(meta["category"]) and meta["url"].startswith("http://x/")
