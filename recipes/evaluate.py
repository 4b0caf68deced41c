"""Zero-shot evaluation: classification with prompt ensembles and image<->text retrieval (R@1/5/10).

    python -m recipes.evaluate --model runs/demo/model --data "data/demo/eval-{0000..0001}.tar"
    python -m recipes.evaluate --model runs/demo/model --set animal_mnist
    python -m recipes.evaluate --model M --set imagenet --root /data/imagenet/val
    python -m recipes.evaluate --model M --set coco --root /data/coco --annotations dataset_coco.json

Labels (--set shards): each eval sample's JSON carries an integer `label`, the 0-based index of its class in
`classnames` (a sample without one, or with -1, counts for retrieval only); the class names and prompt templates
are read from classnames.json next to the first eval shard, or from --classnames PATH:
    {"classnames": ["bird", "cat", ...], "templates": ["a photo of a {}.", "a drawing of a {}."]}
Each template is formatted with a class name; the class embedding is the normalised mean over templates
(--templates FILE, one per line, replaces them). `python -m data_pipeline.build_shards --val-fraction F
--labels-from-folders` (or --label-column COL) writes both; docs/data.md shows the whole path.

The results table gives a chance level per row and names its convention: zero-shot top-1 against always
answering the majority class of the split, top-5 against a uniform guess (5/C for C classes), retrieval R@k
against a uniform guess (k/N for N images; with several captions per image, image->text too).

Offline from a consolidated model folder (weights, config, tokenizer), or live inside training from the engine
(`evaluate_live`): every rank embeds its share of the eval set and the embeddings are all-gathered. Under ZeRO-3
a forward gathers parameters collectively, so ranks run in lockstep: a rank whose share has run out runs a
one-sample stand-in batch through the same towers until every rank is done (see `lockstep`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline.eval_sets import EvalSetConfig
from model.config_tree import require


@dataclass
class EvalConfig:
    """The `eval:` part of the recipe: periodic zero-shot evaluation during training."""

    every_steps: int = 0  # 0 disables periodic eval; the last step is always evaluated when on
    batch_size: int = 64  # per rank
    sets: list[EvalSetConfig] = field(default_factory=lambda: [EvalSetConfig(kind="shards")])

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "every_steps", self.every_steps, "≥ 0 (0 disables periodic eval)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "≥ 1")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lockstep(batches: Iterable[dict], standin, device) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, is_real) until every rank has run out; ranks that ran out get `standin(keys)`.

    One small all-reduce per batch agrees on whether any rank still has data and which towers it runs
    ("image", "text"), so every rank calls the same modules in the same order.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not _distributed():
            if batch is None:
                return
            yield batch, True
            continue
        mine = [batch is not None, batch is not None and "image" in batch, batch is not None and "text" in batch]
        agreed = torch.tensor(mine, dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if not agreed[0]:
            return
        if batch is not None:
            yield batch, True
        else:
            yield standin([k for k, on in zip(("image", "text"), agreed[1:].tolist()) if on]), False


def gather_rows(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate this rank's rows per key, then every rank's in rank order (same order for every key)."""
    local = {k: torch.cat(v).cpu() for k, v in parts.items() if v}
    if not _distributed():
        return local
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)  # shapes differ across ranks; eval sets are small enough to pickle
    keys = {k for shard in everyone for k in shard}
    return {k: torch.cat([shard[k] for shard in everyone if k in shard]) for k in sorted(keys)}


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype  # under ZeRO-3 a partitioned parameter keeps its dtype


