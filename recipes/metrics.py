"""Throughput, MFU, memory and data-health numbers for the log steps, kept out of the training loop.

MFU = achieved model FLOP/s per device / the device's peak. Model FLOPs come from the analytic count of the
configured model (model/flops.py: matmuls only, 3× forward for a training step); as MFU is defined, work that
is recomputed (gradient caching replays the towers' forward) is not credited. Peaks are dense bf16 tensor-core
numbers from the vendors' datasheets; `logging.peak_tflops` overrides them. A CPU has no datasheet number that
means anything for torch's GEMMs, so its peak is measured: the best rate of a large square matmul in the run's
precision on the threads this process uses, at every start; the best ever seen per machine, thread count, dtype
and torch version is kept in ~/.cache/hiclip (XDG_CACHE_HOME). CPU MFU is then a real fraction: of what this
machine's GEMM can reach.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense bf16 peak TFLOP/s per device, matched in order against torch.cuda.get_device_name() (first hit wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)
GEMM_SIZE = 2048  # square fp32 / bf16 matmul of the CPU calibration: large enough to run at the BLAS peak


def peak_tflops(device: torch.device, override: float = 0.0, dtype: torch.dtype = torch.bfloat16
                ) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number came from)."""
    if override > 0:
        return override, "logging.peak_tflops"
    if device.type != "cuda":
        return cpu_peak_tflops(dtype)
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name} dense bf16 datasheet"
    return 0.0, f"unknown device {name!r}: set logging.peak_tflops for MFU"


def cpu_peak_tflops(dtype: torch.dtype, seconds: float = 0.5) -> tuple[float, str]:
    """The GEMM peak of this CPU (see the module docstring): measured at every start, and the best ever seen kept.

    A loaded machine can only measure low (other processes, the other ranks calibrating at the same moment), so
    a single measurement cached for good can be far under the peak and MFU then reads above 1: a cache written
    while seven jobs shared two cores here held 0.0105 TFLOP/s, against 0.078 measured on the idle machine.
    The best of all calibrations only moves up, towards the real peak.
    """
    threads = torch.get_num_threads()
    key = f"{_cpu_name()}|threads={threads}|{dtype}|torch={torch.__version__}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "hiclip", "cpu_gemm_peak.json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}  # no cache yet, or an unreadable one
    known = known if isinstance(known, dict) else {}
    cached = known.get(key)
    cached = cached if isinstance(cached, (int, float)) and cached > 0 else 0.0
    measured = measure_gemm_tflops(dtype, seconds)
    tflops = max(measured, cached)
    if tflops > cached:
        try:  # atomic: ranks calibrating at the same time never read half a file
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**known, key: tflops}, indent=1))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: this run's measurement only
    name = str(dtype).removeprefix("torch.")
    origin = "best measured" if cached else "measured"
    return tflops, (f"{origin} {name} GEMM peak of this CPU on {threads} thread(s): {measured:.3g} now, "
                    f"{cached:.3g} before ({cache})")


def measure_gemm_tflops(dtype: torch.dtype, seconds: float = 0.5, n: int = GEMM_SIZE) -> float:
    """Best TFLOP/s of an n×n×n matmul over repeated runs of about `seconds` in all."""
    # A private generator: calibrating at start must not move the training RNG (resume is bit-exact).
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up: BLAS thread pool, packing buffers
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if start > deadline:
            return 2 * n**3 / best / 1e12


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StepMeter:
    """Times the window between log steps: every step reports its data wait, `read()` closes the window.

    Windows rather than single steps: a step's own wall time misses work the GPU still has queued, and the
    metric reduction at a log step synchronises, so window totals are exact.
    """

    def __init__(self, *, train_flops_per_sample: float, global_batch: int, world_size: int, peak_tflops: float,
                 device: torch.device):
        self.flops_per_sample = train_flops_per_sample
        self.global_batch, self.world_size = global_batch, world_size
        self.peak = peak_tflops
        self.device = device
        self._open()

    def _open(self) -> None:
        self.start, self.steps, self.data_seconds = time.perf_counter(), 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self, data_seconds: float) -> None:
        self.steps += 1
        self.data_seconds += data_seconds

    def restart(self) -> None:
        """Drop the current window (after an eval or a checkpoint save, which are not training throughput)."""
        self._open()

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        samples_per_s = self.steps * self.global_batch / elapsed
        tflops = samples_per_s * self.flops_per_sample / self.world_size / 1e12
        out = {
            "samples_per_s": samples_per_s,
            "samples_per_s_per_device": samples_per_s / self.world_size,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait": self.data_seconds / elapsed,
            "tflops_per_device": tflops,
            **memory_stats(self.device),
        }
        if self.peak > 0:
            out["mfu"] = tflops / self.peak
        self._open()
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    """This rank's memory in GiB: peak allocated and reserved in the window on GPU, peak RSS on CPU."""
    gib = 2**30
    if device.type == "cuda":
        return {"mem_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / gib,
                "mem_reserved_gb": torch.cuda.memory_reserved(device) / gib}
    return {"mem_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # Linux: KiB


def skip_metrics(local_counts: dict[str, int]) -> dict[str, int]:
    """Skipped samples per reason summed over ranks, as `skipped/<reason>` (collective: call on every rank)."""
    counts = [local_counts]
    if dist.is_initialized() and dist.get_world_size() > 1:
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, local_counts)
    total: dict[str, int] = {}
    for rank_counts in counts:
        for reason, n in rank_counts.items():
            total[reason] = total.get(reason, 0) + n
    return {f"skipped/{reason}": n for reason, n in sorted(total.items())}
