import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
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
    samples = [s for i in range(3) for s in iter_samples(f"{out}/shard-{i:05d}.tar")]
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
    os.remove(os.path.join(out, "shard-00001.tar"))
    summary = build_shards.build(records, out, 10, processes=1)
    assert summary["built_now"] == 1 and summary["already_done"] == 2 and summary["samples"] == 20
    for name in ("shard-00000.tar", "shard-00002.tar"):
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
                                      "--samples-per-shard", "4", "--processes", "1"])
    build_shards.main()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 6
    # img2dataset's webdataset layout (tars) re-shards the same samples
    again = build_shards.build(build_shards.records_from_img2dataset(str(out)), str(tmp_path / "again"), 3, 1)
    assert again["shards"] == 2 and again["samples"] == 6
    meta = json.loads(next(iter_samples(str(tmp_path / "again" / "shard-00000.tar"))).fields["json"])
    assert meta["url"] == "http://x/0.jpg"
    cfg = DataConfig(train_shards=str(out / "shard-{00000..00001}.tar"), workers=0, shuffle_buffer=2)
    loader = build_train_loader(cfg, Tokenizer(), image_size=16, batch_size=3, rank=0, world_size=1, seed=0,
                                pyramid=False)
    assert next(iter(loader))["image"].shape == (3, 3, 16, 16)
