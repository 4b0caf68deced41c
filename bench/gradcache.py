"""Claim: with the gradient cache, one training step's memory is set by the chunk size, not the batch.

Measures one full training step (forward, CLIP loss over the batch, backward, optimizer step) through the
DeepSpeed engine, ZeRO-3, fp32, one rank on CPU, at global batches 256, 1024 and 4096: the plain step
(recipes/step.py) and the gradient-cached step (recipes/grad_cache.py, fixed chunk size), side by side. A last
row runs the cache at the largest batch with `reduction: boundary` (one gradient reduction per chunk) to show
what `engine.coalesce_grad_reduction()` (one reduction per step) costs in memory.

Method. Each case runs in a fresh Python process with `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave
the resident set at once. The engine is built and one warm-up step runs at the chunk size; then the batch is
made, the kernel's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`), and one step runs:
    memory = VmHWM (peak resident set) − VmRSS just before the step,
every byte the step made resident (activations, logits, gradients, optimizer temporaries), not the model,
the optimizer state, the batch or the runtime. The time is that step's wall clock.

Usage: python bench/gradcache.py [--sizes 256 1024 4096] [--chunk 128] [--threads 1]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# A small CLIP whose activations, not its weights, dominate a step: 17 image tokens, 16 text tokens.
MODEL = ["model.preset=tiny", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=128",
         "model.vision.layers=2", "model.text.context_length=16", "model.text.width=128", "model.text.layers=2"]


def _status_mib(field: str) -> float:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def _batch(n: int, cfg, gen) -> dict:
    import torch

    context, size = cfg.model.text.context_length, cfg.model.vision.image_size
    text = torch.randint(1, 49000, (n, context), generator=gen)
    text[:, 0], text[:, context // 2], text[:, context // 2 + 1 :] = 49406, 49407, 0
    return {"image": torch.randn(n, 3, size, size, generator=gen), "text": text}


def _run_case(n: int, mode: str, chunk: int, threads: int) -> dict:
    """In the child process: build the engine, warm up at the chunk size, measure one step at batch n."""
    import torch

    from model.clip import CLIP
    from recipes.config import load_config
    from recipes.engine import build_engine, deepspeed_config, init_distributed, model_init_context
    from recipes.step import train_step

    torch.set_num_threads(threads)
    reduction = "boundary" if mode == "cached-boundary" else "coalesce"
    cfg = load_config(None, MODEL + [f"train.batch_size={n}", "train.precision=fp32", "train.warmup_steps=1",
                                     f"grad_cache.chunk_size={chunk if mode != 'plain' else 0}",
                                     f"grad_cache.reduction={reduction}", "loss.kind=clip"])
    init_distributed()
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    with model_init_context(ds):
        model = CLIP(cfg.model)
    engine = build_engine(model, cfg, ds)
    gen = torch.Generator().manual_seed(0)
    train_step(engine, _batch(chunk, cfg, gen), cfg.loss, cfg.grad_cache)  # warm-up: kernels, allocator, optimizer

    batch = _batch(n, cfg, gen)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    train_step(engine, batch, cfg.loss, cfg.grad_cache)
    seconds = time.perf_counter() - start
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return {"mem_mib": _status_mib("VmHWM") - before, "time_s": seconds, "params": params}


def _child(n: int, mode: str, chunk: int, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", str(n), mode, "--chunk", str(chunk),
                          "--threads", str(threads)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case N={n} {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_run_case(int(args.child[0]), args.child[1], args.chunk, args.threads)))
        return

    print(f"| global batch | step | step memory (MiB) | step time (s) |  (ZeRO-3, fp32, 1 rank, CPU, chunk "
          f"{args.chunk}, {args.threads} thread(s))")
    print("|---|---|---|---|")
    results: dict[tuple[int, str], dict] = {}
    cases = [(n, mode) for n in args.sizes for mode in ("plain", "cached")] + [(max(args.sizes), "cached-boundary")]
    for n, mode in cases:
        results[n, mode] = r = _child(n, mode, args.chunk, args.threads)
        print(f"| {n} | {mode} | {r['mem_mib']:.0f} | {r['time_s']:.2f} |", flush=True)

    small, large = min(args.sizes), max(args.sizes)
    model_mib = results[large, "cached"]["params"] * 4 / 2**20
    print(f"model: {results[large, 'cached']['params'] / 1e6:.1f} M parameters = {model_mib:.0f} MiB of fp32 gradients")
    mem = {key: r["mem_mib"] for key, r in results.items()}
    print(json.dumps({
        "bench": "gradcache",
        f"mem_{large}_vs_{small}_cached": round(mem[large, "cached"] / mem[small, "cached"], 3),
        f"mem_{large}_vs_{small}_plain": round(mem[large, "plain"] / mem[small, "plain"], 3),
        "time_overhead_cached": round(results[large, "cached"]["time_s"] / results[large, "plain"]["time_s"], 3),
        f"mem_{large}_cached_mib": round(mem[large, "cached"], 1),
        f"mem_{large}_plain_mib": round(mem[large, "plain"], 1),
        "coalesce_extra_mib": round(mem[large, "cached"] - mem[large, "cached-boundary"], 1),
        "model_grad_mib": round(model_mib, 1),
        "chunk": args.chunk,
    }))


if __name__ == "__main__":
    main()
