"""One optimizer step of the full training loop, side by side in one process on CPU.

    python bench/step.py [--repeats 5] [--batch 128]

Ours: `recipes.step.train_step` through the DeepSpeed engine (ZeRO-2, world of one, gloo), the same call the
trainer makes. Reference: open_clip's model and ClipLoss with a plain torch AdamW, the standard CLIP step, and
the same with torch's fused AdamW (what our engine uses), so the comparison does not rest on the optimizer.
Same tower sizes, batch and precision (fp32); data are in-memory tensors so the loader is not measured.
Variants are interleaved repeat by repeat and compared by the ratio of medians (`<ratio>`) and by the median
of the per-repeat ratios (`<ratio>_paired`).

`vanilla_clip_guard` is `vanilla_clip` with the divergence guard around the step, as the trainer runs it
(`guard_overhead`: its median step time over the unguarded one's, minus 1). On a world of one the guard's
all-reduce costs nothing; on GPUs its host sync is the part to watch.

`pyramid_time_over_flops` is `pyramid_vs_vanilla` over PyramidCLIP's FLOP ratio (`model/flops.py`, printed as
`pyramid_flop_ratio`): 1.0 when its extra work costs exactly what its extra FLOPs do; `hier_flop_ratio` is the same
count for HiCLIP. `mfu_<variant>`: model FLOP/s (the same count) over this CPU's fp32 GEMM peak on the bench's
threads, measured at the end of the run (`recipes.metrics.measure_gemm_tflops`, what the trainer calibrates
with). On CPU the process group's set-up keeps freed host memory for reuse (recipes/host_memory.py), for
every variant here, open_clip's included.

Batch 128 per device by default: CLIP runs train at 128-512 per device. The engine's per-step work that does
not grow with the batch (DeepSpeed copies every gradient into its reduction buckets and flat partition, then
clips and updates) is ~0.15 s here: ~7% of a step at batch 32, under 2% at 128. Run `--batch 32` to see it.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# A ViT-B/32-shaped model scaled down in width and depth so one step takes about a second on a CPU core.
SIZE = dict(image_size=224, patch_size=32, vision_width=384, vision_layers=6, vision_heads=6,
            text_width=256, text_layers=6, text_heads=4, embed_dim=256, context=77)


def model_overrides(attention: str) -> list[str]:
    z = SIZE
    return [f"model.embed_dim={z['embed_dim']}", f"model.vision.image_size={z['image_size']}",
            f"model.vision.patch_size={z['patch_size']}", f"model.vision.width={z['vision_width']}",
            f"model.vision.layers={z['vision_layers']}", f"model.vision.heads={z['vision_heads']}",
            f"model.text.width={z['text_width']}", f"model.text.layers={z['text_layers']}",
            f"model.text.heads={z['text_heads']}", f"model.vision.attention={attention}",
            f"model.text.attention={attention}"]


def batch_tensors(batch: int, pyramid: bool, generator: torch.Generator) -> dict:
    s, c = SIZE["image_size"], SIZE["context"]

    def tokens(length: int) -> torch.Tensor:
        t = torch.zeros(batch, c, dtype=torch.long)
        t[:, 0], t[:, 1:length - 1], t[:, length - 1] = 49406, torch.randint(1, 49000, (batch, length - 2), generator=generator), 49407
        return t

    out = {"image": torch.randn(batch, 3, s, s, generator=generator), "text": tokens(20)}
    if pyramid:
        out.update(image_local=torch.randn(batch, 3, s, s, generator=generator), summary=tokens(6), objects=tokens(12),
                   summary_mask=torch.ones(batch, dtype=torch.bool), objects_mask=torch.ones(batch, dtype=torch.bool),
                   boxes=torch.tensor([[0.1, 0.1, 0.6, 0.7]]).repeat(batch, 10, 1),
                   boxes_mask=torch.arange(10).expand(batch, 10) < 3)
    return out


def ours(attention: str, loss: str, batch: int, guard: bool = False):
    from recipes.config import load_config
    from recipes.engine import build_engine, deepspeed_config
    from recipes.guard import Guard
    from recipes.step import train_step

    cfg = load_config(None, [*model_overrides(attention), f"loss.kind={loss}", "loss.label_smoothing=0.0",
                             "train.precision=fp32", "train.ds_config=ds_configs/zero2.json", f"train.batch_size={batch}"])
    torch.manual_seed(0)
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    data = batch_tensors(batch, loss == "pyramid", torch.Generator().manual_seed(0))
    if not guard:
        return lambda: train_step(engine, data, cfg.loss, cfg.grad_cache)
    g = Guard(cfg.train.guard, rank=0, device=torch.device("cpu"))

    def guarded():  # what the trainer's loop does around the step
        g.begin(data)
        train_step(engine, data, cfg.loss, cfg.grad_cache, g)
        g.end(engine)

    return guarded


def train_flops(variant: str) -> int:
    """Training FLOPs per sample of a variant ('hier_pyramid', ...) at these sizes (model/flops.py)."""
    from model.flops import count_flops
    from recipes.config import load_config

    attention, loss = variant.split("_")
    attention = "vanilla" if attention == "open" else attention  # open_clip's CLIP is our vanilla CLIP's shape
    return count_flops(load_config(None, model_overrides(attention)).model, pyramid=loss == "pyramid").train


def flop_ratios() -> dict[str, float]:
    """HiCLIP's and PyramidCLIP's training FLOPs over CLIP's."""
    clip = train_flops("vanilla_clip")
    return {"hier": train_flops("hier_clip") / clip,
            "pyramid": train_flops("vanilla_pyramid") / clip}


