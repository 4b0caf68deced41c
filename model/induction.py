"""Unsupervised hierarchy induction from link probabilities (docs/method.md §1.3): pure functions, no model, no files.

Text: Tree Transformer's top-down parse. Image: per layer, patch groups = connected components of unbroken edges.
Layers are listed bottom (index 0) to top, as the towers return them with `return_links=True`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TEXT_THRESHOLD = 0.8
# θ_l for a 12-layer vision tower (docs/method.md §1.3); other depths sample this curve at the same relative depth.
IMAGE_THRESHOLDS_12 = (0.35, 0.5, 0.5, 0.6, 0.8, 0.85, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9)


# ---------------------------------------------------------------------------------------------------------------
# Text


def parse_tree(words: Sequence[str], links: Sequence[Sequence[float]] | Tensor, threshold: float = TEXT_THRESHOLD,
               min_layer: int = 0) -> str:
    """Bracketed constituency tree of `words` from per-layer links [layers, len(words) - 1], bottom layer first.

    Starting at the top layer, a span splits at its weakest link; if even that link exceeds `threshold` the span
    is looked at one layer down, and a span that no layer down to `min_layer` splits is emitted flat.
    """
    links = torch.as_tensor(links, dtype=torch.float64)
    if links.dim() != 2 or links.shape[1] != len(words) - 1:
        raise ValueError(f"links must be [layers, {len(words) - 1}] for {len(words)} words, got {tuple(links.shape)}")

    def build(layer: int, start: int, end: int) -> str:  # the span words[start:end]
        if end - start == 1:
            return words[start]
        span_links = links[layer, start:end - 1]
        weakest = int(span_links.argmin())
        if span_links[weakest] > threshold:
            if layer <= min_layer:
                return "(" + " ".join(words[start:end]) + ")"
            return build(layer - 1, start, end)
        split = start + weakest + 1
        return f"({build(layer, start, split)} {build(layer, split, end)})"

    if not words:
        return "()"
    return build(links.shape[0] - 1, 0, len(words))


# ---------------------------------------------------------------------------------------------------------------
# Image


def image_thresholds(layers: int) -> tuple[float, ...]:
    """docs/method.md's θ for 12 layers; for another depth, θ at the same relative depth (nearest of the 12)."""
    if layers == len(IMAGE_THRESHOLDS_12):
        return IMAGE_THRESHOLDS_12
    return tuple(IMAGE_THRESHOLDS_12[round(i * 11 / max(layers - 1, 1))] for i in range(layers))


def calibrated_thresholds(per_layer_links: Sequence[Tensor], low: float = 0.75, high: float = 0.25) -> tuple[float, ...]:
    """θ_l = a quantile of layer l's own links (pooled over a set of images), from `low` at the bottom layer to
    `high` at the top: fine groups low, coarse groups high, whatever the depth and the training length.

    SPEC's θ suit a 12-layer model whose links approach 1 near the top; a shallow or briefly trained model's links
    sit well below them (a 4-layer demo model: medians 0.26-0.69), so every edge breaks at every layer. Quantiles
    of the layer's own links need no labels and no depth-specific table (docs/evaluation.md).
    """
    n = len(per_layer_links)
    quantiles = [low + (high - low) * i / max(n - 1, 1) for i in range(n)]
    return tuple(round(float(torch.quantile(links.flatten().double(), q)), 4)
                 for links, q in zip(per_layer_links, quantiles))


def patch_groups(horizontal: Tensor, vertical: Tensor, threshold: float) -> Tensor:
    """Group label per patch [H, W] (0..groups-1, in row-major order of first appearance).

    horizontal [H, W-1] links (r, c)–(r, c+1), vertical [H-1, W] links (r, c)–(r+1, c); an edge with a link
    below `threshold` is broken; groups are the connected components of the unbroken edges.
    """
    h, w = vertical.shape[0] + 1, horizontal.shape[1] + 1
    parent = list(range(h * w))

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]  # path halving
            u = parent[u]
        return u

    def join(u: int, v: int) -> None:
        ru, rv = root(u), root(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)

    for r, c in (horizontal >= threshold).nonzero().tolist():
        join(r * w + c, r * w + c + 1)
    for r, c in (vertical >= threshold).nonzero().tolist():
        join(r * w + c, (r + 1) * w + c)
    labels: dict[int, int] = {}
    out = [labels.setdefault(root(u), len(labels)) for u in range(h * w)]
    return torch.tensor(out).view(h, w)


def image_groups(per_layer: Sequence[tuple[Tensor, Tensor]], thresholds: Sequence[float] | None = None) -> list[Tensor]:
    """Per-layer group labels [H, W] for one image, from its per-layer (horizontal, vertical) links."""
    thresholds = image_thresholds(len(per_layer)) if thresholds is None else tuple(thresholds)
    if len(thresholds) != len(per_layer):
        raise ValueError(f"{len(per_layer)} layers but {len(thresholds)} thresholds")
    return [patch_groups(h, v, t) for (h, v), t in zip(per_layer, thresholds)]


# Tableau's 10 categorical colours: far apart from each other, and readable over a photo at 45% opacity.
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], dtype=np.uint8)


def group_colours(labels: Tensor) -> np.ndarray:
    """[groups, 3] uint8: a palette colour per group such that touching groups differ (greedy map colouring in
    label order; a group whose neighbours already hold every colour takes the least used among them)."""
    grid = labels.numpy()
    n = int(grid.max()) + 1
    touching: list[set[int]] = [set() for _ in range(n)]
    for a, b in ((grid[:, 1:], grid[:, :-1]), (grid[1:, :], grid[:-1, :])):
        for u, v in zip(a[a != b].tolist(), b[a != b].tolist()):
            touching[u].add(v)
            touching[v].add(u)
    colour = np.full(n, -1)
    for group in range(n):
        taken = [int(colour[v]) for v in touching[group] if colour[v] >= 0]
        free = [c for c in range(len(PALETTE)) if c not in taken]
        colour[group] = free[0] if free else min(range(len(PALETTE)), key=taken.count)
    return PALETTE[colour]


def overlay(image: np.ndarray, labels: Tensor, alpha: float = 0.45) -> np.ndarray:
    """Tint each patch group of `image` [S, S, 3] uint8 with its own colour and outline the groups in black.

    The [g, g] group map is scaled to any S (nearest patch); outlines are S // 128 pixels wide (at least 1)."""
    s, g = image.shape[0], labels.shape[0]
    patch = np.arange(s) * g // s
    label_map = labels.numpy()[patch[:, None], patch[None, :]]  # [S, S]
    out = (1 - alpha) * image.astype(np.float64) + alpha * group_colours(labels)[label_map]
    edge = np.zeros((s, s), dtype=bool)
    edge[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    edge[1:, :] |= label_map[1:, :] != label_map[:-1, :]
    border = edge.copy()
    for shift in range(1, max(1, s // 128)):  # thicken towards the lower right
        border[shift:, :] |= edge[:-shift, :]
        border[:, shift:] |= edge[:, :-shift]
    out[border] = 0
    return out.round().clip(0, 255).astype(np.uint8)
