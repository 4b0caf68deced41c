"""Claim: activation checkpointing cuts a training step's activation memory per sample to a fraction of none at a
modest time cost, and patch dropout 0.5 roughly halves the image tower's step time.

Models: CLIP (vanilla + clip), HiCLIP (hier + clip), PyramidCLIP (vanilla + pyramid: two views, three texts, ten
ROI-align regions) and HiCLIP x PyramidCLIP, at ViT-B/16 width (224 px, 16 px patches: 197 tokens, width 768,
12 heads; text 512 wide, 8 heads, context 77; embed 512), depth cut to `--layers` blocks per tower (default 4 of
12) for CPU time. Each with no lever, block checkpointing (`checkpointing: blocks` in both towers), patch dropout
0.5, and both. fp32, dropout 0, one thread, single process (no engine: the levers act inside the model), random
inputs. A step = forward, the recipe's loss, backward.

Memory, per sample: the bytes of every live tensor at the step's peak, counted by torch's MemTracker (a
TorchDispatchMode that sees every tensor storage the step creates, once, and a snapshot at the peak), minus the
parameters and their gradients in that snapshot (gradients are allocated by the warm-up step and added into,
so the peak of the total is the peak of the rest): activations kept for backward, recomputed activations, and
temporaries — what grows with the batch — divided by the batch. It is the allocator-free live-tensor total, not
the resident set. No gradient flows into the token embedding: its backward alone makes a dense 96.5 MiB
gradient at the end of every step, a fixed cost that would otherwise be the peak at these small batches. A last
row measures CLIP at the full 12 + 12 blocks, memory only (the ratio depends on depth: one block's
recomputation is live at the backward's peak).
Time: the process's CPU time of one step (one intra-op thread, so it is the work done whatever else the shared
machine runs), the median of `--reps` rounds; within a round every configuration runs once, so load drift hits all
of them alike, and MemTracker runs in a separate round (it slows the step). "image tower" rows time the vision
tower alone (forward + backward of a sum of its embeddings), the part patch dropout shortens.

The levers are switched on the same model between runs (the flags `VisionConfig`/`TextConfig` set at build time),
so every configuration of a model shares its weights. Last line: one JSON object with the ratios vs no lever,
geometric means over the four models.

    python bench/memory.py [--layers 4] [--batch 2] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

from model.clip import CLIP  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.losses import LossConfig, compute_loss  # noqa: E402
from model.transformer import checkpoint_plan  # noqa: E402
from recipes.step import split_levels  # noqa: E402

MODELS = {"CLIP": ("vanilla", "clip"), "HiCLIP": ("hier", "clip"), "PyramidCLIP": ("vanilla", "pyramid"),
          "HiCLIP x PyramidCLIP": ("hier", "pyramid")}
LEVERS = {"none": ("none", 0.0), "blocks": ("blocks", 0.0), "patch dropout 0.5": ("none", 0.5),
          "both": ("blocks", 0.5)}


def build(attention: str, layers: int) -> CLIP:
    import copy

    cfg = copy.deepcopy(PRESETS["vit_b16"])
    cfg.vision.layers = cfg.text.layers = layers
    cfg.vision.attention = cfg.text.attention = attention
    torch.manual_seed(0)
    model = CLIP(cfg).train()
    # Its backward makes a dense 49,408 × 512 fp32 gradient (96.5 MiB) per step whatever the batch: cut off here so
    # that the step's peak is the activations' (module docstring).
    model.text.token_embed.register_forward_hook(lambda module, args, out: out.detach())
    return model


def set_levers(model: CLIP, checkpointing: str, patch_dropout: float) -> None:
    for tower in (model.visual, model.text):
        tower.transformer.checkpointed = checkpoint_plan(checkpointing, 1, len(tower.transformer.blocks))
    model.visual.cfg.patch_dropout = patch_dropout


def make_batch(b: int, pyramid: bool, gen: torch.Generator) -> dict:
    def text():
        t = torch.randint(1, 49000, (b, 77), generator=gen)
        t[:, 0], t[:, 30], t[:, 31:] = 49406, 49407, 0
        return t

    batch = {"image": torch.randn(b, 3, 224, 224, generator=gen), "text": text()}
    if pyramid:
        xy = torch.rand(b, 10, 2, generator=gen) * 0.6
        batch.update(image_local=torch.randn(b, 3, 224, 224, generator=gen), summary=text(), objects=text(),
                     summary_mask=torch.ones(b, dtype=torch.bool), objects_mask=torch.ones(b, dtype=torch.bool),
                     boxes=torch.cat([xy, xy + 0.1 + 0.3 * torch.rand(b, 10, 2, generator=gen)], -1),
                     boxes_mask=torch.ones(b, 10, dtype=torch.bool))
    return batch


def step(model: CLIP, batch: dict, loss_cfg: LossConfig) -> None:
    # Gradients stay allocated from the warm-up on (backward adds into them), so they are a constant, not part of
    # what the step's peak measures.
    model.zero_grad(set_to_none=False)
    out = model(batch)
    loss, _ = compute_loss(loss_cfg, *split_levels(out), out["logit_scale"], gather=False)
    loss.backward()


def image_step(model: CLIP, batch: dict, _) -> None:
    model.zero_grad(set_to_none=False)
    model.visual(batch["image"]).sum().backward()


def cpu_seconds(fn, *args) -> float:
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def activation_bytes(model: CLIP, batch: dict, loss_cfg: LossConfig) -> int:
    """Live bytes at the step's peak other than parameters and gradients (module docstring)."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step(model, batch, loss_cfg)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {str(k).split(".")[-1].lower(): v for k, v in peak.items()}
    return peak["Total"] - by_kind.get("param", 0) - by_kind.get("grad", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    models = {name: build(attention, args.layers) for name, (attention, _) in MODELS.items()}
    losses = {name: LossConfig(kind=kind) for name, (_, kind) in MODELS.items()}
    batches = {name: make_batch(args.batch, kind == "pyramid", gen) for name, (_, kind) in MODELS.items()}

    mem, times, image_times = {}, {}, {}
    for name, model in models.items():  # warm-up, then the memory round
        for lever, (ckpt, pd) in LEVERS.items():
            set_levers(model, ckpt, pd)
            torch.manual_seed(1)
            step(model, batches[name], losses[name])
            torch.manual_seed(1)
            mem[name, lever] = activation_bytes(model, batches[name], losses[name]) / args.batch
    for _ in range(args.reps):
        for name, model in models.items():
            for lever, (ckpt, pd) in LEVERS.items():
                set_levers(model, ckpt, pd)
                torch.manual_seed(1)
                times.setdefault((name, lever), []).append(cpu_seconds(step, model, batches[name], losses[name]))
                if name in ("CLIP", "HiCLIP") and lever in ("none", "patch dropout 0.5"):
                    image_times.setdefault((name, lever), []).append(
                        cpu_seconds(image_step, model, batches[name], None))
        print(f"round done: {time.strftime('%H:%M:%S')}", file=sys.stderr)

    full = build("vanilla", 12)  # CLIP at ViT-B/16's full depth, memory only
    full_batch = make_batch(args.batch, False, gen)
    full_mem = {}
    for lever in ("none", "blocks"):
        set_levers(full, *LEVERS[lever])
        step(full, full_batch, losses["CLIP"])
        full_mem[lever] = activation_bytes(full, full_batch, losses["CLIP"]) / args.batch
    med = {k: statistics.median(v) for k, v in times.items()}
    image_med = {k: statistics.median(v) for k, v in image_times.items()}
    print(f"ViT-B/16 width, {args.layers} + {args.layers} blocks, batch {args.batch}, fp32, 1 thread, "
          f"median of {args.reps}")
    print("| model | lever | activation MiB / sample | × none | step CPU s | × none |")
    print("|---|---|---:|---:|---:|---:|")
    for name in MODELS:
        for lever in LEVERS:
            m, t = mem[name, lever], med[name, lever]
            print(f"| {name} | {lever} | {m / 2**20:.1f} | {m / mem[name, 'none']:.2f} | {t:.2f} "
                  f"| {t / med[name, 'none']:.2f} |")
    print(f"| CLIP, 12 + 12 blocks | blocks | {full_mem['blocks'] / 2**20:.1f} "
          f"| {full_mem['blocks'] / full_mem['none']:.2f} (none {full_mem['none'] / 2**20:.1f}) | | |")
    for name in ("CLIP", "HiCLIP"):
        t0, t1 = image_med[name, "none"], image_med[name, "patch dropout 0.5"]
        print(f"| {name} image tower | patch dropout 0.5 | | | {t1:.2f} | {t1 / t0:.2f} (none {t0:.2f} s) |")

    def geo(ratios) -> float:
        return round(math.exp(statistics.mean(math.log(r) for r in ratios)), 3)

    summary = {
        "bench": "memory", "layers": args.layers, "batch": args.batch,
        "ckpt_mem_per_sample_vs_none": geo(mem[n, "blocks"] / mem[n, "none"] for n in MODELS),
        "ckpt_mem_per_sample_vs_none_clip_12_layers": round(full_mem["blocks"] / full_mem["none"], 3),
        "ckpt_time_vs_none": geo(med[n, "blocks"] / med[n, "none"] for n in MODELS),
        "patch_dropout_time_vs_none": geo(image_med[n, "patch dropout 0.5"] / image_med[n, "none"]
                                          for n in ("CLIP", "HiCLIP")),
        "patch_dropout_step_time_vs_none": geo(med[n, "patch dropout 0.5"] / med[n, "none"] for n in MODELS),
        "patch_dropout_mem_per_sample_vs_none": geo(mem[n, "patch dropout 0.5"] / mem[n, "none"] for n in MODELS),
        "both_mem_per_sample_vs_none": geo(mem[n, "both"] / mem[n, "none"] for n in MODELS),
        "both_time_vs_none": geo(med[n, "both"] / med[n, "none"] for n in MODELS),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
