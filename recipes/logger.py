"""Run logging on rank 0: a JSONL file always, wandb (offline unless an API key is set), TensorBoard when asked
for and importable, and a progress bar with ETA (tqdm's, from the steps left and the recent step rate)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("hiclip")
BAR_KEYS = ("loss", "samples_per_s", "mfu", "guard/skipped_steps")


class RunLogger:
    def __init__(self, log_dir: str, *, enabled: bool, total_steps: int, start_step: int, use_wandb: bool,
                 wandb_project: str, config: dict, progress: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        self._postfix: dict[str, str] = {}
        if not enabled:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")
        if use_wandb and os.environ.get("WANDB_MODE") != "disabled":
            import wandb

            # Offline by default so runs never block on the network; a configured API key opts into online.
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_project, dir=log_dir, config=config, resume="allow")
            # Plot against the training step, which goes back after a divergence rollback; wandb's own step
            # must only grow, so it is left to wandb.
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
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
            self.wandb.log(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        self.show(record)

    def show(self, metrics: dict) -> None:
        """Update the progress bar's figures only (e.g. the skip count at a step that is not logged)."""
        if self.bar is not None and any(k in metrics for k in BAR_KEYS):
            self._postfix.update({k.removeprefix("guard/"): f"{metrics[k]:.4g}" for k in BAR_KEYS if k in metrics})
            self.bar.set_postfix(self._postfix)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)  # a crashed run shows as failed, not as running

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def _plain(value):
    return value.item() if hasattr(value, "item") else value
