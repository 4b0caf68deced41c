"""Throughput, MFU, memory and data-health numbers for the log steps, kept out of the training loop.

MFU = achieved model FLOP/s per device / the device's peak. Model FLOPs come from the analytic count of the
configured model (model/flops.py: matmuls only, 3× forward for a training step); as MFU is defined, work that
is recomputed (gradient caching replays the towers' forward) is not credited. Peaks are dense bf16 tensor-core
numbers from the vendors' datasheets; `logging.peak_tflops` overrides them. On CPU the peak is a nominal 0.1 TFLOP/s per rank
(about two AVX2 cores in fp32): CPU MFU only compares runs on the same machine, it is not a utilisation.
"""
from __future__ import annotations

import resource
import time

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
CPU_NOMINAL_TFLOPS = 0.1


def peak_tflops(device: torch.device, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number came from)."""
    if override > 0:
        return override, "logging.peak_tflops"
    if device.type != "cuda":
        return CPU_NOMINAL_TFLOPS, "nominal CPU figure (not a utilisation)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name} dense bf16 datasheet"
    return 0.0, f"unknown device {name!r}: set logging.peak_tflops for MFU"


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
