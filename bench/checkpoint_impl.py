"""Which activation checkpoint: torch's non-reentrant `torch.utils.checkpoint` or DeepSpeed's
`deepspeed.checkpointing.checkpoint`, measured side by side under ZeRO-3.

One DeepSpeed engine (ZeRO-3, fp32, one CPU rank, `ds_configs/zero3.json` with every parameter partitioned) holds a
HiCLIP model (hier attention through `attn_impl: reference`) at ViT-B/16 width (224 px, 16 px patches, width
768, 12 heads; text 512 wide, 8 heads) cut to 4 vision and 4 text blocks for CPU time, CLIP loss, batch 4,
dropout 0.1. The same engine and weights run one
training step (forward, loss, backward; lr = 0) per variant in turn, `--reps` rounds:
- none: no checkpointing;
- torch: every block through torch's non-reentrant checkpoint (what model/transformer.py does);
- deepspeed: every block through DeepSpeed's (reentrant, an autograd Function), given the block's tensors flat:
  it only sees top-level tensor arguments, so the Group prior's pair of link tensors is passed as two;
- deepspeed-nested: DeepSpeed's, handed the links as the pair the block takes (what a drop-in swap would do).
Each variant's gradients are compared with `none`'s (full fp32 gradients, same dropout seed). ZeRO-3's parameter
all-gathers are not counted here: a world of one gathers nothing (tests/integration/test_levers_distributed.py
counts them on 2 ranks for torch's). Memory: peak resident set during the step minus the resident set just
before it (`/proc/self/clear_refs`, glibc's mmap threshold lowered so freed tensors leave the resident set);
it includes the step's fresh gradients (model-sized), so it is not activation memory alone. Time: the process's
CPU time for the step (one thread: the work done, whatever else the shared machine runs), best of the rounds.
Last line: one JSON object.

    python bench/checkpoint_impl.py [--reps 3] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("none", "torch", "deepspeed", "deepspeed-nested")


def _status_mib(field: str) -> float:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def deepspeed_flat(block, x, links, **kwargs):
    """DeepSpeed's checkpoint around one block, every tensor a top-level argument and output."""
    import deepspeed
    import torch

    kind = "none" if links is None else "tensor" if torch.is_tensor(links) else "pair"
    flat = () if links is None else (links,) if kind == "tensor" else tuple(links)

    def run(x, *flat_links):
        prev = None if kind == "none" else flat_links[0] if kind == "tensor" else tuple(flat_links)
        out, new = block(x, prev, **kwargs)
        return (out,) if new is None else (out, new) if torch.is_tensor(new) else (out, *new)

    outs = deepspeed.checkpointing.checkpoint(run, x, *flat)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if len(outs) == 1:
        return outs[0], None
    return (outs[0], outs[1]) if len(outs) == 2 else (outs[0], tuple(outs[1:]))


def deepspeed_nested(block, x, links, **kwargs):
    import deepspeed

    return deepspeed.checkpointing.checkpoint(block, x, links, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from model import transformer
    from model.losses import compute_loss
    from recipes.config import load_config
    from recipes.engine import build_engine, deepspeed_config, init_distributed
    from recipes.step import split_levels

    deepspeed.utils.logger.setLevel("WARNING")
    torch.set_num_threads(1)
    cfg = load_config(None, [
        "model.preset=vit_b16", "model.vision.layers=4", "model.text.layers=4", "model.vision.attention=hier",
        "model.text.attention=hier", "model.dropout=0.1", "model.hier.attn_impl=reference",
        f"train.batch_size={args.batch}", "train.precision=fp32", "train.lr=0.0", "train.grad_clip=0.0",
        "train.warmup_steps=1", "loss.kind=clip"])
    init_distributed()
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False)
    ds = deepspeed_config(cfg)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    torch.manual_seed(0)
    engine = build_engine(cfg, ds)
    towers = (engine.module.visual.transformer, engine.module.text.transformer)
    impls = {"torch": transformer._checkpoint, "deepspeed": deepspeed_flat, "deepspeed-nested": deepspeed_nested}
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(1, 49000, (args.batch, 77), generator=gen)
    text[:, 0], text[:, 20], text[:, 21:] = 49406, 49407, 0
    batch = {"image": torch.randn(args.batch, 3, 224, 224, generator=gen), "text": text}

    def step(variant: str):
        for t in towers:
            t.checkpointed = [variant != "none"] * len(t.blocks)
        if variant != "none":
            transformer._checkpoint = impls[variant]
        torch.manual_seed(5)
        before = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start = time.process_time()
        out = engine(batch)
        loss, _ = compute_loss(cfg.loss, *split_levels(out), out["logit_scale"], gather=True)
        engine.backward(loss)
        seconds = time.process_time() - start
        mem = _status_mib("VmHWM") - before
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        transformer._checkpoint = impls["torch"]
        return seconds, mem, grads

    step("none")  # warm-up: ZeRO-3 records its module trace
    results = {v: {"s": [], "mib": [], "rel_err": None} for v in VARIANTS}
    reference = None
    for _ in range(args.reps):
        for v in VARIANTS:
            seconds, mib, grads = step(v)
            r = results[v]
            r["s"].append(seconds)
            r["mib"].append(mib)
            if v == "none":
                reference = grads
            r["rel_err"] = max(((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item()
                               for n, g in reference.items() if g.norm() > 0)

    print(f"HiCLIP, ViT-B/16 width, 4 + 4 blocks, batch {args.batch}, ZeRO-3 one CPU rank, fp32; best of {args.reps}")
    print("| checkpoint | step CPU s | × none | step memory MiB | × none | max rel. grad error vs none |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {v: (min(r["s"]), max(r["mib"])) for v, r in results.items()}
    for v, r in results.items():
        s, m = best[v]
        print(f"| {v} | {s:.2f} | {s / best['none'][0]:.2f} | {m:.0f} | {m / best['none'][1]:.2f} "
              f"| {r['rel_err']:.1e} |")
    print(json.dumps({
        "bench": "checkpoint_impl",
        "deepspeed_vs_torch_time": round(best["deepspeed"][0] / best["torch"][0], 3),
        "deepspeed_vs_torch_mem": round(best["deepspeed"][1] / best["torch"][1], 3),
        "torch_vs_none_mem": round(best["torch"][1] / best["none"][1], 3),
        "torch_vs_none_time": round(best["torch"][0] / best["none"][0], 3),
        "torch_grad_rel_err": results["torch"]["rel_err"], "deepspeed_grad_rel_err": results["deepspeed"]["rel_err"],
        "deepspeed_nested_grad_rel_err": results["deepspeed-nested"]["rel_err"],
    }))


if __name__ == "__main__":
    main()
