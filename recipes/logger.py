"""Run logging on rank 0: a JSONL file always, wandb (offline unless an API key is set), TensorBoard when asked
for and importable, and a progress bar with ETA (tqdm's, from the steps left and the recent step rate)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("hiclip")
BAR_KEYS = ("loss", "samples_per_s", "mfu")


class RunLogger:
    def __init__(self, log_dir: str, *, enabled: bool, total_steps: int, start_step: int, use_wandb: bool,
                 wandb_project: str, config: dict, progress: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")
        if use_wandb and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            # Offline by default so runs never block on the network; a configured API key opts into online.
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_project, dir=log_dir, config=config, resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("logging.tensorboard is on but tensorboard is not installed: JSONL and wandb only")
            else:
                self.tensorboard = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None and any(k in record for k in BAR_KEYS):
            self.bar.set_postfix({k: f"{record[k]:.4g}" for k in BAR_KEYS if k in record})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    return value.item() if hasattr(value, "item") else value
