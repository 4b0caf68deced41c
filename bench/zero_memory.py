"""Claim: ZeRO-3 divides every rank's model-state memory by the world size, up to a small unsharded remainder.

    python bench/zero_memory.py [--worlds 1 2 4] [--stages 2 3]

For ZeRO-2 and ZeRO-3 (ds_configs/zero2.json, zero3.json as shipped) at 1, 2 and 4 gloo ranks on CPU
(torchrun, OMP_NUM_THREADS=1), the engine is built exactly as the trainer builds it (recipes/engine.py), takes
one optimizer step (so Adam's moments exist), then runs a second forward + backward and, with every gradient
still live and before that step, each rank MEASURES the bytes it holds:
    params     the module's parameter storage: `p.data` (full under ZeRO-2; ZeRO-3 keeps only the persistent
               small parameters whole) and ZeRO-3's partitioned `p.ds_tensor`s (their flat group buffer)
    grads      gradient partitions: ZeRO-2 `averaged_gradients` / `grads_in_partition` (after a backward, views
               into its reduction bucket), ZeRO-3 `grad_partitions_flat_buffer`, any `.grad` of an fp32 partition
    master     the optimizer's fp32 partitions (ZeRO-2 `single_partition_of_fp32_groups`, ZeRO-3
               `fp32_partitioned_groups_flat`)
    optimizer  the inner optimizer's state of those partitions (AdamW exp_avg, exp_avg_sq)
    buffers    the gradient reduction buckets (`ipg_buckets`, both stages, and any parameter `.grad` still
               attached, a view into one), sized by `reduce_bucket_size`, not by the model: reported, but not
               model state
Each storage is counted once, for the first category in the order above that reaches it, which is charged
the bytes its tensors cover; the rest of that storage is `buffers` (under ZeRO-2 a rank's gradient partition
lives inside the reduction bucket). "model states" = params + grads + master + optimizer.

Under ZeRO-3 it also counts the engine's parameter all-gathers (calls, bytes) in step 2's forward and backward,
and, on a fresh engine trained with the gradient cache from its first step (recipes/grad_cache.py, 2 chunks,
`grad_cache.gather: auto`, which gathers the model once for the step's passes), in its third step:
docs/scaling.md uses both patterns.

Against: DeepSpeed's estimator (`estimate_zero{2,3}_model_states_mem_needs`, the numbers its `_all_live` /
`_all_cold` printers show, via recipes/dry_run.py; no offload, its per-GPU column) and the ideal: the
measured 1-rank bytes split into what ZeRO shards (÷N) and what it keeps whole on every rank, the latter
predicted from the model, not measured:
    ZeRO-2 keeps the bf16 parameters whole:                       2 B × all parameters;
    ZeRO-3 keeps parameters ≤ stage3_param_persistence_threshold  2 B × their elements
      whole (biases, LayerNorms, the logit scale; never re-gathered).
    ideal(N) = (M₁ − R) / N + R,  ratio = ideal(N) / M₁.

Model: the vit_b32 preset cut to 4 vision and 4 text blocks (69.4 M parameters, 36% of them the token
embedding), bf16 with fp32 master weights, the trainer's AdamW; 2 samples per rank (activations don't count).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

MODEL = ["model.preset=vit_b32", "model.vision.layers=4", "model.text.layers=4"]
TRAIN = ["train.batch_size=2", "train.precision=bf16", "train.warmup_steps=1", "loss.kind=clip",
         "grad_cache.chunk_size=0"]
CATEGORIES = ("params", "grads", "master", "optimizer", "buffers")
MODEL_STATES = ("params", "grads", "master", "optimizer")


def _config(stage: int):
    from recipes.config import load_config

    return load_config(None, MODEL + TRAIN + [f"train.ds_config=ds_configs/zero{stage}.json"])


def _batch(cfg, n: int, generator):
    import torch

    c, s = cfg.model.text.context_length, cfg.model.vision.image_size
    text = torch.zeros(n, c, dtype=torch.long)
    text[:, 0], text[:, 1:9], text[:, 9] = 49406, torch.randint(1, 49000, (n, 8), generator=generator), 49407
    # The engine casts the module to bf16 but not its inputs: the images must arrive in bf16.
    return {"image": torch.randn(n, 3, s, s, generator=generator).bfloat16(), "text": text}


# --------------------------------------------------------------------------- the walk over the engine's tensors
def _tensors_by_category(engine) -> dict[str, list]:
    """Every tensor holding model state on this rank, by category (may repeat storages; counted once later)."""
    opt = engine.optimizer  # DeepSpeedZeroOptimizer (ZeRO-2) or DeepSpeedZeroOptimizer_Stage3
    params = list(engine.module.parameters())
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    found: dict[str, list] = {c: [] for c in CATEGORIES}

    found["params"] += [p.data for p in params]
    found["params"] += [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]

    if stage3:
        found["grads"].append(opt.grad_partitions_flat_buffer)
        masters = list(opt.fp32_partitioned_groups_flat)
    else:
        found["grads"] += _tensors_in(opt.averaged_gradients) + _tensors_in(opt.grads_in_partition)
        masters = list(opt.single_partition_of_fp32_groups)
    found["grads"] += [m.grad for m in masters if m.grad is not None]
    # A parameter's own `.grad` is a view into the reduction bucket (contiguous_gradients) waiting to be reduced
    # into its partition: the bucket's memory, not a gradient partition.
    found["buffers"] = _tensors_in([bucket.buffer for bucket in opt.ipg_buckets.values()])  # one list or tensor each
    found["buffers"] += [p.grad for p in params if p.grad is not None]
    found["master"] = masters
    found["optimizer"] = [t for m in masters for t in _tensors_in(opt.optimizer.state.get(m, {}))]
    return found


def _tensors_in(obj) -> list:
    """The tensors inside a tensor, list, tuple or dict (nested); nothing for None."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors_in(x)]
    return []


