"""Claim: a HiCLIP warm-started from a CLIP with `model.init_priors: uniform` starts close to that CLIP.

    python bench/hiclip_from_clip.py --clip runs/demo/model --data "data/demo/eval-{0000..0001}.tar"

From a consolidated CLIP folder, builds the HiCLIP of the same size (hier attention in both towers) at step 0,
warm-started through recipes/warm_start.py: with the priors' projections at 0 (uniform links,
docs/method.md §1.5) or as a fresh run initialises them, in the paper's `multiply` prior mode, and uniform in
the `bias` mode (softmax(QKᵀ/√d + log C), renormalised); evaluates the source and both
on the eval shards (zero-shot top-1/top-5 and retrieval, recipes/evaluate.py). Also reports the mean cosine
between each model's and the CLIP's embeddings of the same images / texts, and the mean link of each layer
(text over real tokens, vision over grid edges). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# (model.init_priors, model.hier.prior_mode): the paper's multiply mode with both inits, and the bias mode.
VARIANTS = (("uniform", "multiply"), ("random", "multiply"), ("uniform", "bias"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="consolidated vanilla CLIP folder")
    p.add_argument("--data", required=True, help="eval shard spec with zero-shot labels")
    args = p.parse_args()
    import torch

    from data_pipeline.config import DataConfig
    from data_pipeline.eval_sets import EvalSetConfig, build_eval_set
    from data_pipeline.tokenizer import Tokenizer
    from model.clip import CLIP
    from model.pretrained import load_pretrained
    from recipes.evaluate import embed_eval_set, evaluate
    from recipes.warm_start import load_warm_start

    torch.set_num_threads(1)
    source, cfg = load_pretrained(args.clip)
    tokenizer = Tokenizer.from_folder(args.clip)

    def eval_set():
        return build_eval_set(EvalSetConfig(kind="shards"), DataConfig(eval_shards=args.data, workers=0), tokenizer,
                              image_size=cfg.vision.image_size, batch_size=128)

    models = {"clip": source}
    for priors, mode in VARIANTS:
        hier = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, attention="hier"),
                                   text=dataclasses.replace(cfg.text, attention="hier"),
                                   hier=dataclasses.replace(cfg.hier, prior_mode=mode),
                                   init_from=args.clip, init_priors=priors)
        torch.manual_seed(0)
        models[f"hiclip_{priors}_{mode}"] = CLIP(hier).eval()
        load_warm_start(models[f"hiclip_{priors}_{mode}"], hier)

    results, embeddings = {}, {}
    for name, model in models.items():
        s = eval_set()
        results[name] = {k: round(v, 4) for k, v in evaluate(model, tokenizer, s.batches, s.classnames,
                                                            s.templates).items() if k.startswith(("zeroshot_top", "image_to_text_R@1", "text_to_image_R@1"))}
        embeddings[name] = embed_eval_set(model, eval_set().batches, "cpu")
        if name != "clip":
            results[name]["cosine_to_clip_image"] = round(
                (embeddings[name]["image"] * embeddings["clip"]["image"]).sum(-1).mean().item(), 4)
            results[name]["cosine_to_clip_text"] = round(
                (embeddings[name]["text"] * embeddings["clip"]["text"]).sum(-1).mean().item(), 4)
            with torch.no_grad():
                batch = next(iter(eval_set().batches))
                _, text_links = model.text(batch["text"], return_links=True)
                real = batch["text"][:, 1:] > 0  # an edge between two real tokens (padding is 0)
                results[name]["mean_text_link_per_layer"] = [round(l[real].mean().item(), 3) for l in text_links]
                _, vision_links = model.visual.transformer(model.visual.tokens(batch["image"]), return_links=True)
                results[name]["mean_vision_link_per_layer"] = [
                    round(torch.cat([h.flatten(), v.flatten()]).mean().item(), 3) for h, v in vision_links]
        print(f"{name}: {results[name]}", file=sys.stderr)
    gap = {f"{name}_top1_minus_clip_points": round(100 * (r["zeroshot_top1"] - results["clip"]["zeroshot_top1"]), 1)
           for name, r in results.items() if name != "clip"}
    print(json.dumps({"bench": "hiclip_from_clip", "clip": args.clip, **gap, **results}))


if __name__ == "__main__":
    main()
