"""Never lose a run to a divergence: skip non-finite steps, count spikes, roll back, give up cleanly.

Per step (the loop calls `begin`, the step calls `fault` and `admit`, the loop calls `end`):
- `admit`, after the forward and loss, before any backward: ONE all-reduce of the per-rank loss shares gives
  every rank the same global loss. Non-finite -> the step is skipped on every rank: no backward, no optimizer
  step, so parameters, optimizer state and the LR schedule are untouched by construction. A finite loss above
  `spike_factor` x the median of the last `median_window` admitted losses is a spike: counted, and applied.
- The gradient half of the decision is DeepSpeed's: its ZeRO-1/2/3 optimizers (0.19.8) all-reduce the global
  gradient norm before updating anything and, when it is non-finite, clear the gradients and return without
  touching weights, Adam moments or the schedule (bf16 needs `bf16.check_grad_overflow`, which
  recipes/engine.py sets). `end` reads `engine.was_step_applied()`; tests/integration/guard_skip_worker.py
  shows the skip leaves every state tensor bit-identical. So a step costs one extra collective of one float.
- `end`: after `max_skips` skipped steps in a row, or `max_spikes` spikes within `spike_span` steps, roll back:
  reload `latest` (finite by recipes/finite.py), keep the live data stream where it is (so the window since
  that checkpoint is never seen again and nothing is seen twice), scale the LR by `rollback_lr_scale`, and go
  on. After `max_rollbacks` rollbacks raise `finite.Diverged` (exit code 3, not requeued).

Step convention: `step` counts applied updates. A skipped step consumes its batch (and its share of the RNG
streams) but advances neither the step counter nor the LR schedule, so `train.steps` updates are always made
on the schedule as written. `iteration` counts batches drawn, skipped and rolled-back ones included.

Test-only fault hook, environment variable HICLIP_TEST_FAULT: `;`-separated `KIND@ITERATIONS[@RANK]`, KIND one
of `nan_loss` (the loss becomes NaN), `nan_grad` (the gradient flowing into the global image embeddings becomes NaN:
the loss stays finite), `spike` (the loss x 100); ITERATIONS `5`, `5-7` or `5-` (5 onwards), counted as
`iteration`; RANK limits it to one rank. HICLIP_TEST_SAMPLE_LOG=DIR makes each rank append one JSON line per
iteration (keys, applied) and per rollback to DIR/samples_rank{r}.jsonl.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from recipes import checkpointing
from recipes.finite import Diverged

log = logging.getLogger("hiclip")

FAULT_ENV = "HICLIP_TEST_FAULT"
SAMPLE_LOG_ENV = "HICLIP_TEST_SAMPLE_LOG"
FAULT_KINDS = ("nan_loss", "nan_grad", "spike")
SPIKE_FAULT_FACTOR = 100.0


@dataclass
class GuardConfig:
    enabled: bool = True  # off: no loss collective, spikes or rollbacks; steps DeepSpeed skips are still counted
    spike_factor: float = 2.0  # a loss above this x the running median is a spike
    median_window: int = 100  # admitted steps in the running median (spikes are detected once it is full)
    max_spikes: int = 3  # roll back after this many spikes within `spike_span` steps; 0: never for spikes
    spike_span: int = 100
    max_skips: int = 5  # roll back after this many skipped (non-finite) steps in a row
    max_rollbacks: int = 3  # give up (exit code 3) when one more rollback would be needed
    rollback_lr_scale: float = 1.0  # multiply the LR by this at every rollback
    skip_batches: int = 0  # on resume, discard this many batches on every rank first: a rollback by hand

    def __post_init__(self) -> None:
        for key in ("median_window", "spike_span", "max_skips"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.guard.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_spikes", "max_rollbacks", "skip_batches"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.guard.{key} must be >= 0, got {getattr(self, key)}")
        if not self.spike_factor > 1.0:
            raise ValueError(f"train.guard.spike_factor must be > 1, got {self.spike_factor}")
        if not 0.0 < self.rollback_lr_scale <= 1.0:
            raise ValueError(f"train.guard.rollback_lr_scale must be in (0, 1], got {self.rollback_lr_scale}")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int | None  # None: every iteration from `first` on
    rank: int | None

    def hits(self, iteration: int, rank: int) -> bool:
        return (self.first <= iteration and (self.last is None or iteration <= self.last)
                and self.rank in (None, rank))


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, rest = item.partition("@")
        span, _, rank = rest.partition("@")
        first, dash, last = span.partition("-")
        if kind not in FAULT_KINDS or not first.isdigit() or not (last.isdigit() or last == "") \
                or not (rank.isdigit() or rank == ""):
            raise ValueError(f"{FAULT_ENV}: {item!r} is not KIND@ITERATIONS[@RANK] with KIND in {FAULT_KINDS}")
        faults.append(Fault(kind, int(first), (int(last) if last else None) if dash else int(first),
                            int(rank) if rank else None))
    return faults


class Guard:
    def __init__(self, cfg: GuardConfig, *, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.iteration = 0  # batches drawn
        self.skipped = self.spikes = self.rollbacks = 0  # whole-run counters
        self.discarded = 0  # batches whose updates a rollback threw away
        self.lr_scale = 1.0
        self.consecutive_skips = 0
        self.recent_spikes: deque[int] = deque()  # iterations of the spikes within the span
        self.losses: deque[float] = deque(maxlen=cfg.median_window)
        self.faults = parse_faults(os.environ.get(FAULT_ENV, ""))
        sample_log = os.environ.get(SAMPLE_LOG_ENV)
        self.sample_log = Path(sample_log) / f"samples_rank{rank}.jsonl" if sample_log else None
        self._admitted = True
        self._keys: list[str] = []

    # ------------------------------------------------------------------ one step
    def begin(self, batch: dict) -> None:
        self.iteration += 1
        self._admitted = True
        if self.sample_log is not None:
            self._keys = list(batch.get("key", []))

    def fault(self, loss: Tensor, out: dict[str, Tensor]) -> Tensor:
        """Test-only: poison this iteration's loss or gradient as HICLIP_TEST_FAULT asks; identity otherwise."""
        for f in self.faults:
            if not f.hits(self.iteration, self.rank):
                continue
            if f.kind == "nan_loss":
                loss = loss * float("nan")
            elif f.kind == "spike":
                loss = loss * SPIKE_FAULT_FACTOR
            elif out["global"].requires_grad:  # nan_grad; the gradient cache's leaves require grad too
                out["global"].register_hook(lambda g: g * float("nan"))
        return loss

    def admit(self, loss: Tensor) -> bool:
        """Collective (when enabled): False on every rank when the global loss is non-finite."""
        if not self.cfg.enabled:
            return True
        total = loss.detach().float().reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        value = total.item()  # the one host sync the guard adds
        if not math.isfinite(value):
            self._admitted = False
            return False
        full = len(self.losses) == self.losses.maxlen
        if full and value > self.cfg.spike_factor * statistics.median(self.losses):
            self.spikes += 1
            self.recent_spikes.append(self.iteration)
            if self.rank == 0:
                log.warning("loss spike at iteration %d: %.4g > %g x the median %.4g", self.iteration, value,
                            self.cfg.spike_factor, statistics.median(self.losses))
        else:
            self.losses.append(value)
        return True

    @property
    def admitted(self) -> bool:
        """False once `admit` refused this iteration's loss."""
        return self._admitted

    def end(self, engine) -> tuple[bool, bool]:
        """(applied, roll back now). Every rank gets the same answer: both inputs were all-reduced."""
        applied = self._admitted and engine.was_step_applied()
        if applied:
            self.consecutive_skips = 0
        else:
            self.skipped += 1
            self.consecutive_skips += 1
            if self.rank == 0:
                log.warning("iteration %d: non-finite %s, update skipped (%d in a row)", self.iteration,
                            "loss" if not self._admitted else "gradient norm", self.consecutive_skips)
        while self.recent_spikes and self.recent_spikes[0] <= self.iteration - self.cfg.spike_span:
            self.recent_spikes.popleft()
        self._record({"iteration": self.iteration, "keys": self._keys, "applied": applied})
        if not self.cfg.enabled:
            return applied, False
        too_many_spikes = self.cfg.max_spikes and len(self.recent_spikes) >= self.cfg.max_spikes
        return applied, bool(self.consecutive_skips >= self.cfg.max_skips or too_many_spikes)

    def skip_on_resume(self, batches) -> None:
        """`skip_batches` by hand: draw and drop that many batches (no update, no schedule step)."""
        for _ in range(self.cfg.skip_batches):
            next(batches)
        self.iteration += self.cfg.skip_batches
        self.discarded += self.cfg.skip_batches

    # ------------------------------------------------------------------ rollback
    def roll_back(self, engine, ckpt_dir: str, run_config: dict, world_size: int) -> int:
        """Collective: reload `latest`, leave the data stream where it is; returns the step to continue from."""
        why = (f"{self.consecutive_skips} non-finite steps in a row" if self.consecutive_skips >= self.cfg.max_skips
               else f"{len(self.recent_spikes)} loss spikes within {self.cfg.spike_span} steps")
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise Diverged(f"train.guard gave up at iteration {self.iteration} after {self.rollbacks} rollbacks "
                           f"(train.guard.max_rollbacks={self.cfg.max_rollbacks}): {why}")
        try:
            plan = checkpointing.plan_resume(ckpt_dir, "latest", run_config, world_size)
        except checkpointing.CheckpointError:
            plan = None
        if plan is None:
            raise Diverged(f"train.guard: {why} at iteration {self.iteration} and no checkpoint in {ckpt_dir} "
                           f"to roll back to")
        state = checkpointing.load(engine, plan)  # weights, optimizer, schedule, RNG; NOT the data position
        saved = state.get("guard") or {}
        self.rollbacks += 1
        window = self.iteration - saved.get("iteration", 0)
        self.discarded += window
        # The schedule came back as saved, with that checkpoint's scale in it: move it to this run's new scale.
        self.lr_scale *= self.cfg.rollback_lr_scale
        _scale_lr(engine, self.lr_scale / saved.get("lr_scale", 1.0))
        self.consecutive_skips = 0
        self.recent_spikes.clear()
        self._record({"rollback_to_step": state["step"], "discarded_iterations": [self.iteration - window + 1,
                                                                                   self.iteration]})
        if self.rank == 0:
            log.warning("train.guard: %s: rolled back to %s (step %d), the %d batches since stay unseen; "
                        "rollback %d of %d, LR x %g", why, plan.tag, state["step"], window, self.rollbacks,
                        self.cfg.max_rollbacks, self.lr_scale)
        return state["step"]

    # ------------------------------------------------------------------ state
    def metrics(self) -> dict[str, float]:
        return {"guard/skipped_steps": self.skipped, "guard/spikes": self.spikes, "guard/rollbacks": self.rollbacks,
                "guard/discarded_batches": self.discarded, "iteration": self.iteration}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped": self.skipped, "spikes": self.spikes,
                "rollbacks": self.rollbacks, "discarded": self.discarded, "lr_scale": self.lr_scale,
                "losses": list(self.losses)}

    def load_state_dict(self, state: dict | None) -> None:
        """After a resume (not a rollback: its counters must survive the reload)."""
        if not state:
            return
        self.iteration, self.skipped, self.spikes = state["iteration"], state["skipped"], state["spikes"]
        self.rollbacks, self.discarded, self.lr_scale = state["rollbacks"], state["discarded"], state["lr_scale"]
        self.losses.extend(state["losses"])

    def _record(self, event: dict) -> None:
        if self.sample_log is not None:
            with open(self.sample_log, "a") as f:
                f.write(json.dumps(event) + "\n")


def _scale_lr(engine, factor: float) -> None:
    if factor == 1.0:
        return
    schedule = engine.lr_scheduler
    schedule.base_lrs = [lr * factor for lr in schedule.base_lrs]
    for group in schedule.optimizer.param_groups:
        group["lr"] *= factor
