"""Build webdataset shards from an image folder + caption table, or from img2dataset output.

    python -m data_pipeline.build_shards --images DIR --captions captions.{csv,tsv,jsonl,parquet} \
        --out OUT [--samples-per-shard 10000] [--processes 4] [--image-column image] [--caption-column caption]
    python -m data_pipeline.build_shards --img2dataset DIR --out OUT      # "files" layout or its .tar shards

Writes OUT/{prefix}-{00000..}.tar with `{key}.{jpg|png|webp}`, `{key}.txt`, `{key}.json` (the table row's
other columns plus the source file name and image size) and OUT/stats.json (samples, bytes, skipped per
reason, per shard and in total). Shards are planned deterministically from the sorted inputs; each is
written atomically, so a re-run skips the shards that exist and only builds the rest. Samples whose image
is missing or whose header does not parse, or whose caption is empty, are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from data_pipeline.tar_io import IMAGE_EXTENSIONS, image_extension, iter_samples, write_shard

STATS_DIR = "_stats"


@dataclass
class Record:
    """One planned sample: an image file + caption + metadata, or a sample inside a tar (read when built)."""

    image_path: str = ""
    image_ext: str = ""
    caption: str = ""
    meta: dict = field(default_factory=dict)
    tar: tuple[str, int] | None = None  # (shard path, byte offset of the sample)


# ---------------------------------------------------------------------- reading inputs

def read_table(path: str) -> list[dict]:
    """Rows of a CSV, TSV, JSONL or parquet caption table, as dicts."""
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == "tsv" else ","))
    if suffix in ("jsonl", "json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"caption table {path}: unknown format .{suffix} (use csv, tsv, jsonl or parquet)")


def records_from_table(images: str, table: str, image_column: str, caption_column: str) -> list[Record]:
    rows = read_table(table)
    if rows and (image_column not in rows[0] or caption_column not in rows[0]):
        raise ValueError(f"caption table {table}: needs columns '{image_column}' and '{caption_column}', "
                         f"has {sorted(rows[0])}")
    records = []
    for row in rows:
        name = str(row[image_column])
        meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        records.append(Record(image_path=os.path.join(images, name), image_ext=os.path.splitext(name)[1].lower(),
                              caption=str(row[caption_column] or ""), meta={**meta, "source_file": name}))
    return records


def records_from_img2dataset(folder: str) -> list[Record]:
    """img2dataset output: the "files" layout ({key}.jpg + .txt + .json) or its webdataset .tar shards."""
    records = []
    tars = sorted(glob.glob(os.path.join(folder, "**", "*.tar"), recursive=True))
    for tar in tars:  # plan by (path, offset) only: the bytes are read again by the process that writes
        records += [Record(tar=(tar, raw.offset), meta={"source_file": f"{os.path.basename(tar)}:{raw.key}"})
                    for raw in iter_samples(tar)]
    if tars:
        return records
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(path)
        if ext.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            continue
        caption = open(stem + ".txt", encoding="utf-8").read() if os.path.exists(stem + ".txt") else ""
        meta = json.load(open(stem + ".json")) if os.path.exists(stem + ".json") else {}
        records.append(Record(image_path=path, image_ext=ext.lower(), caption=caption,
                              meta={**meta, "source_file": os.path.relpath(path, folder)}))
    return records


# ---------------------------------------------------------------------- writing one shard

def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only; raises on data that is not an image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def load_record(record: Record) -> tuple[bytes | None, str, str, dict]:
    """(image bytes or None when absent, image extension, caption, metadata) of one planned sample."""
    if record.tar is None:
        data = open(record.image_path, "rb").read() if os.path.exists(record.image_path) else None
        return data, record.image_ext, record.caption, record.meta
    path, offset = record.tar
    raw = next(iter_samples(path, offset))
    ext = image_extension(raw.fields)
    meta = json.loads(raw.fields["json"]) if raw.fields.get("json") else {}
    caption = raw.fields.get("txt", b"").decode("utf-8", "replace")
    return (raw.fields[ext], f".{ext}", caption, {**meta, **record.meta}) if ext else (None, "", caption, meta)


def build_shard(index: int, records: list[Record], out: str, prefix: str) -> dict:
    """Write shard `index` and its stats sidecar; returns the stats."""
    path = os.path.join(out, f"{prefix}-{index:05d}.tar")
    skipped: Counter = Counter()

    def samples():
        for position, record in enumerate(records):
            data, ext, caption, meta = load_record(record)
            if not caption.strip():
                skipped["missing_caption"] += 1
                continue
            if data is None:
                skipped["missing_image"] += 1
                continue
            try:
                width, height = _image_size(data)
            except Exception:  # PIL raises several types for bad headers
                skipped["corrupt_image"] += 1
                continue
            ext = {".jpeg": "jpg"}.get(ext, ext.lstrip(".") or "jpg")
            meta = {**meta, "width": width, "height": height}
            yield {"__key__": f"{index:05d}{position:04d}", ext: data, "txt": caption.strip(),
                   "json": json.dumps(meta, sort_keys=True, default=str)}

    written = write_shard(path, samples())
    stats = {"shard": os.path.basename(path), "samples": written, "bytes": os.path.getsize(path),
             "skipped": dict(skipped)}
    with open(os.path.join(out, STATS_DIR, f"{prefix}-{index:05d}.json"), "w") as f:
        json.dump(stats, f)
    return stats


def build(records: list[Record], out: str, samples_per_shard: int, processes: int, prefix: str = "shard") -> dict:
    """Plan shards of `samples_per_shard` records, build the missing ones in parallel, write stats.json."""
    os.makedirs(os.path.join(out, STATS_DIR), exist_ok=True)
    plan = [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]

    def done(index: int) -> bool:
        return os.path.exists(os.path.join(out, f"{prefix}-{index:05d}.tar")) and \
            os.path.exists(os.path.join(out, STATS_DIR, f"{prefix}-{index:05d}.json"))

    todo = [i for i in range(len(plan)) if not done(i)]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        futures = [pool.submit(build_shard, i, plan[i], out, prefix) for i in todo]
        for future in tqdm(futures, desc="shards", unit="shard", disable=None):
            future.result()
    per_shard = []
    for i in range(len(plan)):
        with open(os.path.join(out, STATS_DIR, f"{prefix}-{i:05d}.json")) as f:
            per_shard.append(json.load(f))
    skipped: Counter = Counter()
    for stats in per_shard:
        skipped.update(stats["skipped"])
    summary = {
        "shards": len(plan),
        "built_now": len(todo),
        "already_done": len(plan) - len(todo),
        "samples": sum(s["samples"] for s in per_shard),
        "bytes": sum(s["bytes"] for s in per_shard),
        "skipped": dict(skipped),
        "pattern": f"{prefix}-{{00000..{len(plan) - 1:05d}}}.tar" if plan else "",
        "per_shard": per_shard,
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (with --captions)")
    source.add_argument("--img2dataset", help="img2dataset output folder")
    parser.add_argument("--captions", help="caption table: csv, tsv, jsonl or parquet")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prefix", default="shard")
    args = parser.parse_args()
    if args.images and not args.captions:
        parser.error("--images needs --captions")
    records = (records_from_table(args.images, args.captions, args.image_column, args.caption_column)
               if args.images else records_from_img2dataset(args.img2dataset))
    summary = build(records, args.out, args.samples_per_shard, args.processes, args.prefix)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_shard"}))


if __name__ == "__main__":
    main()
