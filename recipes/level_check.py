"""Say at start when a PyramidCLIP level is missing from most samples, instead of logging `pairs=0` for ever.

The shards decide which levels a sample has (data_pipeline/annotate.py): no `summary`, no `objects`, no `boxes`
leave the loss terms that use them without valid pairs (model/losses.py drops such terms silently, by design).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from model.losses import LossConfig

log = logging.getLogger("hiclip")

# batch key of the per-sample mask -> the level it gates, and the name a user knows it by
MASKED_LEVELS = {"summary_mask": ("summary", "summaries"), "objects_mask": ("objects", "objects"),
                 "boxes_mask": ("region", "regions")}
WARN_BELOW = 0.5  # "most samples lack it"


def level_presence(batches: list[dict]) -> dict[str, float]:
    """level -> fraction of the samples of `batches` that have it (levels without a mask are always there)."""
    present: dict[str, float] = {}
    for key, (level, _) in MASKED_LEVELS.items():
        masks = [b[key] for b in batches if key in b]
        if masks:
            flat = torch.cat([m.reshape(m.shape[0], -1).any(dim=1) for m in masks])  # boxes: any region slot
            present[level] = flat.float().mean().item()
    return present


def missing_level_warnings(batches: list[dict], loss: LossConfig) -> list[str]:
    """One line per level present in fewer than half of the samples, naming the loss terms it weakens."""
    terms = [pair for group in loss.term_groups().values() for pair in group]
    presence, lines = level_presence(batches), []
    for level, name in MASKED_LEVELS.values():
        share = presence.get(level)
        uses = [pair for pair in terms if level in pair]
        if share is None or share >= WARN_BELOW or not uses:
            continue
        effect = "inactive" if share == 0 else "short of pairs"
        lines.append(f"{name} present in {100 * share:.0f}% of samples: {len(uses)} of {len(terms)} loss terms "
                     f"{effect} ({', '.join('-'.join(pair) for pair in uses)}); see docs/data.md (annotate)")
    return lines


def warn_missing_levels(batches: Iterator[dict], loss: LossConfig, enabled: bool = True,
                        first: int = 1) -> Iterator[dict]:
    """Pass `batches` through; once the first `first` have been seen, log `missing_level_warnings` once, before
    the first step trains on them. One batch of this rank's is a fair sample: the shards are shuffled at build
    time and again by the reader, and every rank reads the same shards."""
    seen: list[dict] = []
    for batch in batches:
        if enabled and len(seen) < first:
            seen.append({k: batch[k] for k in MASKED_LEVELS if k in batch})
            if len(seen) == first:
                for line in missing_level_warnings(seen, loss):
                    log.warning("%s", line)
        yield batch
