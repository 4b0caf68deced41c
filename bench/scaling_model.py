"""The on-paper scale-out model behind docs/scaling.md: every number there comes from this file's inputs.

    python bench/scaling_model.py [--recipe recipes/configs/hiclip_pyramid_b16.yaml] [--global-batch 32768]

ViT-B/16 HiCLIP × PyramidCLIP (the recipe's model) at a fixed global batch on 64–1,024 H100s: FLOPs per sample
(model/flops.py), parameter count (the model built on the meta device), and per step the bytes each collective
moves and the time it takes on the stated links, against the compute time at a stated fraction of peak.
Nothing here is measured; `Inputs` holds every assumption, and ZeRO-3's gather pattern (passes per step, calls
per pass) follows what bench/zero_memory.py counted with ds_configs/zero3.json as shipped. Prints the doc's
tables; last line one JSON object.

Cost of a collective (ring algorithm, the one NCCL uses for all-gather and reduce-scatter), S = the full
gathered (or reduced) buffer, p ranks, B = the bus bandwidth of the slowest link the rings cross:
    t(S, p) = (p − 1) / p · S / (η · B)          each rank receives (p − 1)/p · S bytes
Intra-node B is NVLink per direction; across nodes every ring crosses each node boundary once and the 8 rings
(NCCL channels) share the node's NICs, so B = min(NVLink per direction, the node's NIC bandwidth).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

GB = 1e9


@dataclass(frozen=True)
class Fabric:
    name: str
    nic_gbs_per_node: float  # GB/s leaving (and entering) one node


@dataclass(frozen=True)
class Inputs:
    recipe: str = "recipes/configs/hiclip_pyramid_b16.yaml"
    global_batch: int = 32_768
    worlds: tuple[int, ...] = (64, 128, 256, 512, 1024)
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100 SXM dense bf16 (recipes/metrics.py)
    mfu: float = 0.40  # achieved fraction of peak on every FLOP executed (recipes/dry_run.py's assumption)
    hbm_gb: float = 80.0
    activation_budget: float = 0.5  # of HBM for one chunk's activations (the rest: states, logits, allocator slack)
    nvlink_gbs: float = 450.0  # per direction (H100 NVLink 4: 900 GB/s bidirectional)
    fabrics: tuple[Fabric, ...] = field(default_factory=lambda: (
        Fabric("8×400 Gb/s IB per node", 8 * 400 / 8),  # one 400 Gb/s NIC per GPU: 400 GB/s per node
        Fabric("1×400 Gb/s per node", 400 / 8),  # one NIC shared by 8 GPUs: 50 GB/s per node
    ))
    link_efficiency: float = 0.8  # η: fraction of line rate a large ring collective achieves
    ring_step_latency_us: float = 3.0  # α: one ring step when the ring crosses nodes (IB, small message)
    nvlink_step_latency_us: float = 1.0  # α inside a node
    bytes_param: int = 2  # bf16 parameters are what ZeRO-3 gathers
    bytes_grad: int = 2  # bf16 gradients are what it reduce-scatters (bench/zero_memory.py: 2 B/param)
    bytes_embedding: int = 2  # the towers' bf16 embeddings are what the loss gathers
    reduce_bucket: int = 50_000_000  # ds_configs/zero{2,3}.json reduce_bucket_size (elements)
    prefetch_bucket: int = 50_000_000  # ds_configs/zero3.json stage3_prefetch_bucket_size (elements)
    allgather_bucket: int = 50_000_000  # ds_configs/zero2.json allgather_bucket_size (elements)
    persistence_threshold: int = 100_000  # ds_configs/zero3.json stage3_param_persistence_threshold
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters: DeepSpeed's default, zero3.json keeps it
    grad_cache_gather: str = "auto"  # grad_cache.gather: auto | step | pass (recipes/grad_cache.py)


# --------------------------------------------------------------------------- the model's own numbers
@dataclass(frozen=True)
class ModelNumbers:
    params: int
    params_gathered: int  # above the persistence threshold: what ZeRO-3 partitions and re-gathers
    gather_modules: int  # modules owning such parameters: an upper bound on gather calls per pass
    prior_params: int
    forward_flops: int  # per sample: both towers, every pyramid view and text, regions, priors
    prior_flops: int
    vanilla_forward_flops: int  # the same sample without HiCLIP's priors
    clip_forward_flops: int  # plain CLIP: one image, one caption
    embed_dim: int
    levels: int  # embeddings per sample the loss gathers
    activation_bytes: int  # per sample, bf16, no recomputation


def model_numbers(inputs: Inputs) -> ModelNumbers:
    import copy

    import torch

    from model.clip import CLIP
    from model.flops import count_flops
    from recipes.config import load_config
    from recipes.dry_run import activation_bytes_per_sample

    cfg = load_config(inputs.recipe)
    pyramid = cfg.loss.kind == "pyramid"
    with torch.device("meta"):
        model = CLIP(cfg.model)
    sizes = [p.numel() for p in model.parameters()]
    gathered = sum(n for n in sizes if n > inputs.persistence_threshold)
    gather_modules = sum(1 for m in model.modules()
                         if any(p.numel() > inputs.persistence_threshold for p in m.parameters(recurse=False)))
    vanilla = copy.deepcopy(cfg.model)
    vanilla.vision.attention = vanilla.text.attention = "vanilla"
    flops = count_flops(cfg.model, pyramid=pyramid)
    return ModelNumbers(
        params=sum(sizes), params_gathered=gathered, gather_modules=gather_modules,
        prior_params=sum(p.numel() for name, p in model.named_parameters() if ".prior." in name),
        forward_flops=flops.forward, prior_flops=flops.prior,
        vanilla_forward_flops=count_flops(vanilla, pyramid=pyramid).forward,
        clip_forward_flops=count_flops(vanilla, pyramid=False).forward,
        embed_dim=cfg.model.embed_dim, levels=6 if pyramid else 2,
        activation_bytes=activation_bytes_per_sample(cfg.model, pyramid),
    )


# --------------------------------------------------------------------------- one step at one world size
@dataclass(frozen=True)
class Collective:
    """`calls` ring collectives over `ranks`, moving `size_bytes` in all (the full gathered / reduced buffers)."""

    size_bytes: float
    ranks: int
    calls: int
    bus_gbs: float
    step_latency_s: float  # α: one ring step on the slowest link crossed

    def bandwidth_seconds(self, efficiency: float) -> float:
        return (self.ranks - 1) / self.ranks * self.size_bytes / (efficiency * self.bus_gbs * GB)

    def latency_seconds(self) -> float:
        return self.calls * (self.ranks - 1) * self.step_latency_s


def chunk_size(inputs: Inputs, m: ModelNumbers) -> int:
    """Largest power of two whose activations fit the budget: the gradient cache's per-GPU chunk."""
    from recipes.dry_run import batch_that_fits

    return batch_that_fits(m.activation_bytes, inputs.activation_budget * inputs.hbm_gb * GB)


