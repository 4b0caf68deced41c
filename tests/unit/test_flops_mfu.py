"""recipes/metrics.py: window throughput, data wait, TFLOP/s and MFU from the analytic count; peaks; skip sums."""
import json

import pytest
import torch

from recipes import metrics
from recipes.metrics import StepMeter, peak_tflops, skip_metrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_step_meter_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    meter = StepMeter(train_flops_per_sample=1e12, global_batch=64, world_size=4, peak_tflops=100.0,
                      device=torch.device("cpu"))
    for _ in range(4):  # 4 steps of 0.5 s, 0.1 s of it waiting for data
        meter.step(data_seconds=0.1)
        clock.now += 0.5
    out = meter.read()
    assert out["samples_per_s"] == pytest.approx(4 * 64 / 2.0)  # 128 samples/s
    assert out["samples_per_s_per_device"] == pytest.approx(32.0)
    assert out["step_time_s"] == pytest.approx(0.5)
    assert out["data_wait"] == pytest.approx(0.2)
    assert out["tflops_per_device"] == pytest.approx(32.0)  # 32 samples/s x 1 TFLOP each
    assert out["mfu"] == pytest.approx(0.32)
    assert out["mem_peak_rss_gb"] > 0
    # read() opened a new window; restart() drops one (eval time is not throughput)
    meter.step(data_seconds=0.0)
    clock.now += 10.0
    meter.restart()
    meter.step(data_seconds=0.0)
    clock.now += 1.0
    assert meter.read()["samples_per_s"] == pytest.approx(64.0)


def test_unknown_peak_gives_no_mfu(monkeypatch):
    monkeypatch.setattr(metrics.time, "perf_counter", Clock())
    meter = StepMeter(train_flops_per_sample=1.0, global_batch=1, world_size=1, peak_tflops=0.0,
                      device=torch.device("cpu"))
    meter.step(0.0)
    assert "mfu" not in meter.read()


def test_cpu_peak_keeps_the_best_calibration(monkeypatch, tmp_path):
    """Measured at every start; a low measurement (a loaded machine) never lowers the cached peak."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rates = iter([2.0, 0.5, 3.0, 1.0])  # TFLOP/s the "machine" measures, one per call
    measured = []
    monkeypatch.setattr(metrics, "measure_gemm_tflops", lambda dtype, seconds: measured.append(dtype) or next(rates))
    cpu = torch.device("cpu")
    tflops, source = peak_tflops(cpu, dtype=torch.float32)
    assert tflops == 2.0 and source.startswith("measured float32 GEMM peak of this CPU on")
    tflops, source = peak_tflops(cpu, dtype=torch.float32)  # a busy start measures 0.5: the best stays
    assert tflops == 2.0 and source.startswith("best measured") and "0.5 now, 2 before" in source
    assert peak_tflops(cpu, dtype=torch.float32)[0] == 3.0  # a better one replaces it
    assert peak_tflops(cpu, dtype=torch.bfloat16)[0] == 1.0  # another dtype is another entry
    assert measured == [torch.float32] * 3 + [torch.bfloat16]
    cache = tmp_path / "hiclip" / "cpu_gemm_peak.json"
    assert sorted(json.loads(cache.read_text()).values()) == [1.0, 3.0]
    cache.write_text("{not json")  # a broken cache: this measurement alone, and a fresh file
    monkeypatch.setattr(metrics, "measure_gemm_tflops", lambda dtype, seconds: 0.25)
    assert peak_tflops(cpu, dtype=torch.float32)[0] == 0.25
    assert list(json.loads(cache.read_text()).values()) == [0.25]


def test_real_gemm_calibration_is_positive(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real = metrics.measure_gemm_tflops
    monkeypatch.setattr(metrics, "measure_gemm_tflops", lambda dtype, seconds: real(dtype, seconds=0.05, n=256))
    assert peak_tflops(torch.device("cpu"), dtype=torch.float32)[0] > 0


def test_gemm_measurement_counts_flops(monkeypatch):
    """2·n³ FLOPs over the best single matmul time."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: float(next(ticks)))  # each matmul takes 1 "second"
    assert metrics.measure_gemm_tflops(torch.float32, seconds=2.0, n=64) == pytest.approx(2 * 64**3 / 1e12)


def test_peak_lookup(monkeypatch):
    assert peak_tflops(torch.device("cpu"), override=400.0)[0] == 400.0
    for name, expected in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                           ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H200", 989.0), ("Some New GPU", 0.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert peak_tflops(torch.device("cuda", 0))[0] == expected, name


def test_skip_metrics_single_process():
    assert skip_metrics({"corrupt_image": 2, "missing_caption": 1}) == {"skipped/corrupt_image": 2,
                                                                         "skipped/missing_caption": 1}
    assert skip_metrics({}) == {}
