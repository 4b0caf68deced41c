"""Claim: HiCLIP attention costs little over vanilla attention, and the efficient path beats the reference.

One full ViT-B transformer block (width 768, 12 heads, MLP ×4; attention + MLP, forward + backward) on CPU, with
the vision Group prior (CLS + an S×S patch grid) at N = 50, 197, 577 tokens (ViT-B/32 and B/16 at 224², B/16 at
384²), for: vanilla SDPA, the hier reference (materialised C, multiply), and the hier efficient path (SDPA with
log C from the O(N) tables) in both prior modes. Time is the process's CPU time per step (with one intra-op
thread it is the work done, whatever else runs on a shared machine), the median over repeats with the variants
interleaved; `hier FLOPs / vanilla` is the matmul FLOP ratio the hier variants cannot go below on a
GEMM-bound CPU (model/flops.py, with the prior's per-batch d×d fold where the prior takes it); peak memory is
the largest total of live tensors during one step (torch MemTracker: parameters, activations, temporaries,
gradients). Last line: one JSON object with the ratios at N = 197, the FLOP floor and time over it included.

    python bench/attention.py [--batch 8] [--batch-577 2] [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from model import flops
from model.config import HierConfig
from model.hier_prior import GroupPrior
from model.transformer import Block
from recipes import host_memory

WIDTH, HEADS, MLP_RATIO = 768, 12, 4.0
GRIDS = {50: 7, 197: 14, 577: 24}
# name: (prior_mode, attn_impl), or None for a vanilla block
VARIANTS = {
    "vanilla_sdpa": None,
    "hier_reference": ("multiply", "reference"),
    "hier_efficient_bias": ("bias", "sdpa"),
    "hier_efficient_multiply": ("multiply", "sdpa"),
}


def make_blocks(grid: int) -> dict[str, Block]:
    torch.manual_seed(0)
    base = Block(WIDTH, HEADS, MLP_RATIO, 0.0)
    prior = GroupPrior(WIDTH, grid=(grid, grid), has_cls=True, cfg=HierConfig())
    blocks = {}
    for name, variant in VARIANTS.items():
        block = copy.deepcopy(base)  # the same attention and MLP weights in every variant
        if variant is not None:
            block.prior = copy.deepcopy(prior)
            block.prior.cfg = HierConfig(prior_mode=variant[0], attn_impl=variant[1])
        blocks[name] = block
    return blocks


def flop_ratio(n: int, batch: int) -> float:
    """Hier block over vanilla block, training FLOPs (model/flops.py): the prior's projection of the patch
    tokens as the batch makes it, with the per-batch fold W_QᵀW_K that the per-sample count leaves out (a third of
    the prior's work at N = 197, batch 8). The CPU runs the prior's GEMMs at the rate of the block's own."""
    vanilla = batch * flops.block(n, WIDTH, MLP_RATIO)
    return (vanilla + flops.prior_batch(GRIDS[n] ** 2, batch, WIDTH)) / vanilla


def step(block: Block, x: torch.Tensor) -> None:
    out, _ = block(x, None, key_padding_mask=None, causal=False)
    out.sum().backward()


def time_variants(blocks: dict[str, Block], x, repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in blocks}
    names = list(blocks)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order: no variant always first
            block = blocks[name]
            block.zero_grad(set_to_none=True)
            xr = x.detach().requires_grad_()
            start = time.process_time()
            step(block, xr)
            elapsed = time.process_time() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(block: Block, x) -> int:
    block.zero_grad(set_to_none=True)
    xr = x.detach().requires_grad_()
    tracker = MemTracker()
    tracker.track_external(block, xr)
    with tracker:
        step(block, xr)
    return tracker.get_tracker_snapshot("peak")[x.device]["Total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-577", type=int, default=2, help="smaller batch at N = 577 to keep the run short")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU time is exact with 1)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(GRIDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host_memory.keep_freed_memory()  # as the trainer runs on CPU (recipes/engine.py)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"block width {WIDTH}, heads {HEADS}, fwd+bwd CPU time, median of {args.repeats}")
    print(f"{'N':>4} {'batch':>5} {'variant':<24} {'time ms':>9} {'× vanilla':>9} {'peak MiB':>9} {'× vanilla':>9}")
    results = {}
    for n in args.tokens:
        batch = args.batch_577 if n == 577 else args.batch
        blocks = make_blocks(GRIDS[n])
        x = torch.randn(batch, n, WIDTH)
        times = time_variants(blocks, x, args.repeats, args.warmup)
        memory = {name: peak_memory(block, x) for name, block in blocks.items()}
        results[n] = (times, memory)
        for name in blocks:
            print(f"{n:>4} {batch:>5} {name:<24} {times[name] * 1e3:>9.1f} {times[name] / times['vanilla_sdpa']:>9.2f} "
                  f"{memory[name] / 2**20:>9.1f} {memory[name] / memory['vanilla_sdpa']:>9.2f}", flush=True)
        print(f"{n:>4} {batch:>5} {'hier FLOPs / vanilla':<24} {flop_ratio(n, batch):>19.3f}")

    summary = {"bench": "attention"}
    if 197 in results:
        times, memory = results[197]
        multiply = times["hier_efficient_multiply"] / times["vanilla_sdpa"]
        floor = flop_ratio(197, args.batch)
        summary.update({
            "n197_bias_vs_vanilla": round(times["hier_efficient_bias"] / times["vanilla_sdpa"], 3),
            "n197_multiply_vs_vanilla": round(multiply, 3),
            # the floor of the two lines above: what the prior's extra FLOPs cost at this batch
            "n197_flop_ratio": round(floor, 3),
            "n197_multiply_time_over_flops": round(multiply / floor, 3),
            "n197_efficient_vs_reference": round(times["hier_efficient_multiply"] / times["hier_reference"], 3),
            "n197_mem_efficient_vs_reference": round(memory["hier_efficient_multiply"] / memory["hier_reference"], 3),
        })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
