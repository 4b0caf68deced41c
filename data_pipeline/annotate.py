"""Pyramid annotator: add `summary`, `objects` and `boxes` to every sample's JSON, writing new shards.

    python -m data_pipeline.annotate --in "DIR/train-{0000..0007}.tar" --out OUTDIR \
        [--summarizer PATH] [--detector PATH] [--processes 2]

Offline default (no model needed):
  summary - extractive: the head noun phrase of the caption (words before the first preposition or
            conjunction, at most 4 words), e.g. "a dog with a red ball on the grass" -> "a dog".
  objects - none (an empty list); boxes - none. Existing fields in a sample's JSON are kept.
Pluggable models, given by path (loaded locally, never downloaded):
  --summarizer PATH  a transformers seq2seq checkpoint folder (e.g. a local BART/T5): summary =
                     its generation from the caption.
  --detector PATH    a Python file defining `detect(image: PIL.Image) -> list[dict]` returning
                     [{"label": str, "attributes": [str], "box": [x0, y0, x1, y1] normalised}, ...].
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

_STOP_WORDS = frozenset(
    "with without and or in on of for at from over under by to into onto holding wearing showing near behind "
    "beside next while that which who is are , : ;".split()
)
_MAX_HEAD_WORDS = 4


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " , ").replace(":", " : ").replace(";", " ; ").split()


def head_noun_phrase(text: str) -> str:
    """Words before the first preposition/conjunction, keeping the last `_MAX_HEAD_WORDS` ("red heart")."""
    words = _words(text)
    head: list[str] = []
    for word in words:
        if word in _STOP_WORDS and head:
            break
        if word not in _STOP_WORDS:
            head.append(word)
    return " ".join(head[-_MAX_HEAD_WORDS:]) or text.strip().lower()


def name_objects(name: str) -> list[dict]:
    """Objects from a short name: one per "with"/"and" chunk, label = last word, attributes = the rest.
    "smiling face with open mouth" -> [face (smiling), mouth (open)]."""
    chunks, current = [], []
    for word in _words(name):
        if word in ("with", "and", "holding", "wearing", ","):
            chunks.append(current)
            current = []
        else:
            current.append(word)
    chunks.append(current)
    objects = []
    for chunk in chunks:
        head = head_noun_phrase(" ".join(chunk)).split() if chunk else []
        head = [w for w in head if w not in ("a", "an", "the")]
        if head:
            objects.append({"label": head[-1], "attributes": head[:-1]})
    return objects


def objects_text(objects: list[dict] | str | None) -> str:
    """The T_OA phrase list fed to the text tower: "smiling face, open mouth"."""
    if not objects:
        return ""
    if isinstance(objects, str):
        return objects
    return ", ".join(" ".join([*o.get("attributes", []), o["label"]]) for o in objects)


# ---------------------------------------------------------------- pluggable models

def load_summarizer(path: str | None) -> Callable[[str], str]:
    if not path:
        return lambda caption: head_noun_phrase(caption)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).eval()

    def summarize(caption: str) -> str:
        inputs = tokenizer(caption, return_tensors="pt", truncation=True)
        return tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0], skip_special_tokens=True).strip()

    return summarize


def load_detector(path: str | None) -> Callable | None:
    if not path:
        return None
    detect = runpy.run_path(path).get("detect")
    if detect is None:
        raise ValueError(f"detector file {path} defines no `detect(image)` function")
    return detect


# ---------------------------------------------------------------- shard rewriting

def annotate_shard(src: str, dst: str, summarizer_path: str | None, detector_path: str | None) -> int:
    """Copy shard `src` to `dst`, adding pyramid fields to each JSON. Returns samples written."""
    from PIL import Image

    from data_pipeline.tar_io import image_extension, iter_samples, write_shard

    summarize, detect = load_summarizer(summarizer_path), load_detector(detector_path)

    def annotated():
        for raw in iter_samples(src):
            meta = json.loads(raw.fields.get("json", b"{}") or b"{}")
            caption = raw.fields.get("txt", b"").decode("utf-8", "replace")
            if "summary" not in meta and caption.strip():
                meta["summary"] = summarize(caption)
            if detect is not None:
                image_ext = image_extension(raw.fields)
                if image_ext is not None:
                    found = detect(Image.open(io.BytesIO(raw.fields[image_ext])).convert("RGB"))
                    meta["objects"] = [{"label": d["label"], "attributes": list(d.get("attributes", []))} for d in found]
                    meta["boxes"] = [list(map(float, d["box"])) for d in found if "box" in d]
            meta.setdefault("objects", [])
            fields = dict(raw.fields, json=json.dumps(meta, sort_keys=True).encode())
            yield {"__key__": raw.key, **fields}

    return write_shard(dst, annotated())


def main() -> None:
    from data_pipeline.sources import expand_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inputs", required=True, help="shard spec (brace expansion, '::' lists)")
    parser.add_argument("--out", required=True, help="output folder (same shard file names)")
    parser.add_argument("--summarizer", default=None, help="local transformers seq2seq folder")
    parser.add_argument("--detector", default=None, help="Python file defining detect(image)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shards = expand_shards(args.inputs)
    todo = [(s, os.path.join(args.out, os.path.basename(s))) for s in shards]
    todo = [(s, d) for s, d in todo if not os.path.exists(d)]  # re-runs skip finished shards
    total = 0
    with ProcessPoolExecutor(args.processes) as pool:
        futures = [pool.submit(annotate_shard, s, d, args.summarizer, args.detector) for s, d in todo]
        for future in tqdm(futures, desc="annotate", unit="shard"):
            total += future.result()
    print(json.dumps({"annotated_shards": len(todo), "skipped_existing": len(shards) - len(todo), "samples": total}))


if __name__ == "__main__":
    main()
