"""Unsupervised hierarchy induction from link probabilities (SPEC §1.3): pure functions, no model, no files.

Text: Tree Transformer's top-down parse. Image: per layer, patch groups = connected components of unbroken edges.
Layers are listed bottom (index 0) to top, as the towers return them with `return_links=True`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TEXT_THRESHOLD = 0.8
# θ_l for a 12-layer vision tower (SPEC §1.3); other depths sample this curve at the same relative depth.
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
    """SPEC's θ for 12 layers; for another depth, θ at the same relative depth (nearest of the 12)."""
    if layers == len(IMAGE_THRESHOLDS_12):
        return IMAGE_THRESHOLDS_12
    return tuple(IMAGE_THRESHOLDS_12[round(i * 11 / max(layers - 1, 1))] for i in range(layers))


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


def overlay(image: np.ndarray, labels: Tensor, alpha: float = 0.45, seed: int = 0) -> np.ndarray:
    """Tint each patch group of `image` [S, S, 3] uint8 with its own colour and draw group borders in white."""
    s = image.shape[0]
    g = labels.shape[0]
    cell = s // g
    label_map = np.kron(labels.numpy(), np.ones((cell, cell), dtype=np.int64))  # [g*cell, g*cell]
    label_map = np.pad(label_map, ((0, s - label_map.shape[0]), (0, s - label_map.shape[1])), mode="edge")
    palette = np.random.default_rng(seed).integers(0, 256, size=(int(labels.max()) + 1, 3))
    out = (1 - alpha) * image.astype(np.float64) + alpha * palette[label_map]
    border = np.zeros((s, s), dtype=bool)
    border[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    border[1:, :] |= label_map[1:, :] != label_map[:-1, :]
    out[border] = 255
    return out.round().clip(0, 255).astype(np.uint8)
