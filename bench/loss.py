"""Claim: the tiled contrastive loss keeps memory linear in the batch at about the dense loss's speed.

Measures forward + backward of one InfoNCE direction (B = N rows against N columns, d = 512, fp32,
α = 0.2, single process on CPU) for the dense and the tiled PyTorch implementations of model/losses.py.

Method. Each case runs in a fresh Python process. After the inputs exist, it resets the kernel's peak-RSS
mark (`echo 5 > /proc/self/clear_refs`), runs forward + backward once, and reports
    memory = VmHWM (peak resident set) − VmRSS just before the run,
i.e. every byte the loss made resident: saved tensors, temporaries, the input gradients; not the inputs,
not the Python/torch runtime. Time: forward + backward, best of `--reps` runs (one run past 4096), as CPU
time of the process (the ratio in the JSON line) and as wall clock. The machine this was written on is
shared (load averages of 10–15 on 2 cores were seen), where wall clock mostly measures the neighbours;
with one torch thread (the default) CPU time is the work done, and equals wall clock on an idle machine.
Dense cases whose B×N logits cannot fit in half the available memory are not run.

Usage: python bench/loss.py [--sizes 4096 16384 65536] [--threads 1] [--tile 1024]
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
DIM = 512


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _run_case(impl: str, n: int, tile: int, reps: int, threads: int) -> dict:
    """In the child process: one case, memory from the first run, time the best of `reps`."""
    import torch

    from model.losses import info_nce

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, DIM, generator=gen)
    cols = torch.randn(n, DIM, generator=gen)
    rows /= rows.norm(dim=1, keepdim=True)  # in place: no N×d temporary before the baseline
    cols /= cols.norm(dim=1, keepdim=True)
    rows.requires_grad_()
    cols.requires_grad_()
    scale = torch.tensor([1 / 0.07], requires_grad=True)

    cpu_times, wall_times = [], []
    for rep in range(reps):
        rows.grad = cols.grad = scale.grad = None
        if rep == 0:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
            baseline_kib = _proc_status_kib("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        loss = info_nce(rows, cols, scale, alpha=0.2, impl=impl, tile_size=tile)
        loss.backward()
        cpu_times.append(time.process_time() - cpu)
        wall_times.append(time.perf_counter() - wall)
        if rep == 0:
            peak_kib = _proc_status_kib("VmHWM")
    return {"impl": impl, "n": n, "mem_mib": (peak_kib - baseline_kib) / 1024, "cpu_s": min(cpu_times),
            "wall_s": min(wall_times), "loss": loss.item()}


def _available_bytes() -> int:
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024


def _spawn(impl: str, n: int, tile: int, reps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", impl, str(n), "--tile", str(tile), "--reps", str(reps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (the machine is shared)")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3, help="timed runs at N ≤ 4096 (one run above)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_run_case(args.child[0], int(args.child[1]), args.tile, args.reps, args.threads)))
        return

    results: dict[tuple[str, int], dict] = {}
    print(f"d={DIM}, fp32, alpha=0.2, {args.threads} torch thread(s), tile {args.tile}")
    print("| N | impl | peak memory (MiB) | fwd+bwd CPU time (s) | fwd+bwd wall time (s) |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for impl in ("dense", "tiled"):
            dense_bytes = 2 * n * n * 4  # logits plus their softmax gradient, fp32, at the very least
            if impl == "dense" and dense_bytes > _available_bytes() / 2:
                print(f"| {n} | dense | not run: needs > {dense_bytes / 2**30:.0f} GiB | — | — |", flush=True)
                continue
            result = _spawn(impl, n, args.tile, args.reps if n <= 4096 else 1, args.threads)
            results[(impl, n)] = result
            print(f"| {n} | {impl} | {result['mem_mib']:.0f} | {result['cpu_s']:.2f} | {result['wall_s']:.2f} |",
                  flush=True)

    def ratio(a, b, key):
        return round(results[a][key] / results[b][key], 4) if a in results and b in results else None

    print(json.dumps({
        "bench": "loss",
        "mem_16384_tiled_vs_dense": ratio(("tiled", 16384), ("dense", 16384), "mem_mib"),
        "mem_65536_vs_4096_tiled": ratio(("tiled", 65536), ("tiled", 4096), "mem_mib"),
        "time_tiled_vs_dense_4096": ratio(("tiled", 4096), ("dense", 4096), "cpu_s"),
    }))


if __name__ == "__main__":
    main()
