r"""Build webdataset shards from an image folder (captions in a table or in sidecar .txt files), or from
img2dataset output; optionally hold out a labelled eval split for zero-shot evaluation.

    python -m data_pipeline.build_shards --images DIR --captions captions.{csv,tsv,jsonl,parquet} --out OUT \
        [--image-column image] [--caption-column caption] [--label-column COL | --labels-from-folders]
    python -m data_pipeline.build_shards --images DIR --out OUT   # captions in DIR/**/{name}.txt beside each image
    python -m data_pipeline.build_shards --img2dataset DIR --out OUT   # its "files" layout or its .tar shards
    ... [--val-fraction 0.1] [--templates prompts.txt] [--seed 0 | --no-shuffle] [--background white]

Writes OUT/{prefix}-{0000..}.tar with `{key}.{jpg|png|webp}`, `{key}.txt`, `{key}.json` (the table row's
other columns or the sidecar JSON, plus the source file name, image size and, with labels, the integer
`label` and its `classname`) and OUT/stats.json (samples, bytes, skipped per reason, images composited,
per shard and in total). With --val-fraction F the images are split (each image, with all its captions,
goes to one side) into OUT/train/ and OUT/eval/, each with its own shards and stats.json; the eval folder
also gets classnames.json ({"classnames", "templates", "chance", "majority"}), which recipes.evaluate reads
next to the first eval shard. Without a split, labels give OUT/classnames.json.

- Order: samples are shuffled by a hash of (--seed, source file), so a table sorted by category still gives
  mixed shards, the same for a given seed whatever the input order; --no-shuffle keeps the input order.
- Labels: --label-column names a table column (or a key of img2dataset's JSON); --labels-from-folders uses
  the first folder of each image's path under DIR (DIR/cat/001.png -> "cat"). Classes are numbered in
  sorted order of their names.
- Transparency: images with an alpha channel are composited onto --background (default white; any PIL
  colour, e.g. black or "#808080"; "none" keeps the alpha, which the reader then drops) and stored as PNG.
- Shard numbers have 4 digits (as the demo's), more from 10,000 shards on; stats.json gives the brace pattern
  (the file name when there is one shard).
Shards are planned deterministically; each is written atomically, so a re-run skips the shards that exist
and only builds the rest. Samples whose image is missing or whose header does not parse, or whose caption is
empty, are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, ImageColor
from tqdm import tqdm

from data_pipeline.config import DEFAULT_TEMPLATES
from data_pipeline.tar_io import IMAGE_EXTENSIONS, image_extension, iter_samples, write_shard

STATS_DIR = "_stats"
MIN_SHARD_DIGITS = 4  # as data_pipeline/demo_data.py names its shards
SPLITS = ("train", "eval")


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


def records_from_files(folder: str) -> list[Record]:
    """Every image under `folder` with its caption from `{name}.txt` and metadata from `{name}.json` beside it
    (img2dataset's "files" layout, or a plain folder of captioned images)."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(path)
        if ext.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            continue
        caption = open(stem + ".txt", encoding="utf-8").read() if os.path.exists(stem + ".txt") else ""
        meta = json.load(open(stem + ".json")) if os.path.exists(stem + ".json") else {}
        records.append(Record(image_path=path, image_ext=ext.lower(), caption=caption,
                              meta={**meta, "source_file": os.path.relpath(path, folder)}))
    return records


def records_from_img2dataset(folder: str, keep_columns: tuple[str, ...] = ()) -> list[Record]:
    """img2dataset output: the "files" layout ({key}.jpg + .txt + .json) or its webdataset .tar shards.
    For tars only (path, offset) is planned; `keep_columns` are read from each sample's JSON now (labels)."""
    records = []
    tars = sorted(glob.glob(os.path.join(folder, "**", "*.tar"), recursive=True))
    for tar in tars:  # the bytes are read again by the process that writes
        for raw in iter_samples(tar):
            meta = json.loads(raw.fields["json"]) if keep_columns and raw.fields.get("json") else {}
            records.append(Record(tar=(tar, raw.offset), meta={
                **{k: meta[k] for k in keep_columns if k in meta},
                "source_file": f"{os.path.basename(tar)}:{raw.key}"}))
    return records if tars else records_from_files(folder)


# ---------------------------------------------------------------------- order, split, labels

def _rank(seed: int, source_file: str) -> str:
    return hashlib.sha1(f"{seed}/{source_file}".encode()).hexdigest()


def shuffle(records: list[Record], seed: int) -> list[Record]:
    """A seeded permutation that depends on the samples, not on their input order (captions of one image stay
    together)."""
    return sorted(records, key=lambda r: _rank(seed, r.meta["source_file"]))


def split(records: list[Record], val_fraction: float, seed: int) -> dict[str, list[Record]]:
    """{"train", "eval"}: round(val_fraction x images) images, drawn by the seed, go to eval with all their
    captions; the input order is kept within each side."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    images = sorted({r.meta["source_file"] for r in records}, key=lambda name: _rank(seed, "split/" + name))
    held_out = set(images[:round(val_fraction * len(images))])
    if not held_out or len(held_out) == len(images):
        raise ValueError(f"--val-fraction {val_fraction} of {len(images)} images leaves "
                         f"{'no eval' if not held_out else 'no train'} images")
    return {"train": [r for r in records if r.meta["source_file"] not in held_out],
            "eval": [r for r in records if r.meta["source_file"] in held_out]}


def folder_label(record: Record) -> str:
    parts = record.meta["source_file"].replace(os.sep, "/").split("/")
    if len(parts) < 2:
        raise ValueError(f"--labels-from-folders: image {record.meta['source_file']} is not inside a class folder")
    return parts[0]


def assign_labels(records: list[Record], label_of) -> list[str]:
    """Set meta `label` (int, classes in sorted name order) and `classname` on every record; returns the names."""
    names = [str(label_of(r)).strip() for r in records]
    for record, name in zip(records, names):
        if not name:
            raise ValueError(f"image {record.meta['source_file']}: empty label")
    classnames = sorted(set(names))
    index = {name: i for i, name in enumerate(classnames)}
    for record, name in zip(records, names):
        record.meta.update(label=index[name], classname=name)
    return classnames


def column_label(column: str):
    def label_of(record: Record) -> str:
        if record.meta.get(column) in (None, ""):
            raise ValueError(f"image {record.meta['source_file']}: no value in label column '{column}'")
        return record.meta[column]

    return label_of


def write_classnames(folder: str, classnames: list[str], templates: list[str], records: list[Record]) -> dict:
    """classnames.json for recipes.evaluate: names, prompt templates ("{}" = the name), and chance levels."""
    counts = Counter(r.meta["label"] for r in records)
    meta = {"classnames": classnames, "templates": templates, "chance": 1.0 / len(classnames),
            "majority": max(counts.values()) / len(records) if records else 0.0,
            "class_counts": {classnames[i]: counts.get(i, 0) for i in range(len(classnames))}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "classnames.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# ---------------------------------------------------------------------- writing one shard

def shard_digits(num_shards: int) -> int:
    return max(MIN_SHARD_DIGITS, len(str(max(num_shards - 1, 0))))


def parse_background(value: str) -> tuple[int, int, int] | None:
    """A PIL colour ("white", "#808080", "rgb(0,0,0)") or "none" (keep the alpha channel)."""
    if value.lower() == "none":
        return None
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError as e:
        raise ValueError(f"--background {value!r}: not a colour (a name, #rrggbb, or none)") from e


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten_alpha(data: bytes, background: tuple[int, int, int]) -> bytes | None:
    """PNG bytes of the image composited onto `background`, or None when it has no alpha channel."""
    with Image.open(io.BytesIO(data)) as image:
        if not _has_alpha(image):
            return None
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    buffer = io.BytesIO()
    Image.alpha_composite(canvas, rgba).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


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


@dataclass(frozen=True)
class ShardNames:
    out: str
    prefix: str
    digits: int

    def shard(self, index: int) -> str:
        return os.path.join(self.out, f"{self.prefix}-{index:0{self.digits}d}.tar")

    def stats(self, index: int) -> str:
        return os.path.join(self.out, STATS_DIR, f"{self.prefix}-{index:0{self.digits}d}.json")


def build_shard(index: int, records: list[Record], names: ShardNames,
                background: tuple[int, int, int] | None = (255, 255, 255)) -> dict:
    """Write shard `index` and its stats sidecar; returns the stats."""
    path = names.shard(index)
    skipped: Counter = Counter()
    composited = 0
    key_digits = max(4, len(str(max(len(records) - 1, 0))))

    def samples():
        nonlocal composited
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
                flat = flatten_alpha(data, background) if background is not None else None
            except Exception:  # PIL raises several types for bad headers and data
                skipped["corrupt_image"] += 1
                continue
            if flat is not None:
                data, ext, composited = flat, ".png", composited + 1
            ext = {".jpeg": "jpg"}.get(ext, ext.lstrip(".") or "jpg")
            meta = {**meta, "width": width, "height": height}
            yield {"__key__": f"{index:0{names.digits}d}{position:0{key_digits}d}", ext: data,
                   "txt": caption.strip(), "json": json.dumps(meta, sort_keys=True, default=str)}

    written = write_shard(path, samples())
    stats = {"shard": os.path.basename(path), "samples": written, "bytes": os.path.getsize(path),
             "skipped": dict(skipped), "alpha_composited": composited}
    with open(names.stats(index), "w") as f:
        json.dump(stats, f)
    return stats


def build(records: list[Record], out: str, samples_per_shard: int, processes: int, prefix: str = "shard",
          background: tuple[int, int, int] | None = (255, 255, 255)) -> dict:
    """Plan shards of `samples_per_shard` records in the given order, build the missing ones in parallel, write
    stats.json. A stats.json of another prefix in `out` is refused (it would be overwritten)."""
    stats_path = os.path.join(out, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            previous = json.load(f).get("prefix", "shard")
        if previous != prefix:
            raise ValueError(f"{stats_path} describes shards '{previous}-*', not '{prefix}-*': build each set of "
                             f"shards into its own --out (or use --val-fraction for train/eval)")
    os.makedirs(os.path.join(out, STATS_DIR), exist_ok=True)
    plan = [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]
    names = ShardNames(out, prefix, shard_digits(len(plan)))
    todo = [i for i in range(len(plan)) if not (os.path.exists(names.shard(i)) and os.path.exists(names.stats(i)))]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        futures = [pool.submit(build_shard, i, plan[i], names, background) for i in todo]
        for future in tqdm(futures, desc=f"shards {out}", unit="shard", disable=None):
            future.result()
    per_shard = []
    for i in range(len(plan)):
        with open(names.stats(i)) as f:
            per_shard.append(json.load(f))
    skipped: Counter = Counter()
    for stats in per_shard:
        skipped.update(stats["skipped"])
    last = f"{len(plan) - 1:0{names.digits}d}"
    summary = {
        "prefix": prefix,
        "shards": len(plan),
        "built_now": len(todo),
        "already_done": len(plan) - len(todo),
        "samples": sum(s["samples"] for s in per_shard),
        "bytes": sum(s["bytes"] for s in per_shard),
        "skipped": dict(skipped),
        "alpha_composited": sum(s.get("alpha_composited", 0) for s in per_shard),
        "pattern": (f"{prefix}-{{{0:0{names.digits}d}..{last}}}.tar" if len(plan) > 1
                    else os.path.basename(names.shard(0)) if plan else ""),
        "per_shard": per_shard,
    }
    with open(stats_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (captions from --captions, else from {name}.txt files)")
    source.add_argument("--img2dataset", help="img2dataset output folder")
    parser.add_argument("--captions", help="caption table: csv, tsv, jsonl or parquet")
    parser.add_argument("--image-column", default="image", help="table column with the image path under --images")
    parser.add_argument("--caption-column", default="caption")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--label-column", help="class of each image: a table column (or img2dataset JSON key)")
    labels.add_argument("--labels-from-folders", action="store_true",
                        help="class of each image: its first folder under --images")
    parser.add_argument("--templates", help="zero-shot prompt templates for classnames.json, one per line with {}")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this fraction of the images as OUT/eval (the rest: OUT/train)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and split seed")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order in the shards")
    parser.add_argument("--background", default="white", help="colour under transparent pixels, or none")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prefix", default="shard")
    args = parser.parse_args(argv)
    if args.labels_from_folders and not args.images:
        parser.error("--labels-from-folders needs --images")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        background = parse_background(args.background)
        if args.images:
            records = (records_from_table(args.images, args.captions, args.image_column, args.caption_column)
                       if args.captions else records_from_files(args.images))
        else:
            keep = (args.label_column,) if args.label_column else ()
            records = records_from_img2dataset(args.img2dataset, keep)
        if not records:
            raise ValueError(f"no images found in {args.images or args.img2dataset}")
        classnames = []
        if args.label_column or args.labels_from_folders:
            classnames = assign_labels(records, folder_label if args.labels_from_folders
                                       else column_label(args.label_column))
        if not args.no_shuffle:
            records = shuffle(records, args.seed)
        splits = split(records, args.val_fraction, args.seed) if args.val_fraction else {"": records}
        if args.templates:
            with open(args.templates, encoding="utf-8") as f:
                templates = [t.strip() for t in f if t.strip()]
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise ValueError(f"--templates {args.templates}: line {bad[0]!r} has no {{}} for the class name")
        else:
            templates = list(DEFAULT_TEMPLATES)
        report = {}
        for name, part in splits.items():
            out = os.path.join(args.out, name) if name else args.out
            summary = build(part, out, args.samples_per_shard, args.processes, args.prefix, background)
            if classnames and name != "train":
                summary["classnames"] = write_classnames(out, classnames, templates, part)["class_counts"]
            report[name or "all"] = {"out": out, **{k: v for k, v in summary.items() if k != "per_shard"}}
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(report if len(report) > 1 else report["all"]))


if __name__ == "__main__":
    main()
