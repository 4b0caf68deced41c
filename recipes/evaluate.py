"""Zero-shot evaluation: classification with prompt ensembles and image<->text retrieval.

    python -m recipes.evaluate --model runs/demo/model --data "data/demo/eval-{000000..000001}.tar"

Reads a consolidated model folder (weights, config, tokenizer). Class names come from `classnames.json` beside
the eval shards (or --classnames), with its prompt templates unless --templates (one per line, `{}` marks the class).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[C, D]: for each class, the normalised mean of its prompts' normalised text embeddings."""
    rows = []
    for name in classnames:
        emb = model.encode_text(tokenizer([t.format(name) for t in templates]).to(device))
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways for paired rows (image i matches text i), embeddings already normalised."""
    sim = image @ text.T
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for direction, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
        # rank of the true match = number of candidates scoring strictly higher
        rank = (scores > scores[target, target][:, None]).sum(dim=1)
        out.update({f"{direction}_R@{k}": (rank < k).float().mean().item() for k in ks})
    return out


@torch.no_grad()
def embed_eval_set(model, batches, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, texts, labels = [], [], []
    for batch in tqdm(batches, desc="eval", leave=False):
        images.append(model.encode_image(batch["image"].to(device)).float())
        texts.append(model.encode_text(batch["text"].to(device)).float())
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(images), torch.cat(texts), torch.cat(labels)


def evaluate(model, tokenizer, batches, classnames: list[str], templates: list[str], device="cpu") -> dict:
    model.eval()
    image, text, labels = embed_eval_set(model, batches, device)
    classes = class_embeddings(model, tokenizer, classnames, templates, device).float()
    results = {"samples": len(labels), "classes": len(classnames)}
    results.update({f"zeroshot_{k}": v for k, v in topk_accuracy(image @ classes.T, labels.to(device)).items()})
    results["zeroshot_chance_top1"] = labels.bincount().max().item() / len(labels)  # majority-class rate
    results.update(retrieval_recall(image, text))
    results["retrieval_chance_R@1"] = 1.0 / len(labels)
    return results


def format_table(results: dict) -> str:
    rows = [("zero-shot top-1", results["zeroshot_top1"], results["zeroshot_chance_top1"]),
            ("zero-shot top-5", results["zeroshot_top5"], min(1.0, 5 / results["classes"])),
            ("image->text R@1", results["image_to_text_R@1"], results["retrieval_chance_R@1"]),
            ("image->text R@5", results["image_to_text_R@5"], 5 * results["retrieval_chance_R@1"]),
            ("text->image R@1", results["text_to_image_R@1"], results["retrieval_chance_R@1"]),
            ("text->image R@5", results["text_to_image_R@5"], 5 * results["retrieval_chance_R@1"])]
    lines = [f"{'metric':<18}{'model':>8}{'chance':>8}", "-" * 34]
    lines += [f"{name:<18}{100 * v:>7.1f}%{100 * c:>7.1f}%" for name, v, c in rows]
    lines.append(f"({results['samples']} held-out samples, {results['classes']} classes)")
    return "\n".join(lines)


def main(argv=None) -> None:
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader, load_classnames
    from data_pipeline.tokenizer import Tokenizer
    from model.pretrained import load_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated model folder (recipes.convert output)")
    p.add_argument("--data", required=True, help="eval shard spec")
    p.add_argument("--classnames", default="", help="classnames.json (default: beside the first eval shard)")
    p.add_argument("--templates", default="", help="text file, one prompt template per line with {}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    try:
        model, model_cfg = load_pretrained(args.model)
        tokenizer = Tokenizer.from_folder(args.model)
        data_cfg = DataConfig(eval_shards=args.data, classnames=args.classnames)
        loader = build_eval_loader(data_cfg, tokenizer, image_size=model_cfg.vision.image_size,
                                   batch_size=args.batch_size, rank=0, world_size=1)
        classnames, templates = load_classnames(data_cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.templates:
        templates = Path(args.templates).read_text().splitlines()
    results = evaluate(model, tokenizer, loader, classnames, [t for t in templates if t.strip()])
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