def step_model(inputs: Inputs, m: ModelNumbers, world: int, fabric: Fabric) -> dict:
    g = min(inputs.gpus_per_node, world)
    nodes = world // g
    per_gpu = inputs.global_batch // world
    chunk = chunk_size(inputs, m)
    chunks = math.ceil(per_gpu / chunk)
    cached = chunks > 1  # the cache is on only where one chunk cannot hold the per-GPU batch
    bus = inputs.nvlink_gbs if nodes == 1 else min(inputs.nvlink_gbs, fabric.nic_gbs_per_node)
    alpha = (inputs.ring_step_latency_us if nodes > 1 else inputs.nvlink_step_latency_us) * 1e-6
    node_alpha = inputs.nvlink_step_latency_us * 1e-6

    def across_all(size: float, calls: int) -> Collective:
        return Collective(size, world, calls, bus, alpha)

    # Compute: 3 forward-equivalents per sample (forward + 2× backward), one more when the cache replays.
    forwards = 3 + (1 if cached else 0)
    compute_s = per_gpu * m.forward_flops * forwards / (inputs.mfu * inputs.peak_tflops * 1e12)

    # ZeRO-3 as ds_configs/zero3.json runs it (bench/zero_memory.py counts the gathers). Without the cache the
    # module trace is stable and stage3_max_reuse_distance (1e9 elements) exceeds the model: one forward gathers
    # everything in ⌈P / prefetch bucket⌉ calls and the backward gathers nothing. With the cache and
    # `grad_cache.gather: step` (what auto picks when the model fits stage3_max_live_parameters) one coalesced call
    # gathers the model before the first pass, with nothing to hide behind (recipes/zero3_gather.py). With
    # `gather: pass` DeepSpeed's own hooks run: the no-grad forwards break the trace, each module's parameters are
    # released after use and gathered again, in a no-grad forward, a replayed forward and a backward per chunk, at
    # most one call per module.
    once = inputs.grad_cache_gather == "step" or (inputs.grad_cache_gather == "auto"
                                                  and m.params_gathered <= inputs.max_live_parameters)
    if cached and once:
        passes, calls_per_pass = 1, 1
    elif cached:
        passes, calls_per_pass = 3 * chunks, m.gather_modules
    else:
        passes, calls_per_pass = 1, math.ceil(m.params_gathered / inputs.prefetch_bucket)
    param_bytes = m.params_gathered * inputs.bytes_param
    grad_bytes = m.params * inputs.bytes_grad
    reduce = across_all(grad_bytes, math.ceil(m.params / inputs.reduce_bucket))  # once per step (coalesced)
    # The step's first gather call has nothing to hide behind; prefetch overlaps the rest with compute.
    first_call = across_all(param_bytes / calls_per_pass, 1)
    rest_of_first_pass = across_all(param_bytes - first_call.size_bytes, calls_per_pass - 1)
    zero3 = [across_all((passes - 1) * param_bytes, (passes - 1) * calls_per_pass), rest_of_first_pass, reduce]
    # ZeRO++ hpZ (zero_hpz_partition_size = GPUs per node): a step's first pass crosses nodes and leaves a
    # node-local secondary shard; every later gather of that step stays inside the node, over NVLink.
    hpz = [Collective((passes - 1) * param_bytes, g, (passes - 1) * calls_per_pass, inputs.nvlink_gbs, node_alpha),
           rest_of_first_pass, reduce]
    # ZeRO-2: the same reduce-scatter, then one all-gather of the updated bf16 parameters after the step.
    zero2_gather = across_all(m.params * inputs.bytes_param, math.ceil(m.params / inputs.allgather_bucket))
    # The loss: all-gather of every level's embeddings and of their masks, reduce-scatter of their gradients.
    emb_bytes = m.levels * inputs.global_batch * m.embed_dim * inputs.bytes_embedding
    loss = [across_all(emb_bytes, 1), across_all(m.levels * inputs.global_batch, 1), across_all(emb_bytes, 1)]

    eta = inputs.link_efficiency
    bw = lambda cs: sum(c.bandwidth_seconds(eta) for c in cs)  # noqa: E731
    lat = lambda cs: sum(c.latency_seconds() for c in cs)  # noqa: E731
    total = lambda cs: bw(cs) + lat(cs)  # noqa: E731
    loss_s = total(loss)
    # Overlap: ZeRO-3's gathers (prefetch) and every gradient reduce-scatter (overlap_comm) run beside compute;
    # ZeRO-2's parameter all-gather after the optimizer step and the loss's collectives sit on the critical path.
    z3_step = total([first_call]) + max(compute_s, total(zero3)) + loss_s
    hpz_step = total([first_call]) + max(compute_s, total(hpz)) + loss_s
    zero3, hpz = [first_call, *zero3], [first_call, *hpz]  # all of it, for the totals below
    z2_step = max(compute_s, total([reduce])) + total([zero2_gather]) + loss_s
    # ZeRO-2 with buckets that hold the whole model: one reduce-scatter and one all-gather call per step.
    one_call = lambda c: Collective(c.size_bytes, c.ranks, 1, c.bus_gbs, c.step_latency_s)  # noqa: E731
    z2_one_bucket_step = max(compute_s, total([one_call(reduce)])) + total([one_call(zero2_gather)]) + loss_s
    # The ring-step latency at which each strategy's communication would just equal the compute it hides behind.
    calls_x_steps = lambda cs: sum(c.calls * (c.ranks - 1) for c in cs)  # noqa: E731
    z3_alpha_even_us = max(0.0, compute_s - bw(zero3)) / calls_x_steps(zero3) * 1e6
    zero2 = [reduce, zero2_gather]
    z2_alpha_even_us = max(0.0, compute_s - bw(zero2)) / calls_x_steps(zero2) * 1e6
    return {
        "world": world, "nodes": nodes, "per_gpu_batch": per_gpu, "chunk": chunk, "chunks": chunks,
        "z3_alpha_even_us": z3_alpha_even_us, "z2_alpha_even_us": z2_alpha_even_us,
        "cached": cached, "compute_s": compute_s, "passes": passes, "calls_per_pass": calls_per_pass,
        "param_gb_per_gpu": (world - 1) / world * passes * param_bytes / GB,
        "z3_bw_s": bw(zero3), "z3_lat_s": lat(zero3), "hpz_bw_s": bw(hpz), "hpz_lat_s": lat(hpz),
        "z2_bw_s": bw([reduce, zero2_gather]), "z2_lat_s": lat([reduce, zero2_gather]),
        "loss_bw_s": bw(loss), "loss_lat_s": lat(loss),
        "z3_comm_over_compute": total(zero3) / compute_s, "hpz_comm_over_compute": total(hpz) / compute_s,
        "z2_comm_over_compute": total([reduce, zero2_gather]) / compute_s,
        "z3_step_s": z3_step, "hpz_step_s": hpz_step, "z2_step_s": z2_step, "z2_one_bucket_step_s": z2_one_bucket_step,
    }


