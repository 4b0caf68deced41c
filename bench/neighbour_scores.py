"""Claim: a patch grid's neighbour scores cost less from one Gram matrix per sample than from elementwise products,
up to the grid size `model.hier_prior.gram_scores` allows (12×12), and not beyond it.

The Group prior scores each patch against its 4-adjacent neighbours: q_u·k_v for the four shifted pairs of the
[B, H, W, D] query and key maps. `_NeighbourDots` takes them as products and sums over channels (~12 passes over
[B, P, D] tensors, forward and backward); `_GridGramDots` reads them off S = Q Kᵀ per sample (three batched GEMMs,
P/4 times the multiply-adds). Which wins is memory traffic against FLOPs, so it depends on P and on the machine:
this bench times both, forward + backward, side by side at D = 768 (ViT-B) with about 6,000 patch tokens per
batch, the variants interleaved, median CPU time over the repeats. Last line: one JSON object,
`gram_over_elementwise_<side>` per grid side and whether `gram_scores` picks the faster one at each.

    python bench/neighbour_scores.py [--sides 7 10 12 14 16] [--width 768] [--repeats 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model.hier_prior import _GridGramDots, _NeighbourDots, gram_scores
from recipes import host_memory


def fwd_bwd(scores, a: torch.Tensor, t: torch.Tensor, weights: list[torch.Tensor]) -> None:
    torch.autograd.grad(scores(a, t), (a, t), weights)


def time_side(side: int, width: int, repeats: int) -> dict[str, float]:
    batch = max(1, round(6000 / side**2))
    gen = torch.Generator().manual_seed(side)
    a, t = (torch.randn(batch, side, side, width, generator=gen).requires_grad_() for _ in range(2))
    south_north = torch.randn(batch, side - 1, side, generator=gen)
    east_west = torch.randn(batch, side, side - 1, generator=gen)
    weights = [south_north, south_north, east_west, east_west]
    variants = {"elementwise": lambda a, t: _NeighbourDots.apply(a, t, 1, 2), "gram": _GridGramDots.apply}
    for scores in variants.values():  # warm-up: allocator, first-call dispatch
        fwd_bwd(scores, a, t, weights)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, scores in variants.items():
            start = time.process_time()
            fwd_bwd(scores, a, t, weights)
            times[name].append(time.process_time() - start)
    return {"batch": batch, **{name: statistics.median(ts) * 1e3 for name, ts in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[7, 10, 12, 14, 16])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU time is exact with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host_memory.keep_freed_memory()  # as the trainer runs on a CPU: freed tensors reused, not page-faulted in again
    summary: dict[str, object] = {"bench": "neighbour_scores", "width": args.width}
    picks = []
    print(f"{'grid':>7} {'batch':>6} {'elementwise ms':>15} {'gram ms':>9} {'gram / elem':>12}  gram_scores")
    for side in args.sides:
        r = time_side(side, args.width, args.repeats)
        ratio = r["gram"] / r["elementwise"]
        picked = gram_scores(side * side)
        picks.append(picked == (ratio < 1.0))
        print(f"{side:>3}×{side:<3} {r['batch']:>6} {r['elementwise']:>15.2f} {r['gram']:>9.2f} {ratio:>12.3f}  "
              f"{'gram' if picked else 'elementwise'}")
        summary[f"gram_over_elementwise_{side}"] = round(ratio, 3)
    summary["gram_scores_picks_the_faster"] = all(picks)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
