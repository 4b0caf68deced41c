"""Run under torchrun: warm-start engines from a source, check step 0 against it, train with a tower locked.

    torchrun --nproc_per_node 2 tests/integration/warm_start_worker.py OUT_JSON DS_CONFIG SOURCE STEPS [override ...]

Two engines in one process, both warm-started through recipes.engine.build_engine: `free` (nothing locked) and
`locked` (the overrides' train.lock). Rank 0 writes one JSON object: whether every loaded parameter equals the
source exactly at step 0 (the gathered module parameter and the optimizer's fp32 master), the peak private
memory (RssAnon) and resident memory (RssAnon + RssFile) each rank added inside the warm start, the fp32 size of the model and of its largest module,
each rank's optimizer-state bytes for both engines after STEPS steps, the locked share, and whether after STEPS steps the locked
parameters are bit-identical to step 0 while the others moved. Also used by bench/warm_start.py at larger sizes.
"""
import json
import math
import sys
import threading
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

import recipes.engine as engine_module
from model.interop import Source, plan_warm_start
from recipes.config import load_config
from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed, zero_stage
from recipes.step import train_step

BATCH = 4


def rss_kb() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}


class PeakRss:
    """Peak resident memory above the level at entry, sampled every millisecond: private (anonymous) pages,
    and private + file-backed (memory-mapped source files, which the kernel can drop)."""

    def __enter__(self):
        self.base = rss_kb()
        self.anon = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            now = rss_kb()
            self.anon = max(self.anon, 1024 * (now["RssAnon"] - self.base["RssAnon"]))
            self.total = max(self.total, 1024 * (sum(now.values()) - sum(self.base.values())))
            if self._stop.is_set():
                return
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gathered(engine, keep: bool) -> dict[str, torch.Tensor]:
    """Full parameters; a collective under ZeRO-3 (every rank, one order), kept only where `keep`."""
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if keep:
                out[name] = p.detach().clone()
    return out


def optimizer_state_bytes(engine) -> int:
    """What this rank's ZeRO optimizer holds for training: its fp32 partitions and the Adam moments."""
    inner = engine.optimizer.optimizer  # DeepSpeed's ZeRO wrapper around the client torch AdamW
    tensors = [p for g in inner.param_groups for p in g["params"]]
    tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors)


def batches(cfg, rank: int, steps: int):
    gen = torch.Generator().manual_seed(100 + rank)
    size, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    for _ in range(steps):
        text = torch.randint(1, cfg.model.text.vocab_size - 2, (BATCH, ctx), generator=gen)
        text[:, 0], text[:, 5], text[:, 6:] = cfg.model.text.vocab_size - 2, cfg.model.text.vocab_size - 1, 0
        yield {"image": torch.randn(BATCH, 3, size, size, generator=gen), "text": text}


def main(out_json: str, ds_config: str, source: str, steps: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    base = [f"train.ds_config={ds_config}", f"train.batch_size={BATCH}", "train.precision=fp32",
            f"model.init_from={source}", "train.lr=1.0e-3", "train.warmup_steps=1"]
    lock = [o for o in overrides if o.startswith("train.lock.")]
    model_overrides = [o for o in overrides if not o.startswith("train.lock.")]
    cfg_free = load_config("recipes/configs/demo.yaml", base + model_overrides)
    cfg_locked = load_config("recipes/configs/demo.yaml", base + model_overrides + lock)
    ds = deepspeed_config(cfg_free)
    if zero_stage(ds) == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter

    peaks = {}
    original = engine_module.load_warm_start

    def measured(model, mcfg):
        with PeakRss() as peak:
            plan = original(model, mcfg)
        peaks["anon"], peaks["total"] = peak.anon, peak.total
        return plan

    engine_module.load_warm_start = measured
    torch.manual_seed(0)
    free = build_engine(cfg_free, ds)
    torch.manual_seed(1)
    locked = build_engine(cfg_locked, ds)

    # Step 0 against the source, read independently of the warm start's own reads.
    plan = plan_warm_start({n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in free.module.named_parameters()},
                           Source(source), "random")
    main_rank = info.rank == 0
    start = gathered(locked, main_rank)
    exact_module = all(torch.equal(t.reshape(plan.tensor(n).shape), plan.tensor(n))
                       for n, t in gathered(free, main_rank).items() if n in plan.loaded)
    exact_master = True
    for name, p in free.module.named_parameters():
        master = safe_get_full_fp32_param(p)  # collective under ZeRO-3
        if main_rank and name in plan.loaded:
            exact_master &= torch.equal(master.reshape(plan.tensor(name).shape), plan.tensor(name))
    sizes = {n: math.prod(getattr(p, "ds_shape", p.shape)) for n, p in free.module.named_parameters()}
    module_sizes = {}
    for n, size in sizes.items():
        module_sizes[n.rpartition(".")[0]] = module_sizes.get(n.rpartition(".")[0], 0) + size
    frozen = {n for n, p in locked.module.named_parameters() if not p.requires_grad}

    for batch in batches(cfg_locked, info.rank, steps):  # both: Adam allocates its moments at the first step
        train_step(free, batch, cfg_free.loss)
        train_step(locked, batch, cfg_locked.loss)
    after = gathered(locked, main_rank)
    bytes_per_rank = [None] * info.world_size
    dist.all_gather_object(bytes_per_rank, {"free": optimizer_state_bytes(free), "locked": optimizer_state_bytes(locked),
                                            "warm_start_peak_anon": peaks["anon"],
                                            "warm_start_peak_rss": peaks["total"]})
    if info.rank == 0:
        result = {
            "world_size": info.world_size,
            "loaded": len(plan.loaded), "fresh": len(plan.fresh), "ignored": len(plan.ignored),
            "step0_exact_module": bool(exact_module), "step0_exact_master": bool(exact_master),
            "model_fp32_bytes": 4 * sum(sizes.values()), "largest_module_fp32_bytes": 4 * max(module_sizes.values()),
            "largest_tensor_fp32_bytes": 4 * max(sizes.values()),
            "per_rank": bytes_per_rank,
            "locked_share": sum(sizes[n] for n in frozen) / sum(sizes.values()), "locked_tensors": len(frozen),
            "locked_identical": all(torch.equal(start[n], after[n]) for n in frozen),
            "others_moved": sum(not torch.equal(start[n], after[n]) for n in start if n not in frozen),
            "others": len(start) - len(frozen),
        }
        with open(out_json, "w") as f:
            json.dump(result, f)
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
