r"""Pyramid annotator: add `summary`, `objects` and `boxes` to every sample's JSON, writing new shards.

    python -m data_pipeline.annotate --in "DIR/train-{0000..0007}.tar" --out OUTDIR \
        [--summarizer PATH] [--detector PATH [--detector-arch NAME] [--detector-classes FILE]] [--processes 2]

Offline default (no model needed):
  summary - extractive: the head noun phrase of the caption (words before the first preposition or
            conjunction, at most 4 words), e.g. "a dog with a red ball on the grass" -> "a dog".
  objects - none (an empty list); boxes - none. Existing fields in a sample's JSON are kept.
Models, given by path (loaded locally, never downloaded):
  --summarizer PATH  a transformers seq2seq checkpoint folder (e.g. a local BART/T5): summary =
                     its generation from the caption.
  --detector PATH    a torchvision detection weights file (.pth / .pt, a state dict as torchvision
                     publishes them, e.g. fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth): objects = the
                     class names of its detections scoring >= --score-threshold (at most --max-objects), boxes =
                     their normalised xyxy boxes, in the same order. --detector-arch names the torchvision
                     builder (default fasterrcnn_mobilenet_v3_large_fpn); --detector-classes a JSON list of
                     class names by class id (default: the COCO names of torchvision's weights for that arch).
                     torchvision detectors predict no attributes, so `attributes` stay empty.
                  or a Python file defining `detect(image: PIL.Image) -> list[dict]` returning
                     [{"label": str, "attributes": [str], "box": [x0, y0, x1, y1] normalised}, ...].
Prints how many samples got each level (summary, objects, boxes) and warns about a level no sample got:
the PyramidCLIP loss terms that use it would be inactive in training.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import runpy
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

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


WEIGHT_SUFFIXES = (".pth", ".pt")
DEFAULT_DETECTOR_ARCH = "fasterrcnn_mobilenet_v3_large_fpn"
_NOT_A_CLASS = ("__background__", "N/A")  # placeholders in torchvision's COCO category list


@dataclass(frozen=True)
class DetectorConfig:
    path: str = ""  # a .py plug-in or a torchvision weights file; "" = no detector
    arch: str = DEFAULT_DETECTOR_ARCH
    classes: str = ""  # JSON list of class names by id; "" = the arch's own (COCO)
    score_threshold: float = 0.5
    max_objects: int = 10
    device: str = "auto"  # auto = cuda when available


def detector_classes(cfg: DetectorConfig) -> list[str]:
    if cfg.classes:
        with open(cfg.classes) as f:
            return [str(c) for c in json.load(f)]
    from torchvision.models import get_model_weights

    try:
        return list(next(iter(get_model_weights(cfg.arch))).meta["categories"])
    except (ValueError, StopIteration, KeyError) as e:
        raise ValueError(f"--detector-arch {cfg.arch}: no built-in class names, pass --detector-classes") from e


def torchvision_detector(cfg: DetectorConfig) -> Callable:
    """detect(image) from a torchvision detection builder and a local weights file (no download)."""
    import torch
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    classes = detector_classes(cfg)
    two_stage = cfg.arch.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn"))
    limits = ({"box_score_thresh": cfg.score_threshold, "box_detections_per_img": cfg.max_objects} if two_stage
              else {"score_thresh": cfg.score_threshold, "detections_per_img": cfg.max_objects})
    try:
        model = torchvision.models.get_model(cfg.arch, weights=None, weights_backbone=None, num_classes=len(classes),
                                             **limits)
    except ValueError as e:
        raise ValueError(f"--detector-arch {cfg.arch}: not a torchvision detection model ({e})") from e
    state = torch.load(cfg.path, map_location="cpu", weights_only=True)
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"detector weights {cfg.path} do not fit {cfg.arch} with {len(classes)} classes: {first}") from e
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model.eval().to(device)

    @torch.no_grad()
    def detect(image) -> list[dict]:
        w, h = image.size
        found = model([TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True).to(device)])[0]
        found = {k: v.cpu() for k, v in found.items()}
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        out = []
        for box, label, score in zip(found["boxes"], found["labels"].tolist(), found["scores"].tolist()):
            if score >= cfg.score_threshold and classes[label] not in _NOT_A_CLASS and len(out) < cfg.max_objects:
                box = (box / scale).clamp(0, 1)
                out.append({"label": classes[label], "attributes": [], "box": [round(v, 5) for v in box.tolist()],
                            "score": round(score, 4)})
        return out

    return detect


@functools.lru_cache(maxsize=2)  # one model per worker process, not one per shard
def load_detector(cfg: DetectorConfig) -> Callable | None:
    if not cfg.path:
        return None
    if not os.path.isfile(cfg.path):
        raise FileNotFoundError(f"detector not found: {cfg.path}")
    if cfg.path.endswith(WEIGHT_SUFFIXES):
        return torchvision_detector(cfg)
    detect = runpy.run_path(cfg.path).get("detect")
    if detect is None:
        raise ValueError(f"detector file {cfg.path} defines no `detect(image)` function")
    return detect


# ---------------------------------------------------------------- shard rewriting

LEVELS = ("summary", "objects", "boxes")


def annotate_shard(src: str, dst: str, summarizer_path: str | None, detector: DetectorConfig | str | None) -> dict:
    """Copy shard `src` to `dst`, adding pyramid fields to each JSON. Returns {"samples": n, level: samples with
    it} (and "summary_is_caption": summaries that merely repeat the caption)."""
    from PIL import Image

    from data_pipeline.tar_io import image_extension, iter_samples, write_shard

    if not isinstance(detector, DetectorConfig):
        detector = DetectorConfig(path=detector or "")
    summarize, detect = load_summarizer(summarizer_path), load_detector(detector)
    counts = Counter()

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
            counts["samples"] += 1
            counts.update(level for level in LEVELS if meta.get(level))
            counts["summary_is_caption"] += str(meta.get("summary", "")).strip().lower() == caption.strip().lower()
            fields = dict(raw.fields, json=json.dumps(meta, sort_keys=True).encode())
            yield {"__key__": raw.key, **fields}

    write_shard(dst, annotated())
    return {"samples": counts["samples"], **{level: counts[level] for level in (*LEVELS, "summary_is_caption")}}


def level_warnings(counts: dict) -> list[str]:
    """One line per pyramid level that no annotated sample got (training would leave its loss terms inactive)."""
    n = counts.get("samples", 0)
    lines = [f"warning: {level} in 0 of {n} samples: the PyramidCLIP terms that use it will be inactive"
             + (" (pass --detector)" if level != "summary" else "") for level in LEVELS if n and not counts[level]]
    if n and counts["summary_is_caption"] == n:
        lines.append(f"warning: every summary repeats its caption ({n} samples): the summary level adds nothing")
    return lines


def main(argv=None) -> None:
    from data_pipeline.sources import expand_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inputs", required=True, help="shard spec (brace expansion, '::' lists)")
    parser.add_argument("--out", required=True, help="output folder (same shard file names)")
    parser.add_argument("--summarizer", default=None, help="local transformers seq2seq folder")
    parser.add_argument("--detector", default="", help="torchvision weights file, or Python file defining detect(image)")
    parser.add_argument("--detector-arch", default=DEFAULT_DETECTOR_ARCH, help="torchvision detection builder")
    parser.add_argument("--detector-classes", default="", help="JSON list of class names by class id")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--max-objects", type=int, default=10, help="detections kept per image")
    parser.add_argument("--device", default="auto", help="detector device: auto (cuda when available), cpu, cuda:1")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    detector = DetectorConfig(args.detector, args.detector_arch, args.detector_classes, args.score_threshold,
                              args.max_objects, args.device)
    if detector.path and not os.path.isfile(detector.path):
        sys.exit(f"error: detector not found: {detector.path}")
    os.makedirs(args.out, exist_ok=True)
    shards = expand_shards(args.inputs)
    todo = [(s, os.path.join(args.out, os.path.basename(s))) for s in shards]
    todo = [(s, d) for s, d in todo if not os.path.exists(d)]  # re-runs skip finished shards
    counts: Counter = Counter()
    # Models load in the workers (the parent forks them and should not hold torch's thread pools).
    with ProcessPoolExecutor(args.processes) as pool:
        futures = [pool.submit(annotate_shard, s, d, args.summarizer, detector) for s, d in todo]
        try:
            for future in tqdm(futures, desc="annotate", unit="shard"):
                counts.update(future.result())
        except (OSError, ValueError) as e:  # a detector that does not load: the same line from every shard
            for future in futures:
                future.cancel()
            sys.exit(f"error: {e}")
    for line in level_warnings(counts):
        print(line, file=sys.stderr)
    print(json.dumps({"annotated_shards": len(todo), "skipped_existing": len(shards) - len(todo),
                      "samples": counts["samples"],
                      "levels": {level: counts[level] for level in (*LEVELS, "summary_is_caption")}}))


if __name__ == "__main__":
    main()