def measure_bytes(engine) -> dict[str, int]:
    """Bytes per category. Each storage belongs to the first category that reaches it, which is charged the
    bytes its tensors cover (a union: views of one flat buffer count once); what they leave uncovered is
    `buffers` (ZeRO-2 keeps a rank's gradient partition inside its reduction bucket)."""
    covered: dict[int, tuple[str, int, list[tuple[int, int]]]] = {}  # storage → (category, size, byte ranges)
    for category, tensors in _tensors_by_category(engine).items():
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            owner, size, ranges = covered.setdefault(storage.data_ptr(), (category, storage.nbytes(), []))
            if owner == category:
                start = t.storage_offset() * t.element_size()
                ranges.append((start, start + t.numel() * t.element_size()))
    out = dict.fromkeys(CATEGORIES, 0)
    for category, size, ranges in covered.values():
        used = _union_length(ranges)
        out[category] += used
        out["buffers"] += size - used
    return out


def _union_length(ranges: list[tuple[int, int]]) -> int:
    total, reach = 0, 0
    for start, end in sorted(ranges):
        total += max(0, end - max(start, reach))
        reach = max(reach, end)
    return total


def unsharded_bytes(model, stage: int, ds: dict) -> int:
    """What the ZeRO stage keeps whole on every rank, from the model alone: bf16 parameters (all, or the small ones)."""
    numels = [getattr(p, "ds_numel", p.numel()) for p in model.parameters()]
    if stage == 2:
        return 2 * sum(numels)
    threshold = ds["zero_optimization"]["stage3_param_persistence_threshold"]
    return 2 * sum(n for n in numels if n <= threshold)


def worker(stage: int) -> None:
    """Runs on every torchrun rank; rank 0 prints one JSON line with all ranks' measurements."""
    import torch
    import torch.distributed as dist

    from model.clip import CLIP
    from model.losses import compute_loss
    from recipes.dry_run import GIB, count_params, model_state_gib
    from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
    from recipes.step import split_levels, train_step

    torch.set_num_threads(1)
    cfg = _config(stage)
    info = init_distributed()
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    gen = torch.Generator().manual_seed(info.rank)
    train_step(engine, _batch(cfg, cfg.train.batch_size, gen), cfg.loss)  # step 1 creates Adam's moments

    # Step 2 up to its backward: parameters, gradients, master weights and moments are all live now.
    with counting_gathers() as forward_gathers:
        out = engine(_batch(cfg, cfg.train.batch_size, gen))
    image, text, masks = split_levels(out)
    loss, _ = compute_loss(cfg.loss, image, text, masks, out["logit_scale"], gather=True)
    with counting_gathers() as backward_gathers:
        engine.backward(loss * info.world_size)
    mine = measure_bytes(engine)
    engine.step()

    ranks: list[dict] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(ranks, mine)
    if info.is_main:
        with torch.device("meta"):
            params, _, _, _, largest = count_params(CLIP(cfg.model))
        estimate = model_state_gib(params, largest, info.world_size, info.world_size)[f"zero{stage}_gb"] * GIB
        print(json.dumps({"stage": stage, "world": info.world_size, "ranks": ranks, "params": params,
                          "largest_layer": largest, "estimate": int(estimate),
                          "unsharded": unsharded_bytes(engine.module, stage, ds),
                          "gathered_forward": forward_gathers, "gathered_backward": backward_gathers}))
    leave_distributed()


def cached_gathers_worker(steps: int = 3) -> None:
    """ZeRO-3 with the gradient cache on from the first step, as a run with `grad_cache.chunk_size` > 0 trains:
    rank 0 prints the parameter all-gathers of the last of `steps` cached steps (2 chunks of 1 sample each).
    Later steps repeat one pattern (with `grad_cache.gather: pass`, the first one also records DeepSpeed's trace)."""
    import torch

    from model.losses import compute_loss
    from recipes.engine import build_engine, deepspeed_config, init_distributed, leave_distributed
    from recipes.grad_cache import GradCacheConfig, cached_backward
    from recipes.step import split_levels

    torch.set_num_threads(1)
    cfg = _config(3)
    info = init_distributed()
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    gen = torch.Generator().manual_seed(info.rank)

    def loss_fn(out):
        return compute_loss(cfg.loss, *split_levels(out), out["logit_scale"], gather=True)

    for _ in range(steps):
        with counting_gathers() as counted:
            cached_backward(engine, _batch(cfg, cfg.train.batch_size, gen), loss_fn, GradCacheConfig(chunk_size=1))
        engine.step()
    if info.is_main:
        print(json.dumps({"world": info.world_size, "params": sum(p.ds_numel for p in engine.module.parameters()),
                          "gathered_cached_step": counted}))
    leave_distributed()


