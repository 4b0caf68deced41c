"""Helpers for tests that start real multi-process runs (torchrun, gloo on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, free_port


def base_env() -> dict:
    """The environment of a test run: pinned threads, no wandb, DeepSpeed on CPU, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(ROOT)}


def torchrun(nproc: int, module_args: list[str], timeout: int = 300, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *module_args]
    full_env = {**base_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pretrain(nproc: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return torchrun(nproc, ["-m", "recipes.pretrain", "--config", "recipes/configs/demo.yaml", *overrides], **kw)


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def tiny_run(spec: str, run_dir: Path, *, steps: int, layers: int = 1, workers: int = 1) -> list[str]:
    """Overrides of the demo recipe for a seconds-long run on procedural shards: 32 px images, `layers` blocks per
    tower, batch 4 per rank, checkpoints in run_dir/ckpt and a metrics line every step in run_dir."""
    return [f"data.train_shards={spec}", f"data.workers={workers}", "data.shuffle_buffer=8", "train.batch_size=4",
            f"train.steps={steps}", "train.warmup_steps=2", "model.vision.image_size=32", "model.vision.patch_size=8",
            f"model.text.layers={layers}", f"model.vision.layers={layers}", "model.vision.region_split=-1",
            f"checkpoint.dir={Path(run_dir) / 'ckpt'}", f"logging.dir={run_dir}", "logging.every_steps=1",
            "logging.progress=false"]
