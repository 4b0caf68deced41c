"""A labelled eval split of ours (shards + classnames.json) rewritten in the layouts CLIP_benchmark reads from disk.

    python -m data_pipeline.benchmark_layout --data "data/demo/eval-{0000..0001}.tar" --out data/demo_wds
    python -m data_pipeline.benchmark_layout --data "data/demo/eval-{0000..0001}.tar" --out data/demo_folder --layout folder

`wds` (CLIP_benchmark's `--dataset wds/<name> --dataset_root OUT`):
    OUT/test/{0..n-1}.tar  (members <key>.<image ext> and <key>.cls, the label as text)
    OUT/test/nshards.txt, OUT/classnames.txt, OUT/zeroshot_classification_templates.txt (`{c}` marks the class)
`folder`: OUT/<label as 4 digits>/<key>.<ext>, so that sorted folder order is label order; the class names
and templates go to OUT/classnames.json (our `{}` templates) for `recipes.evaluate --set image_folder`.
Image bytes are copied as they are (no re-encoding), so every reader decodes the same pixels. Unlabelled
samples (label -1) are left out.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

from data_pipeline.sources import expand_shards
from data_pipeline.tar_io import image_extension, iter_samples, write_shard

LAYOUTS = ("wds", "folder")


def labelled_samples(spec: str) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, image extension, image bytes, label) of every labelled sample, shards in order."""
    for url in expand_shards(spec):
        for raw in iter_samples(url):
            ext = image_extension(raw.fields)
            label = int(json.loads(raw.fields["json"]).get("label", -1)) if raw.fields.get("json") else -1
            if ext is not None and label >= 0:
                yield raw.key, ext, raw.fields[ext], label


def read_meta(spec: str, classnames: str = "") -> tuple[list[str], list[str]]:
    path = classnames or os.path.join(os.path.dirname(expand_shards(spec)[0]), "classnames.json")
    with open(path) as f:
        meta = json.load(f)
    return list(meta["classnames"]), list(meta.get("templates") or ["a photo of a {}."])


def write_wds(spec: str, out: str, classnames: str = "", per_shard: int = 1000) -> int:
    names, templates = read_meta(spec, classnames)
    os.makedirs(os.path.join(out, "test"), exist_ok=True)
    samples = [{"__key__": key, ext: data, "cls": str(label)} for key, ext, data, label in labelled_samples(spec)]
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)] or [[]]
    for i, shard in enumerate(shards):
        write_shard(os.path.join(out, "test", f"{i}.tar"), shard)
    _write(os.path.join(out, "test", "nshards.txt"), f"{len(shards)}\n")
    _write(os.path.join(out, "classnames.txt"), "\n".join(names) + "\n")
    # CLIP_benchmark fills templates with str.format(c=name); ours use a bare {}
    _write(os.path.join(out, "zeroshot_classification_templates.txt"),
           "\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
    return len(samples)


def write_folder(spec: str, out: str, classnames: str = "") -> int:
    names, templates = read_meta(spec, classnames)
    count = 0
    for key, ext, data, label in labelled_samples(spec):
        folder = os.path.join(out, f"{label:04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{key.replace('/', '_')}.{ext}"), "wb") as f:
            f.write(data)
        count += 1
    for label in range(len(names)):  # a class without samples still needs its folder, or labels shift
        os.makedirs(os.path.join(out, f"{label:04d}"), exist_ok=True)
    _write(os.path.join(out, "classnames.json"), json.dumps({"classnames": names, "templates": templates}, indent=1))
    return count


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled eval shards (brace spec)")
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=LAYOUTS, default="wds")
    p.add_argument("--classnames", default="", help="classnames.json (default: beside the first shard)")
    args = p.parse_args(argv)
    write = write_wds if args.layout == "wds" else write_folder
    print(f"{write(args.data, args.out, args.classnames)} labelled samples -> {args.out} ({args.layout})")


if __name__ == "__main__":
    main()