@torch.no_grad()
def embed_eval_set(model, batches: Iterable[dict], device) -> dict[str, torch.Tensor]:
    """Embeddings of every image and text of the split (all ranks'), with labels / caption owners if present."""
    dtype = _model_dtype(model)
    size, ctx = model.cfg.vision.image_size, model.cfg.text.context_length

    def standin(keys: list[str]) -> dict:
        return {k: torch.zeros(1, 3, size, size) if k == "image" else torch.zeros(1, ctx, dtype=torch.long)
                for k in keys}

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("image", "text", "label", "index", "owner")}
    quiet = True if dist.is_initialized() and dist.get_rank() > 0 else None  # None: off when not a terminal
    for batch, real in tqdm(lockstep(batches, standin, device), desc="eval", leave=False, disable=quiet):
        image = model.encode_image(batch["image"].to(device, dtype)).float() if "image" in batch else None
        text = model.encode_text(batch["text"].to(device)).float() if "text" in batch else None
        if not real:
            continue
        for key, value in (("image", image), ("text", text)):
            if value is not None:
                parts[key].append(value)
        for key in ("label", "index", "owner"):
            if key in batch:
                parts[key].append(torch.as_tensor(batch[key]))
    return gather_rows(parts)


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[C, D]: for each class, the normalised mean of its prompts' normalised text embeddings.

    Classes are shared out over ranks (class c on rank c mod world) and gathered back in class order.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = range(rank, len(classnames), world)
    prompts = ({"text": tokenizer([t.format(classnames[c]) for t in templates]), "index": torch.tensor([c])}
               for c in mine)
    parts: dict[str, list[torch.Tensor]] = {"class": [], "index": []}
    ctx = model.cfg.text.context_length
    for batch, real in lockstep(prompts, lambda keys: {"text": torch.zeros(1, ctx, dtype=torch.long)}, device):
        emb = model.encode_text(batch["text"].to(device)).float()
        if real:
            parts["class"].append(F.normalize(emb.mean(dim=0, keepdim=True), dim=-1))
            parts["index"].append(batch["index"])
    gathered = gather_rows(parts)
    return gathered["class"][gathered["index"].argsort()].to(device)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor | None = None,
                     ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways, embeddings already normalised.

    owner[j] = the image row that text j describes; None pairs the rows (text i describes image i). An image
    counts as found by image->text at k when any of its captions is among its k best-scoring texts.
    """
    sim = image @ text.T  # [I, T]
    if owner is None:
        owner = torch.arange(sim.shape[0], device=sim.device)
    owner = owner.to(sim.device)
    match = owner[None, :] == torch.arange(sim.shape[0], device=sim.device)[:, None]  # [I, T]
    # rank of the best true match = number of candidates scoring strictly higher than it
    best_caption = sim.masked_fill(~match, float("-inf")).max(dim=1, keepdim=True).values
    image_rank = (sim > best_caption).sum(dim=1)
    text_rank = (sim.T > sim.T.gather(1, owner[:, None])).sum(dim=1)
    out = {}
    for direction, rank in (("image_to_text", image_rank), ("text_to_image", text_rank)):
        out.update({f"{direction}_R@{k}": (rank < k).float().mean().item() for k in ks})
    return out


def evaluate(model, tokenizer, batches: Iterable[dict], classnames: list[str], templates: list[str],
             device="cpu") -> dict:
    """Zero-shot classification where the split has labels and class names; retrieval where it has texts."""
    was_training = model.training
    model.eval()
    emb = embed_eval_set(model, batches, device)
    results: dict = {}
    labelled = emb["label"] >= 0 if "label" in emb else None  # webdataset samples without a label carry -1
    if classnames and labelled is not None and bool(labelled.any()):
        labels, image = emb["label"][labelled].to(device), emb["image"][labelled].to(device)
        classes = class_embeddings(model, tokenizer, classnames, templates, device)
        results.update({"samples": len(labels), "classes": len(classnames)})
        results.update({f"zeroshot_{k}": v for k, v in topk_accuracy(image @ classes.T, labels).items()})
        results["zeroshot_chance_top1"] = labels.bincount().max().item() / len(labels)  # majority-class rate
    if "image" in emb and "text" in emb:
        image, owner = emb["image"], None
        if "owner" in emb:  # multi-caption: images in index order, and each caption's owner as a row number
            index, order = emb["index"].sort()
            image, owner = image[order], torch.searchsorted(index, emb["owner"])
        results.update({"images": len(image), "texts": len(emb["text"])})
        results.update(retrieval_recall(image.to(device), emb["text"].to(device), owner))
        results["retrieval_chance_R@1"] = 1.0 / len(image)
    model.train(was_training)
    return results


def check_eval_sets(cfg: EvalConfig, data_cfg) -> None:
    """Fail at start-up, not at the first eval thousands of steps in, when a configured set cannot be found."""
    for s in cfg.sets:  # kinds are checked on load (EvalSetConfig.kind is a Literal)
        if s.kind == "shards" and not data_cfg.eval_shards:
            raise ValueError("eval.sets: kind 'shards' needs data.eval_shards")
        if s.kind not in ("shards", "animal_mnist") and not Path(s.root).is_dir():  # every other kind reads a root
            raise FileNotFoundError(f"eval.sets: {s.kind} root folder not found: {s.root!r}")
        if s.kind in ("coco", "flickr30k") and not Path(s.annotations).is_file():
            raise FileNotFoundError(f"eval.sets: {s.kind} annotations not found: {s.annotations!r}")


def evaluate_live(module, tokenizer, cfg: EvalConfig, data_cfg, *, rank: int, world_size: int, device) -> dict:
    """Every configured eval set on the live model (all ranks call this together) -> {"eval/<set>/<metric>": v}."""
    from data_pipeline.eval_sets import build_eval_set

    metrics = {}
    for set_cfg in cfg.sets:
        eval_set = build_eval_set(set_cfg, data_cfg, tokenizer, image_size=module.cfg.vision.image_size,
                                  batch_size=cfg.batch_size, rank=rank, world_size=world_size)
        results = evaluate(module, tokenizer, eval_set.batches, eval_set.classnames, eval_set.templates, device)
        metrics.update({f"eval/{eval_set.name}/{k}": v for k, v in results.items()})
    return metrics


def format_table(results: dict) -> str:
    """The results as a table; each row's chance level says which convention it follows."""
    rows = []
    if "zeroshot_top1" in results:
        classes = results["classes"]
        rows += [("zero-shot top-1", results["zeroshot_top1"], results["zeroshot_chance_top1"], "majority class"),
                 ("zero-shot top-5", results["zeroshot_top5"], min(1.0, 5 / classes), f"uniform, 5/{classes} classes")]
    if "image_to_text_R@1" in results:
        chance = results["retrieval_chance_R@1"]
        rows += [(f"{name} R@{k}", results[f"{key}_R@{k}"], min(1.0, k * chance),
                  f"uniform, {k}/{results['images']} images")
                 for key, name in (("image_to_text", "image->text"), ("text_to_image", "text->image"))
                 for k in (1, 5)]
    lines = [f"{'metric':<18}{'model':>8}{'chance':>8}  chance is", "-" * 48]
    lines += [f"{name:<18}{100 * v:>7.1f}%{100 * c:>7.1f}%  {convention}" for name, v, c, convention in rows]
    if "samples" in results:
        lines.append(f"({results['samples']} held-out samples, {results['classes']} classes)")
    if "images" in results:
        lines.append(f"(retrieval: {results['images']} images, {results['texts']} texts)")
    return "\n".join(lines)


