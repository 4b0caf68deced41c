"""`--dry-run`: what a recipe will cost, from the config alone (no GPU, no data, no weights allocated).

    python -m recipes.pretrain --config recipes/configs/hiclip_b16.yaml --dry-run --world-size 32
    python -m recipes.dry_run recipes/configs/*_b32.yaml recipes/configs/*_b16.yaml   # the docs/recipes.md table

The model is built on the meta device (shapes only) to count parameters; FLOPs come from model/flops.py; the
per-GPU memory of model states (parameters, gradients, Adam moments) under ZeRO-2 and ZeRO-3 comes from
DeepSpeed's own estimators, which take parameter counts. Activations per sample come from the analytic model in
`activation_bytes_per_sample` (with and without activation checkpointing, and under the recipe's own levers),
and give the per-GPU batch, or gradient-cache chunk, that fits an 80 GB GPU (docs/scaling.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from model.clip import CLIP
from model.config import ModelConfig
from model.flops import count_flops
from model.transformer import checkpoint_plan
from model.vision import kept_patches
from recipes.config import Config
from recipes.engine import deepspeed_config, zero_stage
from recipes.metrics import PEAK_BF16_TFLOPS

ASSUMED_MFU = 0.4  # for the wall-time line only: a typical well-tuned CLIP run on H100s
H100_TFLOPS = dict(PEAK_BF16_TFLOPS)["H100"]
GIB = 2**30
GB = 1e9
HBM_GB = 80.0  # A100 / H100 80 GB
ACTIVATION_BUDGET = 0.5  # of HBM for one step's (or chunk's) activations; the rest: states, logits, allocator slack


def activation_bytes_per_sample(cfg: ModelConfig, pyramid: bool) -> int:
    """Activation bytes one sample holds at the backward's peak in 16-bit training, under the config's levers.

    A block that is not recomputed keeps s·h·(34 + 5·a·s/h) bytes for its backward (Korthikanti et al. 2022, eq.
    1: s tokens, width h, a heads); a HiCLIP block adds its fp32 N×N prior, 4·s². A checkpointed block keeps only
    its input, 2·s·h (the links are O(s)); while backward recomputes one block, that block's full activations
    for all of the call's views (or texts) are live once more, on top of what the others keep. Patch dropout:
    a training forward sees 1 + the kept patches.
    """
    def tower(tokens: int, width: int, heads: int, layers: int, hier: bool, plan: list[bool], copies: int):
        full = tokens * width * (34 + 5 * heads * tokens / width) + (4 * tokens**2 if hier else 0)
        kept = sum(2 * tokens * width if checkpointed else full for checkpointed in plan)
        return copies * kept, copies * full if any(plan) else 0

    v, t = cfg.vision, cfg.text
    views, texts = (2, 3) if pyramid else (1, 1)
    image, image_recompute = tower(1 + kept_patches(v)[0], v.width, v.heads, v.layers, v.attention == "hier",
                                   checkpoint_plan(v.checkpointing, v.checkpoint_every, v.layers), views)
    text, text_recompute = tower(t.context_length, t.width, t.heads, t.layers, t.attention == "hier",
                                 checkpoint_plan(t.checkpointing, t.checkpoint_every, t.layers), texts)
    return int(image + text + max(image_recompute, text_recompute))


def batch_that_fits(bytes_per_sample: float, budget_bytes: float = ACTIVATION_BUDGET * HBM_GB * GB) -> int:
    """The largest power of two of samples whose activations fit the budget: a per-GPU batch or cache chunk."""
    return 2 ** int(math.log2(budget_bytes / bytes_per_sample))


def with_checkpointing(cfg: ModelConfig, mode: str) -> ModelConfig:
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, checkpointing=mode),
                               text=dataclasses.replace(cfg.text, checkpointing=mode))


@dataclass
class DryRun:
    params: int
    params_vision: int
    params_text: int
    params_prior: int
    largest_layer_params: int
    forward_flops: int  # per sample
    train_flops: int  # per sample
    world_size: int
    gpus_per_node: int
    global_batch: int
    steps: int
    warmup_steps: int
    epochs: float | None
    zero_stage: int  # of the recipe's ds_config
    zero2_gb: float  # per GPU, model states
    zero3_gb: float
    zero2_offload_gb: float
    zero3_offload_gb: float
    batch_per_gpu: int
    chunk_size: int  # grad_cache.chunk_size of the recipe; 0 = off
    activation_gb: float  # per sample under the recipe's levers
    activation_gb_none: float  # per sample without checkpointing (the recipe's patch dropout kept)
    activation_gb_blocks: float  # per sample with block checkpointing in both towers

    @property
    def total_flops(self) -> float:
        return self.train_flops * self.global_batch * self.steps

    def hours_on_h100(self, mfu: float = ASSUMED_MFU) -> float:
        return self.total_flops / (self.world_size * H100_TFLOPS * 1e12 * mfu) / 3600

    def fits(self, gb_per_sample: float) -> int:
        return batch_that_fits(gb_per_sample * GB)

    def memory_advice(self) -> str:
        """Whether the recipe's per-GPU batch (or chunk) fits, and the cheapest lever that makes it fit."""
        need = self.chunk_size or self.batch_per_gpu
        what = f"chunk {need}" if self.chunk_size else f"batch {need}/GPU"
        if need <= self.fits(self.activation_gb):
            return f"{what} fits"
        if need <= self.fits(self.activation_gb_blocks):
            return f"{what} does not fit: checkpointing=blocks makes it fit (about +1 forward, no extra ZeRO-3 gathers)"
        return (f"{what} does not fit even with checkpointing: grad_cache.chunk_size="
                f"{self.fits(self.activation_gb_blocks)} with checkpointing=blocks, "
                f"or {self.fits(self.activation_gb_none)} without")

    def table(self) -> str:
        m = 1e6
        epochs = f"{self.epochs:.2f}" if self.epochs is not None else "n/a (data.train_num_samples unset)"
        rows = [
            ("parameters", f"{self.params / m:.2f} M (vision {self.params_vision / m:.2f} M, text "
                           f"{self.params_text / m:.2f} M, of which HiCLIP priors {self.params_prior / m:.2f} M)"),
            ("largest layer", f"{self.largest_layer_params / m:.2f} M parameters"),
            ("FLOPs / sample", f"{self.forward_flops / 1e9:.2f} GFLOP forward, {self.train_flops / 1e9:.2f} GFLOP "
                               "train step (3x)"),
            ("FLOPs / step", f"{self.train_flops * self.global_batch / 1e15:.2f} PFLOP at global batch "
                             f"{self.global_batch}"),
            ("steps", f"{self.steps} ({self.warmup_steps} warm-up), {epochs} epochs"),
            ("total compute", f"{self.total_flops / 1e18:.1f} EFLOP; {self.hours_on_h100():.1f} h on "
                              f"{self.world_size} H100 at {ASSUMED_MFU:.0%} MFU (assumed)"),
            ("model states / GPU", f"ZeRO-2 {self.zero2_gb:.2f} GiB, ZeRO-3 {self.zero3_gb:.2f} GiB; with CPU "
                                    f"offload {self.zero2_offload_gb:.2f} / {self.zero3_offload_gb:.2f} GiB "
                                    f"(recipe uses ZeRO-{self.zero_stage}; {self.world_size} GPUs, "
                                    f"{self.gpus_per_node} per node)"),
            ("activations/sample", f"{self.activation_gb_none:.3f} GB without checkpointing, "
                                   f"{self.activation_gb_blocks:.3f} GB with checkpointing=blocks, "
                                   f"{self.activation_gb:.3f} GB as configured (16-bit, analytic)"),
            (f"fits {HBM_GB:.0f} GB", f"per-GPU batch or cache chunk {self.fits(self.activation_gb_none)} without "
                                 f"checkpointing, {self.fits(self.activation_gb_blocks)} with it "
                                 f"({ACTIVATION_BUDGET:.0%} of HBM for activations); {self.memory_advice()}"),
        ]
        return "\n".join(f"{name:<20}{value}" for name, value in rows)