# --------------------------------------------------------------------------- printing
def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def tables(inputs: Inputs, m: ModelNumbers) -> tuple[str, dict]:
    lines = []
    add = lines.append
    train = 3 * m.forward_flops
    add("## Model")
    add(f"parameters {m.params / 1e6:.2f} M (HiCLIP priors {m.prior_params / 1e6:.2f} M); partitioned by ZeRO-3 "
        f"(> {inputs.persistence_threshold:,} elements) {m.params_gathered / 1e6:.2f} M in {m.gather_modules} modules")
    add(f"forward FLOPs/sample {m.forward_flops / 1e9:.2f} G (priors {m.prior_flops / 1e9:.2f} G = "
        f"{m.prior_flops / m.vanilla_forward_flops:.1%} over the same sample without them); plain CLIP "
        f"{m.clip_forward_flops / 1e9:.2f} G; train step 3× = {train / 1e9:.2f} G, with the cache 4× = "
        f"{4 * m.forward_flops / 1e9:.2f} G")
    add(f"activations/sample {m.activation_bytes / GB:.3f} GB -> gradient-cache chunk {chunk_size(inputs, m)} "
        f"per GPU ({chunk_size(inputs, m) * m.activation_bytes / GB:.1f} GB of the {inputs.activation_budget:.0%} × "
        f"{inputs.hbm_gb:.0f} GB budget)")
    add(f"bytes: ZeRO-3 gather {m.params_gathered * inputs.bytes_param / GB:.3f} GB per pass, gradient "
        f"reduce-scatter {m.params * inputs.bytes_grad / GB:.3f} GB, loss embeddings {m.levels} × "
        f"{inputs.global_batch} × {m.embed_dim} × {inputs.bytes_embedding} B = "
        f"{m.levels * inputs.global_batch * m.embed_dim * inputs.bytes_embedding / GB:.3f} GB")
    # Model states per GPU, bytes per parameter as bench/zero_memory.py measures them under bf16: parameters 2,
    # gradients 2, fp32 master 4, Adam moments 8. ZeRO-2 keeps the bf16 parameters whole, ZeRO-3 shards all.
    for world in (inputs.worlds[0], inputs.worlds[-1]):
        zero2 = m.params * (2 + (2 + 4 + 8) / world)
        zero3 = m.params * 16 / world
        add(f"model states per GPU at {world} GPUs: ZeRO-2 {zero2 / GB:.3f} GB, ZeRO-3 {zero3 / GB:.3f} GB "
            f"(of {inputs.hbm_gb:.0f} GB)")
    summary: dict = {"bench": "scaling_model", "params_m": round(m.params / 1e6, 2),
                     "forward_gflop": round(m.forward_flops / 1e9, 2)}
    for fabric, key in zip(inputs.fabrics, ("ib8", "ib1")):
        rows = [step_model(inputs, m, world, fabric) for world in inputs.worlds]
        add("")
        add(f"### {fabric.name}: bus {min(inputs.nvlink_gbs, fabric.nic_gbs_per_node):.0f} GB/s across nodes")
        add("| GPUs | batch/GPU | chunks | compute | ZeRO-3 passes × calls | ZeRO-3 comm bw + lat | ZeRO-3+hpZ bw + lat | "
            "ZeRO-2 bw + lat | loss bw + lat | comm/compute Z3 / hpZ / Z2 | step Z3 / hpZ / Z2 | "
            "break-even α Z3 / Z2 (µs) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            add(f"| {r['world']} | {r['per_gpu_batch']} | {r['chunks']} | {ms(r['compute_s'])} | "
                f"{r['passes']} × {r['calls_per_pass']} | "
                f"{ms(r['z3_bw_s'])} + {ms(r['z3_lat_s'])} | {ms(r['hpz_bw_s'])} + {ms(r['hpz_lat_s'])} | "
                f"{ms(r['z2_bw_s'])} + {ms(r['z2_lat_s'])} | {ms(r['loss_bw_s'])} + {ms(r['loss_lat_s'])} | "
                f"{r['z3_comm_over_compute']:.2f} / {r['hpz_comm_over_compute']:.2f} / "
                f"{r['z2_comm_over_compute']:.2f} | {ms(r['z3_step_s'])} / {ms(r['hpz_step_s'])} / "
                f"{ms(r['z2_step_s'])} | {r['z3_alpha_even_us']:.2f} / {r['z2_alpha_even_us']:.1f} |")
        add("")
        add("| GPUs | scaling efficiency (compute / step): ZeRO-3 | ZeRO-3 + hpZ | ZeRO-2 | ZeRO-2, one bucket |")
        add("|---|---|---|---|---|")
        for r in rows:
            add(f"| {r['world']} | " + " | ".join(f"{r['compute_s'] / r[f'{k}_step_s']:.2f}"
                                                for k in ("z3", "hpz", "z2", "z2_one_bucket")) + " |")
        for strategy in ("z3", "hpz", "z2"):
            bound = [r["world"] for r in rows if r[f"{strategy}_comm_over_compute"] > 1]
            summary[f"{key}_{strategy}_comm_bound_from"] = bound[0] if bound else None
            summary[f"{key}_{strategy}_efficiency"] = {r["world"]: round(r["compute_s"] / r[f"{strategy}_step_s"], 3)
                                                      for r in rows}
    add("")
    add("(times in ms per step; bw = bandwidth term, lat = latency term; step = max(compute, overlapped comm) + "
        "exposed comm)")
    # What the cached rows would cost with DeepSpeed's per-module gathers in every pass (`grad_cache.gather: pass`).
    per_pass = replace(inputs, grad_cache_gather="pass")
    add("")
    add("With `grad_cache.gather: pass` instead (ZeRO-3's own per-module gathers in every pass), the cached rows:")
    for fabric, key in zip(inputs.fabrics, ("ib8", "ib1")):
        for world in inputs.worlds:
            r = step_model(per_pass, m, world, fabric)
            if r["cached"]:
                add(f"- {fabric.name}, {world} GPUs: {r['passes']} × {r['calls_per_pass']}, ZeRO-3 comm "
                    f"{ms(r['z3_bw_s'])} + {ms(r['z3_lat_s'])}, comm/compute {r['z3_comm_over_compute']:.2f}, "
                    f"step {ms(r['z3_step_s'])} (efficiency {r['compute_s'] / r['z3_step_s']:.2f})")
                summary[f"{key}_z3_gather_pass_efficiency_{world}"] = round(r["compute_s"] / r["z3_step_s"], 3)
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=Inputs.recipe)
    parser.add_argument("--global-batch", type=int, default=Inputs.global_batch)
    args = parser.parse_args()
    inputs = Inputs(recipe=args.recipe, global_batch=args.global_batch)
    text, summary = tables(inputs, model_numbers(inputs))
    print(text)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
