"""Zero-shot eval sets: batches of images (and texts) sharded over ranks, plus class names and prompt templates.

    eval_set = build_eval_set(EvalSetConfig(kind="animal_mnist"), data_cfg, tokenizer, image_size=224,
                              batch_size=256, rank=r, world_size=n)
    for batch in eval_set.batches: ...

Kinds (class names and templates ship in data_pipeline/zeroshot/*.json; nothing is downloaded):
- `shards`: the recipe's own webdataset split (`data.eval_shards` + classnames.json): classification + retrieval.
- `animal_mnist`: 10,000 28×28 animal silhouettes in 10 classes from the `animal-mnist` PyPI package
  (`pip install --no-deps animal-mnist`; its gzip pickles are read directly: its loader imports TensorFlow).
- `image_folder`: `root/<class>/<image>`, classes in sorted folder order; names are the folder names unless
  `classnames` points at a JSON of {"classnames": [...], "templates": [...]} in that order.
- `imagenet`: ImageNet-1k val in the standard layout (`root/n01440764/*.JPEG`, the 1,000 WordNet ids sorted =
  the class indices) with CLIP's class names and 80 templates.
- `imagenet_v2`: ImageNetV2 (`root/0/ .. root/999/`: the folder *number* is the class index; sorted as text,
  "10" would come before "2"). `imagenet_sketch`: `root/<wnid>/`, the 1k classes.
- `imagenet_r`, `imagenet_a`: `root/<wnid>/` for 200 of the 1k classes (ids in zeroshot/imagenet_{r,a}.json);
  the label is the position among those 200 and the class names are the 1k names at those ids.
  Labels come from the folder name, never from folder positions: a missing class folder shifts nothing. A
  folder that does not fit the layout is an error naming it and the layout expected (`IMAGENET_LAYOUTS`).
- `coco` / `flickr30k`: retrieval over a Karpathy split (`annotations` = dataset_coco.json /
  dataset_flickr30k.json, images under `root`); `split` picks test (5k COCO, 1k Flickr) or val.

Batch keys: "image" [B, 3, S, S]; "label" [B] for classification; "text" [T, L] tokens; for paired sets text
row i belongs to image row i, for multi-caption sets "index" [B] numbers the images and "owner" [T] names the
image of each caption. Every rank reads a disjoint share (item i goes to rank i mod world_size).
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.config import DEFAULT_TEMPLATES, DataConfig
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import IMAGE_EXTENSIONS, SampleTransform, ViewConfig, decode_rgb

ZEROSHOT_DIR = Path(__file__).parent / "zeroshot"
Kind = Literal["shards", "animal_mnist", "image_folder", "imagenet", "imagenet_v2", "imagenet_r", "imagenet_a",
               "imagenet_sketch", "coco", "flickr30k"]
# ImageNet and its variants: class folders -> label, on the 1k names (WordNet ids in data_pipeline/zeroshot/*.json).
IMAGENET_LAYOUTS = {
    "imagenet": "root/<WordNet id>/<image> with the 1k ids, e.g. root/n01440764/ILSVRC2012_val_00000293.JPEG",
    "imagenet_v2": "root/<class number 0..999>/<image>, ImageNetV2's extracted layout, e.g. root/0/7e1.jpeg",
    "imagenet_r": "root/<WordNet id>/<image> with ImageNet-R's 200 ids, e.g. root/n01443537/art_0.jpg",
    "imagenet_a": "root/<WordNet id>/<image> with ImageNet-A's 200 ids, e.g. root/n01498041/0.000116_digital clock.jpg",
    "imagenet_sketch": "root/<WordNet id>/<image> with the 1k ids, e.g. root/n01440764/sketch_0.JPEG",
}
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class EvalSetConfig:
    kind: Kind = "shards"
    name: str = ""  # metric prefix; defaults to kind
    root: str = ""  # folder of images (image_folder, imagenet, coco, flickr30k)
    annotations: str = ""  # Karpathy split JSON (coco, flickr30k)
    split: str = "test"  # Karpathy split (coco, flickr30k)
    classnames: str = ""  # JSON with classnames (+ templates) overriding the kind's own
    max_samples: int = 0  # evaluate N items evenly spread over the set (streamed shards: the first N); 0 = all

    def __post_init__(self) -> None:
        if self.max_samples < 0:
            raise ValueError(f"max_samples must be ≥ 0 (0 = all), got {self.max_samples!r}")


@dataclass
class EvalSet:
    name: str
    batches: Iterable[dict]
    classnames: list[str]  # empty for retrieval-only sets
    templates: list[str]


def load_zeroshot_meta(path: str | Path) -> tuple[list[str], list[str]]:
    """(classnames, templates) from a JSON file; templates default to generic photo prompts."""
    with open(path) as f:
        meta = json.load(f)
    return list(meta["classnames"]), list(meta.get("templates") or DEFAULT_TEMPLATES)


def build_eval_set(cfg: EvalSetConfig, data: DataConfig, tokenizer: Tokenizer, *, image_size: int,
                   batch_size: int, rank: int = 0, world_size: int = 1) -> EvalSet:
    if cfg.kind not in KINDS:
        raise ValueError(f"eval set kind must be one of {KINDS}, got {cfg.kind!r}")
    name = cfg.name or cfg.kind
    if cfg.kind == "shards":
        from data_pipeline.loader import build_eval_loader, load_classnames

        if cfg.classnames:
            data = DataConfig(eval_shards=data.eval_shards, classnames=cfg.classnames, workers=data.workers)
        loader = build_eval_loader(data, tokenizer, image_size=image_size, batch_size=batch_size, rank=rank,
                                   world_size=world_size)
        classnames, templates = load_classnames(data)
        batches = loader if not cfg.max_samples else _first_samples(loader, cfg.max_samples, world_size)
        return EvalSet(name, batches, classnames, templates)

    transform = SampleTransform(ViewConfig(image_size=image_size, pyramid=False, train=False)).global_view
    if cfg.kind == "animal_mnist":
        dataset: Dataset = AnimalMnist(transform)
        classnames, templates = load_zeroshot_meta(ZEROSHOT_DIR / "animal_mnist.json")
    elif cfg.kind == "image_folder":
        dataset = ImageFolder(_required_dir(cfg.root, cfg.kind), transform)
        classnames, templates = dataset.folders, DEFAULT_TEMPLATES
    elif cfg.kind in IMAGENET_LAYOUTS:
        labels, classnames, templates = imagenet_labels(cfg.kind)
        dataset = ImageFolder(_required_dir(cfg.root, cfg.kind), transform, labels,
                              f"{cfg.kind}: expected {IMAGENET_LAYOUTS[cfg.kind]}")
    else:
        dataset = KarpathyCaptions(_required_dir(cfg.root, cfg.kind), cfg.annotations, cfg.split, transform)
        classnames, templates = [], []
    if cfg.classnames:
        classnames, templates = load_zeroshot_meta(cfg.classnames)
    if isinstance(dataset, ImageFolder) and len(classnames) != dataset.num_classes:
        raise ValueError(f"{cfg.kind}: {len(classnames)} class names for {dataset.num_classes} classes")
    shard = torch.utils.data.Subset(dataset, spread(len(dataset), cfg.max_samples)[rank::world_size])
    collate = _CaptionCollate(tokenizer) if isinstance(dataset, KarpathyCaptions) else _label_collate
    loader = DataLoader(shard, batch_size=batch_size, num_workers=data.workers, collate_fn=collate)
    return EvalSet(name, loader, classnames, templates)


def imagenet_labels(kind: str) -> tuple[dict[str, int], list[str], list[str]]:
    """(folder name -> label, class names, templates) of ImageNet or one of its variants."""
    with open(ZEROSHOT_DIR / "imagenet1k.json") as f:
        meta = json.load(f)
    names, templates, wnids = meta["classnames"], meta["templates"], meta["wnids"]
    if kind == "imagenet_v2":
        return {str(i): i for i in range(len(names))}, names, templates
    if kind in ("imagenet_r", "imagenet_a"):
        with open(ZEROSHOT_DIR / f"{kind}.json") as f:
            subset = json.load(f)["wnids"]
        index = {w: i for i, w in enumerate(wnids)}
        return {w: i for i, w in enumerate(subset)}, [names[index[w]] for w in subset], templates
    return {w: i for i, w in enumerate(wnids)}, names, templates


def _required_dir(root: str, kind: str) -> str:
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"eval set {kind}: root folder not found: {root!r}")
    return root


def spread(n: int, max_samples: int) -> list[int]:
    """All of range(n), or `max_samples` indices evenly spaced over it (files are often sorted by class)."""
    if not max_samples or max_samples >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, max_samples).round().long().unique().tolist()


def _first_samples(loader: Iterable[dict], max_samples: int, world_size: int) -> Iterable[dict]:
    """This rank's share of the first `max_samples` items of a streamed split."""
    budget = -(-max_samples // world_size)
    for batch in loader:
        if budget <= 0:
            return
        keep = min(budget, len(batch["image"]))
        budget -= keep
        yield {k: v[:keep] for k, v in batch.items()}


def _label_collate(items: list[tuple[torch.Tensor, int]]) -> dict:
    return {"image": torch.stack([img for img, _ in items]),
            "label": torch.tensor([label for _, label in items], dtype=torch.long)}


class _CaptionCollate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, int, list[str]]]) -> dict:
        captions = [c for _, _, caps in items for c in caps]
        return {"image": torch.stack([img for img, _, _ in items]),
                "index": torch.tensor([i for _, i, _ in items], dtype=torch.long),
                "text": self.tokenizer(captions),
                "owner": torch.tensor([i for _, i, caps in items for _ in caps], dtype=torch.long)}