def count_params(model: torch.nn.Module) -> tuple[int, int, int, int, int]:
    """(total, vision, text, HiCLIP prior, largest single module's own parameters)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    prior = sum(p.numel() for name, p in model.named_parameters() if ".prior." in name)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, vision, text, prior, largest


def model_state_gib(params: int, largest: int, world_size: int, gpus_per_node: int) -> dict[str, float]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(gpus_per_node, world_size)
    if world_size % per_node:
        raise ValueError(f"--world-size {world_size} is not a multiple of --gpus-per-node {per_node}")
    nodes = world_size // per_node
    zero2 = {off: estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=off)[1]
             for off in (False, True)}
    zero3 = {off: estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=off,
                                                        cpu_offload_params=off)[1] for off in (False, True)}
    return {"zero2_gb": zero2[False] / GIB, "zero3_gb": zero3[False] / GIB,
            "zero2_offload_gb": zero2[True] / GIB, "zero3_offload_gb": zero3[True] / GIB}


def dry_run(cfg: Config, world_size: int, gpus_per_node: int = 8) -> DryRun:
    ds = deepspeed_config(cfg)  # validates the recipe's DeepSpeed config (it must exist)
    with torch.device("meta"):
        model = CLIP(cfg.model)
    params, vision, text, prior, largest = count_params(model)
    flops = count_flops(cfg.model, pyramid=cfg.loss.kind == "pyramid")
    global_batch = cfg.train.batch_size * world_size
    samples = cfg.data.train_num_samples
    pyramid = cfg.loss.kind == "pyramid"
    activations = {mode: activation_bytes_per_sample(with_checkpointing(cfg.model, mode), pyramid) / GB
                   for mode in ("none", "blocks")}
    return DryRun(
        params=params, params_vision=vision, params_text=text, params_prior=prior, largest_layer_params=largest,
        forward_flops=flops.forward, train_flops=flops.train, world_size=world_size,
        gpus_per_node=min(gpus_per_node, world_size), global_batch=global_batch, steps=cfg.train.steps,
        warmup_steps=cfg.train.warmup_steps, epochs=cfg.train.steps * global_batch / samples if samples else None,
        zero_stage=zero_stage(ds), **model_state_gib(params, largest, world_size, gpus_per_node),
        batch_per_gpu=cfg.train.batch_size, chunk_size=cfg.grad_cache.chunk_size,
        activation_gb=activation_bytes_per_sample(cfg.model, pyramid) / GB,
        activation_gb_none=activations["none"], activation_gb_blocks=activations["blocks"],
    )


def markdown_rows(runs: dict[str, DryRun]) -> str:
    """One markdown table row per recipe (the table in docs/recipes.md)."""
    header = ("| recipe | params (M) | of which prior (M) | GFLOP/sample fwd | GFLOP/sample train | PFLOP/step "
              "| steps | epochs | ZeRO-2 GiB/GPU | ZeRO-3 GiB/GPU | EFLOP total | h @ 40% MFU |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| `{name}` | {r.params / 1e6:.2f} | {r.params_prior / 1e6:.2f} | {r.forward_flops / 1e9:.2f} "
            f"| {r.train_flops / 1e9:.2f} | {r.train_flops * r.global_batch / 1e15:.3f} | {r.steps:,} "
            f"| {r.epochs:.1f} | {r.zero2_gb:.2f} | {r.zero3_gb:.2f} | {r.total_flops / 1e18:.1f} "
            f"| {r.hours_on_h100():.1f} |" for name, r in runs.items()]
    return "\n".join([header, *rows])


def main(argv=None) -> None:
    import argparse
    from pathlib import Path

    from recipes.config import load_config

    p = argparse.ArgumentParser(description="dry runs of several recipes as one markdown table")
    p.add_argument("recipes", nargs="+", help="YAML recipes")
    p.add_argument("--world-size", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=8)
    args = p.parse_args(argv)
    runs = {Path(r).stem: dry_run(load_config(r), args.world_size, args.gpus_per_node) for r in args.recipes}
    print(markdown_rows(runs))


if __name__ == "__main__":
    main()