def main(argv=None) -> None:
    from data_pipeline.config import DataConfig
    from data_pipeline.eval_sets import KINDS, build_eval_set
    from data_pipeline.tokenizer import Tokenizer
    from model.pretrained import load_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated model folder (recipes.convert output)")
    p.add_argument("--set", default="shards", choices=KINDS, help="eval set kind (see data_pipeline/eval_sets.py)")
    p.add_argument("--data", default="", help="eval shard spec (--set shards)")
    p.add_argument("--root", default="", help="image folder (image_folder, imagenet, coco, flickr30k)")
    p.add_argument("--annotations", default="", help="Karpathy split JSON (coco, flickr30k)")
    p.add_argument("--split", default="test", help="Karpathy split (coco, flickr30k)")
    p.add_argument("--classnames", default="", help="JSON {classnames, templates}; default: the set's own "
                   "(--set shards: classnames.json beside the first shard)")
    p.add_argument("--templates", default="", help="text file, one prompt template per line with {}")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate N items spread over the set (0 = all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    try:
        model, model_cfg = load_pretrained(args.model, device=args.device)
        tokenizer = Tokenizer.from_folder(args.model)
        set_cfg = EvalSetConfig(kind=args.set, root=args.root, annotations=args.annotations, split=args.split,
                                classnames=args.classnames, max_samples=args.max_samples)
        eval_set = build_eval_set(set_cfg, DataConfig(eval_shards=args.data, workers=args.workers), tokenizer,
                                  image_size=model_cfg.vision.image_size, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    templates = eval_set.templates
    if args.templates:
        templates = [t for t in Path(args.templates).read_text().splitlines() if t.strip()]
    results = evaluate(model, tokenizer, eval_set.batches, eval_set.classnames, templates, args.device)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