def open_clip_step(batch: int, fused_adamw: bool = False):
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    z = SIZE
    torch.manual_seed(0)
    model = OpenCLIP(
        embed_dim=z["embed_dim"],
        vision_cfg=CLIPVisionCfg(layers=z["vision_layers"], width=z["vision_width"], patch_size=z["patch_size"],
                                 image_size=z["image_size"], head_width=z["vision_width"] // z["vision_heads"]),
        text_cfg=CLIPTextCfg(context_length=z["context"], width=z["text_width"], heads=z["text_heads"],
                             layers=z["text_layers"]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused_adamw)
    loss_fn = ClipLoss()
    data = batch_tensors(batch, False, torch.Generator().manual_seed(0))

    def step():
        image, text, scale = model(data["image"], data["text"])
        loss = loss_fn(image, text, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # our engine clips too
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="", help="comma-separated subset, e.g. vanilla_clip,vanilla_clip_guard")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recipes.engine import init_distributed

    init_distributed()
    variants = {
        "open_clip": lambda: open_clip_step(args.batch),
        "open_clip_fused": lambda: open_clip_step(args.batch, fused_adamw=True),
        "vanilla_clip": lambda: ours("vanilla", "clip", args.batch),
        "vanilla_clip_guard": lambda: ours("vanilla", "clip", args.batch, guard=True),
        "hier_clip": lambda: ours("hier", "clip", args.batch),
        "vanilla_pyramid": lambda: ours("vanilla", "pyramid", args.batch),
        "hier_pyramid": lambda: ours("hier", "pyramid", args.batch),
    }
    chosen = args.variants.split(",") if args.variants else list(variants)
    steps = {name: variants[name]() for name in chosen}
    for step in steps.values():  # warm-up: allocator, lazy inits, first-call dispatch
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'variant':<18}{'median s/step':>14}{'min':>8}{'max':>8}   (batch {args.batch}, fp32, {args.threads} thread)")
    for name, ts in times.items():
        print(f"{name:<18}{median[name]:>14.3f}{min(ts):>8.3f}{max(ts):>8.3f}")
    ratios = {
        "vanilla_vs_open_clip": ("vanilla_clip", "open_clip"),
        "vanilla_vs_open_clip_fused_adamw": ("vanilla_clip", "open_clip_fused"),
        "hier_vs_vanilla": ("hier_clip", "vanilla_clip"),
        "pyramid_vs_vanilla": ("vanilla_pyramid", "vanilla_clip"),
        "hier_pyramid_vs_vanilla": ("hier_pyramid", "vanilla_clip"),
    }
    result = {"bench": "step", "batch": args.batch}
    measured = {key: (a, b) for key, (a, b) in ratios.items() if a in median and b in median}
    result.update({key: round(median[a] / median[b], 3) for key, (a, b) in measured.items()})
    # The same ratios paired round by round (each round runs every variant back to back): the median of the
    # per-round ratios, which a slow spell of a shared machine spanning several rounds moves less.
    result.update({f"{key}_paired": round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
                   for key, (a, b) in measured.items()})
    flops = flop_ratios()
    result.update({f"{k}_flop_ratio": round(v, 3) for k, v in flops.items()})
    if "pyramid_vs_vanilla" in result:
        time_ratio = median["vanilla_pyramid"] / median["vanilla_clip"]
        result["pyramid_time_over_flops"] = round(time_ratio / flops["pyramid"], 3)
    if "vanilla_clip_guard" in median and "vanilla_clip" in median:
        # the divergence guard (recipes/guard.py) on vs off: its loss all-reduce, host sync and bookkeeping
        result["guard_overhead"] = round(median["vanilla_clip_guard"] / median["vanilla_clip"] - 1, 4)
    # MFU against this CPU's fp32 GEMM peak on the same threads, measured now, in the same process
    from recipes.metrics import measure_gemm_tflops

    peak = measure_gemm_tflops(torch.float32, seconds=2.0)
    result["cpu_fp32_gemm_peak_tflops"] = round(peak, 4)
    for name in median:
        if name != "vanilla_clip_guard":
            result[f"mfu_{name}"] = round(train_flops(name) * args.batch / median[name] / 1e12 / peak, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
