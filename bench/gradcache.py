"""Claim: with the gradient cache, one training step's memory is set by the chunk size, not the batch.

Measures one full training step (forward, CLIP loss over the batch, backward, optimizer step) through the
DeepSpeed engine, ZeRO-3, fp32, one rank on CPU, at global batches 256, 1024 and 4096: the plain step
(recipes/step.py) and the gradient-cached step (recipes/grad_cache.py, fixed chunk size), side by side. A last
row runs the cache at the largest batch with `reduction: boundary` (one gradient reduction per chunk) to show
what `engine.coalesce_grad_reduction()` (one reduction per step) costs in memory; for that comparison each
reduction mode also runs alone on 2 ranks (torchrun, gloo), comparing rank 0's lifetime peak RSS.

Method. Each batch size runs in a fresh Python process with `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors
leave the resident set at once. The engine is built and every mode takes one warm-up step at the chunk size;
then rounds run one step per mode in turn. Before each step the kernel's peak-RSS mark is reset
(`echo 5 > /proc/self/clear_refs`):
    memory = VmHWM (peak resident set) − VmRSS just before the step,
every byte the step made resident (activations, logits, gradients, optimizer temporaries), not the model,
the optimizer state, the batch or the runtime (the largest over rounds). The time is the step's wall clock,
the best over `--reps` rounds; alternating modes within one process keeps machine-load drift out of the ratio.
The time ratio of the JSON line (`time_overhead_cached`, the worst of the timed batches) is the median over
`--time-reps` rounds of the cached step's time over the plain step's in the same round, from separate runs at
`--time-sizes` under glibc's default malloc settings, i.e. with the trainer's host-memory policy
(recipes/host_memory.py): the lowered mmap threshold the memory needs makes every tensor fault in afresh, and
the cached step allocates more often. The cached step gathers ZeRO-3's parameters once for all its passes
(`grad_cache.gather: auto` → step, recipes/zero3_gather.py); the timing runs also time it with DeepSpeed's own
per-module gathers in every pass (`gather: pass`, mode `cached-per-pass`) in the same rounds, and the engine's
fixed cost of one no-grad forward call (on 2 samples, against the same module without DeepSpeed), which the
per-pass mode pays in every module of every chunk.

Usage: python bench/gradcache.py [--sizes 256 1024 4096] [--chunk 128] [--threads 1] [--reps 2]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _batch(n: int, cfg, gen) -> dict:
    import torch

    context, size = cfg.model.text.context_length, cfg.model.vision.image_size
    text = torch.randint(1, 49000, (n, context), generator=gen)
    text[:, 0], text[:, context // 2], text[:, context // 2 + 1 :] = 49406, 49407, 0
    return {"image": torch.randn(n, 3, size, size, generator=gen), "text": text}


def _run_size(n: int, modes: list[str], chunk: int, threads: int, reps: int, overhead: bool = False) -> dict:
    """In the child process: one engine, every mode warmed up at the chunk size, then `reps` rounds that run
    one step per mode at batch n in turn (rounds alternate, so a load change on the machine hits all modes).
    Also returns the process's lifetime peak RSS: with one mode, what a rank needs for that training mode, and
    with `overhead` the engine's fixed cost per forward call (`_call_overhead_ms`)."""
    import torch

    from recipes.config import load_config
    from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
    from recipes.grad_cache import GradCacheConfig
    from recipes.step import train_step

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, MODEL + [f"train.batch_size={n // world}", "train.precision=fp32",
                                     "train.warmup_steps=1", "loss.kind=clip"])
    caches = {"plain": None, "cached": GradCacheConfig(chunk, "coalesce"),
              "cached-boundary": GradCacheConfig(chunk, "boundary"),
              "cached-per-pass": GradCacheConfig(chunk, "coalesce", "pass")}
    rank = init_distributed().rank
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    gen = torch.Generator().manual_seed(0)
    for mode in modes:  # warm-up: kernels, allocator, optimizer state, ZeRO-3 trace
        train_step(engine, _batch(chunk, cfg, gen), cfg.loss, caches[mode])

    batch = _batch(n // world, cfg, gen)
    lifetime_peak = _status_mib("VmHWM")  # model, engine, warm-up: everything up to here
    memory: dict[str, float] = {mode: 0.0 for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(reps):
        for mode in modes:
            lifetime_peak = max(lifetime_peak, _status_mib("VmHWM"))
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
            before = _status_mib("VmRSS")
            start = time.perf_counter()
            train_step(engine, batch, cfg.loss, caches[mode])
            times[mode].append(time.perf_counter() - start)
            memory[mode] = max(memory[mode], _status_mib("VmHWM") - before)
    lifetime_peak = max(lifetime_peak, _status_mib("VmHWM"))
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    result = {mode: {"mem_mib": memory[mode], "time_s": min(times[mode]), "times_s": times[mode],
                     "params": params, "process_peak_mib": lifetime_peak} for mode in modes}
    if overhead:
        result["call_overhead_ms"] = _call_overhead_ms(engine, cfg, gen)
    leave_distributed()
    return rank, result


def _call_overhead_ms(engine, cfg, gen, calls: int = 40, rounds: int = 7) -> float:
    """What one no-grad forward costs through the ZeRO-3 engine over the same module without DeepSpeed, on 2
    samples (so the compute is small and the fixed per-call cost shows): the gradient cache pays it once per
    chunk and per pass. Median over rounds of the difference, the two timed back to back in each round."""
    import torch

    from model.clip import CLIP

    bare, batch = CLIP(cfg.model), _batch(2, cfg, gen)

    def per_call(model) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(calls):
                model(batch)
        return (time.perf_counter() - start) / calls * 1e3

    per_call(engine), per_call(bare)  # warm-up
    return statistics.median(per_call(engine) - per_call(bare) for _ in range(rounds))


def _child(n: int, modes: list[str], chunk: int, threads: int, reps: int, ranks: int = 1, timing: bool = False) -> dict:
    """Run one batch size in fresh processes (`ranks` of them under torchrun); rank 0's measurements.

    timing: glibc's default threshold, so the trainer's host-memory policy applies (recipes/host_memory.py) and
    the step times are the trainer's; otherwise every freed tensor leaves the resident set, for the memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
                "PYTHONPATH": str(REPO_ROOT), **({} if timing else {"MALLOC_MMAP_THRESHOLD_": "65536"})})
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", _free_port()]
    cmd = [sys.executable, *(launcher if ranks > 1 else []), __file__, "--child", str(n), ",".join(modes),
           "--chunk", str(chunk), "--threads", str(threads), "--reps", str(reps), *(["--overhead"] if timing else [])]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"batch {n} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2, help="rounds of steps; the time is the best round's")
    parser.add_argument("--time-sizes", type=int, nargs="*", default=[1024, 4096],
                        help="global batches timed in a separate run under the trainer's memory policy")
    parser.add_argument("--time-reps", type=int, default=7, help="rounds of the timing runs (median ratio)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        modes = args.child[1].split(",")
        rank, result = _run_size(int(args.child[0]), modes, args.chunk, args.threads, args.reps, args.overhead)
        if rank == 0:
            print(json.dumps(result))
        return

    print(f"| global batch | step | step memory (MiB) | step time (s) |  (ZeRO-3, fp32, 1 rank, CPU, chunk "
          f"{args.chunk}, {args.threads} thread(s), best of {args.reps})")
    print("|---|---|---|---|")
    results: dict[tuple[int, str], dict] = {}
    for n in args.sizes:
        modes = ["plain", "cached"] + (["cached-boundary"] if n == max(args.sizes) else [])
        for mode, r in _child(n, modes, args.chunk, args.threads, args.reps).items():
            results[n, mode] = r
            print(f"| {n} | {mode} | {r['mem_mib']:.0f} | {r['time_s']:.2f} |", flush=True)

    # What coalescing costs under ZeRO-3: 2 ranks (with one, the partition is the whole model), one run per
    # reduction mode, compared by rank 0's lifetime peak RSS (what a rank needs).
    small, large = min(args.sizes), max(args.sizes)
    peak = {mode: _child(small, [mode], args.chunk, args.threads, 1, ranks=2)[mode]["process_peak_mib"]
            for mode in ("cached", "cached-boundary")}
    print(f"2 ranks, global batch {small}, rank 0 process peak RSS: coalesce {peak['cached']:.0f} MiB, "
          f"boundary {peak['cached-boundary']:.0f} MiB")
    model_mib = results[large, "cached"]["params"] * 4 / 2**20
    print(f"model: {results[large, 'cached']['params'] / 1e6:.1f} M parameters = {model_mib:.0f} MiB of fp32 gradients")
    # Time: plain and cached steps alternating in one process, with freed memory kept as the trainer keeps it
    # (the memory runs above fault every tensor in afresh, which taxes the step with more allocations).
    # The ratio is the median over rounds of cached / plain within a round: the two steps of a round run back to
    # back, so a load change on the machine between rounds cancels, and one slow step does not set the result.
    overhead, per_pass, call_ms = {}, {}, []
    for n in args.time_sizes:
        t = _child(n, ["plain", "cached", "cached-per-pass"], args.chunk, args.threads, args.time_reps, timing=True)
        rounds = [c / p for c, p in zip(t["cached"]["times_s"], t["plain"]["times_s"])]
        slow = [c / p for c, p in zip(t["cached-per-pass"]["times_s"], t["plain"]["times_s"])]
        overhead[n], per_pass[n] = statistics.median(rounds), statistics.median(slow)
        call_ms.append(t["call_overhead_ms"])
        print(f"time at global batch {n}: plain {t['plain']['time_s']:.2f} s, cached {t['cached']['time_s']:.2f} s "
              f"(best of {args.time_reps}); cached / plain by round {' '.join(f'{r:.3f}' for r in rounds)}, "
              f"median {overhead[n]:.3f}; gathering per pass instead {' '.join(f'{r:.3f}' for r in slow)}, median "
              f"{per_pass[n]:.3f}; ZeRO-3's fixed cost per no-grad forward call {call_ms[-1]:.1f} ms", flush=True)
    mem = {key: r["mem_mib"] for key, r in results.items()}
    print(json.dumps({
        "bench": "gradcache",
        f"mem_{large}_vs_{small}_cached": round(mem[large, "cached"] / mem[small, "cached"], 3),
        f"mem_{large}_vs_{small}_plain": round(mem[large, "plain"] / mem[small, "plain"], 3),
        # the worst of the timed batches (all ≥ 1,024 by default); each one under its own key too
        "time_overhead_cached": round(max(overhead.values()), 3) if overhead else None,
        **{f"time_overhead_cached_{n}": round(v, 3) for n, v in overhead.items()},
        **{f"time_overhead_cached_per_pass_{n}": round(v, 3) for n, v in per_pass.items()},
        f"mem_{large}_cached_mib": round(mem[large, "cached"], 1),
        f"mem_{large}_plain_mib": round(mem[large, "plain"], 1),
        "coalesce_extra_mib": round(peak["cached"] - peak["cached-boundary"], 1),
        "model_grad_mib": round(model_mib, 1),
        # the engine's fixed cost of one no-grad forward call (2 samples, engine − bare module), median of the runs
        "call_overhead_ms": round(statistics.median(call_ms), 2) if call_ms else None,
        "chunk": args.chunk,
    }))


if __name__ == "__main__":
    main()