@contextmanager
def counting_gathers():
    """Count the engine's parameter all-gathers (DeepSpeed's comm layer; the loss's torch.distributed gather is
    not seen): calls and bytes of the gathered output, on this rank."""
    import deepspeed.comm
    import deepspeed.comm.comm

    counted = {"calls": 0, "bytes": 0}
    original = deepspeed.comm.comm.all_gather_into_tensor

    def counting(output_tensor, input_tensor, *args, **kwargs):
        counted["calls"] += 1
        counted["bytes"] += output_tensor.numel() * output_tensor.element_size()
        return original(output_tensor, input_tensor, *args, **kwargs)

    # ZeRO-3 reaches it two ways: `allgather_fn` (looks the name up in deepspeed.comm.comm) and the package's
    # re-export; each wrapper calls the original, so no call is counted twice.
    modules = (deepspeed.comm.comm, deepspeed.comm)
    for module in modules:
        module.all_gather_into_tensor = counting
    try:
        yield counted
    finally:
        for module in modules:
            module.all_gather_into_tensor = original


# --------------------------------------------------------------------------- the driver
def run_case(world: int, worker_args: list[str]) -> dict:
    """torchrun this file on `world` ranks with `worker_args`; rank 0's JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", _free_port(), __file__, *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(worker_args)} on {world} rank(s) failed:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _free_port() -> str:
    from recipes.engine import _free_port as free_port

    return free_port()


def model_states(rank: dict) -> int:
    return sum(rank[c] for c in MODEL_STATES)


def gather_report(r: dict, summary: dict) -> str:
    """ZeRO-3's parameter all-gathers in multiples of the bf16 model: one line, and their keys in `summary`."""
    model_bytes = 2 * r["params"]
    parts = []
    for name, label in (("forward", "the forward"), ("backward", "the backward"),
                        ("cached_step", "a step with the gradient cache on (2 chunks)")):
        counted = r[f"gathered_{name}"]
        summary[f"zero3_{r['world']}_{name}_gathered_x_model"] = round(counted["bytes"] / model_bytes, 3)
        summary[f"zero3_{r['world']}_{name}_gather_calls"] = counted["calls"]
        parts.append(f"{label} {counted['bytes'] / model_bytes:.2f}× in {counted['calls']} calls")
    return f"ZeRO-3, {r['world']} ranks, parameters gathered (× the bf16 model): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cached-gathers-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    if args.cached_gathers_worker:
        cached_gathers_worker()
        return
    if 1 not in args.worlds:
        parser.error("--worlds must include 1: every ratio is against one rank")

    mib = 2**20
    print("| ZeRO | ranks | params | grads | master fp32 | Adam moments | model states | vs 1 rank | ideal | "
          "DeepSpeed estimate | buffers |  (MiB per rank, max over ranks)")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict = {"bench": "zero_memory"}
    gathers: list[str] = []
    for stage in args.stages:
        base = None
        for world in sorted(args.worlds):
            r = run_case(world, ["--worker", str(stage)])
            worst = max(r["ranks"], key=model_states)
            measured = model_states(worst)
            base = base if base is not None else (measured, r["unsharded"])
            m1, remainder = base
            ideal = ((m1 - remainder) / world + remainder) / m1
            ratio = measured / m1
            print(f"| {stage} | {world} | " + " | ".join(f"{worst[c] / mib:.1f}" for c in MODEL_STATES)
                  + f" | {measured / mib:.1f} | {ratio:.3f} | {ideal:.3f} | {r['estimate'] / mib:.1f} | "
                  f"{worst['buffers'] / mib:.1f} |", flush=True)
            if stage == 3 and world > 1:
                r.update(run_case(world, ["--cached-gathers-worker"]))
                gathers.append(gather_report(r, summary))
            if world > 1:
                summary[f"zero{stage}_{world}_vs_1"] = round(ratio, 4)
                summary[f"zero{stage}_ideal_{world}"] = round(ideal, 4)
                summary[f"zero{stage}_estimate_{world}_vs_measured"] = round(r["estimate"] / measured, 3)
            summary[f"zero{stage}_unsharded_mib"] = round(remainder / mib, 2)
        summary["params"] = r["params"]
    print("\n".join(gathers))
    sharded = [w for w in args.worlds if w > 1] if 3 in args.stages else []
    summary["zero3_within_10pct_of_ideal"] = all(
        abs(summary[f"zero3_{w}_vs_1"] / summary[f"zero3_ideal_{w}"] - 1) <= 0.10 for w in sharded)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