class AnimalMnist(Dataset):
    """(image [3, S, S], label) from animal-mnist's gzip pickles: uint8 [10000, 28, 28] and labels [10000]."""

    def __init__(self, transform):
        try:
            import animal_mnist
        except ImportError as e:
            raise FileNotFoundError("eval set animal_mnist needs `pip install --no-deps animal-mnist`") from e
        folder = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
        with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
            self.images = torch.from_numpy(pickle.load(f))  # white silhouettes on black
        with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
            self.labels = torch.from_numpy(pickle.load(f)).long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i].expand(3, -1, -1)), int(self.labels[i])


class ImageFolder(Dataset):
    """(image, label) from root/<class>/<file>; class index = position of the folder in sorted order, or
    `labels[folder name]` when a mapping is given (a folder outside it is refused, naming `layout`)."""

    def __init__(self, root: str, transform, labels: dict[str, int] | None = None,
                 layout: str = "expected root/<class>/<image>"):
        self.folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if labels is None:
            labels = {folder: i for i, folder in enumerate(self.folders)}
        stray = [folder for folder in self.folders if folder not in labels]
        if stray or not self.folders:
            found = f"folder {stray[0]!r} does not fit" if stray else "no class folders"
            raise ValueError(f"{root}: {found}; {layout}")
        self.num_classes = len(set(labels.values()))
        self.items = [(os.path.join(root, folder, f), labels[folder]) for folder in self.folders
                      for f in sorted(os.listdir(os.path.join(root, folder)))
                      if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        if not self.items:
            raise FileNotFoundError(f"no images under {root}/<class>/ ({'/'.join(IMAGE_EXTENSIONS)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(decode_rgb(Path(path).read_bytes())), label


class KarpathyCaptions(Dataset):
    """(image, image index, its captions) for one split of a Karpathy JSON (COCO 5k test, Flickr30k 1k test)."""

    def __init__(self, root: str, annotations: str, split: str, transform):
        if not annotations or not os.path.isfile(annotations):
            raise FileNotFoundError(f"Karpathy split annotations not found: {annotations!r}")
        with open(annotations) as f:
            images = json.load(f)["images"]
        self.items = [(os.path.join(root, im.get("filepath", ""), im["filename"]),
                       [s["raw"].strip() for s in im["sentences"]][:5])  # the benchmarks use 5 captions per image
                      for im in images if im["split"] == split]
        if not self.items:
            raise ValueError(f"{annotations} has no images in split {split!r}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, list[str]]:
        path, captions = self.items[i]
        return self.transform(decode_rgb(Path(path).read_bytes())), i, captions
