r"""How well HiCLIP's induced patch groups separate object from background, per layer, against position alone.

    python -m recipes.induction_score --model runs/demo_hier/model [--images demo|FOLDER] \
        [--thresholds calibrated|spec|0.3,0.5,...]

For each image with a foreground mask (data_pipeline/foreground.py) and each vision layer: the adjusted Rand
index (ARI) between the layer's patch groups (model/induction.py, at that layer's threshold) and the patch-level
mask (thresholds: `calibrated` by default, see model/induction.py); and the same for the position-only baseline, a grid of rectangular tiles with (nearly) as many groups as
the layer made (`position_groups`), so that the comparison is at equal granularity. ARI is 0 for a partition
unrelated to the mask (any all-one-group or all-singleton partition included), 1 for the mask itself; images
whose mask is all foreground or all background are left out (ARI is undefined there).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from sklearn.metrics import adjusted_rand_score

from model.induction import calibrated_thresholds, image_thresholds, patch_groups


def position_groups(groups: int, grid: int) -> torch.Tensor:
    """[grid, grid] labels: rows x cols rectangular tiles, rows = ⌊√groups⌋, cols = ⌈groups / rows⌉ (both ≤ grid)."""
    rows = max(1, min(grid, math.isqrt(max(groups, 1))))
    cols = max(1, min(grid, math.ceil(groups / rows)))
    r = torch.arange(grid) * rows // grid
    c = torch.arange(grid) * cols // grid
    return r[:, None] * cols + c[None, :]


@torch.no_grad()
def vision_links(model, images: torch.Tensor, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per vision layer (lowest first), the (horizontal [N, G, G-1], vertical [N, G-1, G]) links of every image."""
    was_training = model.training
    model.eval()
    parts = []
    for i in range(0, len(images), batch_size):
        _, links = model.visual.transformer(model.visual.tokens(images[i:i + batch_size]), return_links=True)
        if not links:
            raise ValueError("the vision tower has no hierarchy-aware layers (model.vision.attention is 'vanilla')")
        parts.append(links)
    model.train(was_training)
    return [(torch.cat([p[l][0] for p in parts]), torch.cat([p[l][1] for p in parts])) for l in range(len(parts[0]))]


def resolve_thresholds(choice: str | list[float], links: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """"calibrated" (quantiles of each layer's links, model/induction.py), "spec" (docs/method.md §1.3's curve), or a list."""
    if choice == "calibrated":
        return list(calibrated_thresholds([torch.cat([h.flatten(), v.flatten()]) for h, v in links]))
    if choice == "spec":
        return list(image_thresholds(len(links)))
    if len(choice) != len(links):
        raise ValueError(f"thresholds: {len(choice)} given for {len(links)} vision layers")
    return list(choice)


def induction_scores(model, images: torch.Tensor, masks: torch.Tensor, thresholds: str | list[float] = "calibrated",
                     batch_size: int = 64) -> dict:
    """{"thresholds", "images", "layers": [{"ari", "ari_position", "groups"} per layer, lowest first]}."""
    keep = masks.flatten(1).any(1) & ~masks.flatten(1).all(1)
    images, masks = images[keep], masks[keep]
    links = vision_links(model, images, batch_size)
    used = resolve_thresholds(thresholds, links)
    layers = []
    for (h, v), theta in zip(links, used):
        ari, base, groups = [], [], []
        for i, mask in enumerate(masks):
            labels, truth = patch_groups(h[i], v[i], theta), mask.flatten().int().tolist()
            k = int(labels.max()) + 1
            ari.append(adjusted_rand_score(truth, labels.flatten().tolist()))
            base.append(adjusted_rand_score(truth, position_groups(k, mask.shape[0]).flatten().tolist()))
            groups.append(k)
        layers.append({"ari": _mean(ari), "ari_position": _mean(base), "groups": _mean(groups)})
    return {"thresholds": used, "images": len(images), "layers": layers}


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def format_scores(scores: dict) -> str:
    lines = [f"{'layer':<7}{'θ':>6}{'groups':>8}{'ARI':>8}{'position':>10}", "-" * 39]
    lines += [f"{i + 1:<7}{t:>6.2f}{s['groups']:>8.1f}{s['ari']:>8.3f}{s['ari_position']:>10.3f}"
              for i, (t, s) in enumerate(zip(scores["thresholds"], scores["layers"]))]
    return "\n".join(lines + [f"({scores['images']} images with a foreground mask)"])


def main(argv=None) -> None:
    from data_pipeline.foreground import foreground_paths, foreground_set
    from model.pretrained import load_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated folder of a model with hier vision attention")
    p.add_argument("--images", default="demo", help="'demo' (held-out Twemoji) or a folder of RGBA PNGs")
    p.add_argument("--thresholds", default="calibrated",
                   type=lambda s: s if s in ("calibrated", "spec") else [float(t) for t in s.split(",")],
                   help="calibrated (default: per-layer link quantiles 0.75 -> 0.25), spec (docs/method.md §1.3's θ), "
                        "or comma-separated θ per vision layer, lowest first")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    try:
        model, cfg = load_pretrained(args.model)
        images, masks = foreground_set(foreground_paths(args.images), cfg.vision.image_size, cfg.vision.grid_size)
        scores = induction_scores(model, images, masks, args.thresholds)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(format_scores(scores))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    main()
