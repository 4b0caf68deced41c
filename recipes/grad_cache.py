"""Gradient cache (GradCache, docs/method.md §3): the contrastive batch is bounded by the loss, not by activation
memory.

One optimizer step over a local batch split into chunks:
1. forward every chunk without autograd, saving the RNG state (CPU and device) before each, so dropout
   replays identically later; keep only the embeddings;
2. compute the loss on the embeddings (the loss gathers them from every rank) with detached leaves, and
   backward it: this yields ∂L/∂(local embeddings) and ∂L/∂(logit scale), and nothing else;
3. per chunk: restore its RNG state, forward with autograd, and backward the surrogate
   Σ embeddings · cached gradient, whose parameter gradient is exactly that chunk's share of ∂L/∂θ.

The replayed backwards accumulate in the engine, and `engine.coalesce_grad_reduction()` issues ONE gradient
reduction (ZeRO-2 reduce / ZeRO-3 reduce-scatter) when the block exits, not one per chunk. Under ZeRO-3 that
costs one unpartitioned fp32 gradient of the whole model per rank until the exit (docs/performance.md);
`reduction: boundary` trades it for one reduction per chunk.

Under ZeRO-3 the parameters are gathered once for all of a step's passes (`gather: step`, recipes/zero3_gather.py)
rather than re-gathered module by module in each of the 3 passes per chunk (`gather: pass`, DeepSpeed's own
hooks); `auto` takes `step` unless the config keeps the model from staying whole on a rank (offloaded parameters, or
more of them than `stage3_max_live_parameters`).

Every rank runs the same number of chunks (the per-rank batch is fixed) and every chunk runs the whole
model and backs through every embedding it returned, with zero gradients for levels the loss does not use:
ZeRO-3 needs identical module calls on all ranks, and a stable prefetch trace needs every chunk alike.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from model.config_tree import require
from recipes.zero3_gather import gather_once_blocker, gathered_for_step, is_zero3

LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]

# Model outputs that are one value per batch rather than one row per sample.
PER_BATCH_OUTPUTS = ("logit_scale",)


@dataclass
class GradCacheConfig:
    chunk_size: int = 0  # samples per chunk on each rank; 0 turns the cache off
    reduction: Literal["coalesce", "boundary"] = "coalesce"  # coalesce: one reduction per step | boundary: per chunk
    # ZeRO-3 only. step: all parameters gathered once per step | pass: per module, in every pass | auto: step if allowed
    gather: Literal["auto", "step", "pass"] = "auto"

    def __post_init__(self) -> None:
        require(self.chunk_size >= 0, "chunk_size", self.chunk_size, "≥ 0 (0 turns the cache off)")


def split_batch(batch: dict, chunk_size: int) -> list[dict]:
    """Cut every per-sample tensor of the batch along dim 0; anything else is shared by all chunks."""
    size = batch["image"].shape[0]
    return [{k: v[start : start + chunk_size] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            for start in range(0, size, chunk_size)]


def _rng_state() -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple[Tensor, Tensor | None]) -> None:
    cpu, device = state
    torch.set_rng_state(cpu)
    if device is not None:
        torch.cuda.set_rng_state(device)


def cached_backward(engine, batch: dict, loss_fn: LossFn, cfg: GradCacheConfig,
                    admit: Callable[[Tensor], bool] | None = None) -> tuple[Tensor, dict]:
    """Accumulate ∂(global loss)/∂θ in the engine chunk by chunk; the caller runs `engine.step()`.

    loss_fn maps model outputs (embeddings by level, masks, `logit_scale`) to (this rank's loss, metrics), as
    the plain step does. `admit(loss)` (the divergence guard, recipes/guard.py) may stop the step before any
    backward. Returns (detached loss, metrics).
    """
    chunks = split_batch(batch, cfg.chunk_size)
    with _gather_scope(engine, cfg.gather):
        return _cached_passes(engine, chunks, loss_fn, cfg, admit)


def _cached_passes(engine, chunks: list[dict], loss_fn: LossFn, cfg: GradCacheConfig,
                   admit: Callable[[Tensor], bool] | None) -> tuple[Tensor, dict]:
    # 1. Embeddings of every chunk, no activations kept.
    rng_states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            rng_states.append(_rng_state())
            outputs.append(engine(chunk))

    # 2. Loss on detached leaves -> the gradient each embedding must carry back into the towers.
    leaves = {k: (outputs[0][k] if k in PER_BATCH_OUTPUTS else torch.cat([o[k] for o in outputs])).detach()
              for k in outputs[0]}
    for value in leaves.values():
        if value.is_floating_point():
            value.requires_grad_()
    loss, metrics = loss_fn(leaves)
    if admit is not None and not admit(loss):
        return loss.detach(), metrics
    # Each rank's loss covers its own rows (their sum is the global loss) and DeepSpeed averages gradients over
    # ranks: scale by the world size, for the embeddings and for the temperature alike (model/losses.py).
    (loss * dist.get_world_size()).backward()
    cached = {k: v.grad if v.grad is not None else torch.zeros_like(v)
              for k, v in leaves.items() if v.requires_grad}
    # Every replayed chunk recomputes the same logit scale: each carries an equal share of its gradient.
    for k in PER_BATCH_OUTPUTS:
        cached[k] = cached[k] / len(chunks)

    # 3. Replay each chunk with autograd and push the cached gradients through it.
    with _single_reduction(engine, cfg.reduction):
        start = 0
        for j, (chunk, rng) in enumerate(zip(chunks, rng_states)):
            _set_rng_state(rng)
            out = engine(chunk)
            size = chunk["image"].shape[0]
            surrogate = sum((out[k] * (g if k in PER_BATCH_OUTPUTS else g[start : start + size])).sum()
                            for k, g in cached.items())
            if cfg.reduction == "boundary":
                engine.set_gradient_accumulation_boundary(j == len(chunks) - 1)
            engine.backward(surrogate)
            start += size
    return loss.detach(), metrics


def check_gather(engine, gather: str) -> str | None:
    """Under ZeRO-3, why `gather: step` cannot hold for this engine (None when it can); ValueError when the config
    asks for `step` regardless. Checked when the engine is built (recipes/engine.py: a bad config fails there,
    not at step 1) and at every cached step."""
    if not is_zero3(engine) or gather == "pass":
        return None
    blocker = gather_once_blocker(engine)
    if blocker is not None and gather == "step":
        raise ValueError(f"grad_cache.gather=step: {blocker}; set grad_cache.gather to auto or pass")
    return blocker


def _gather_scope(engine, gather: str):
    once = is_zero3(engine) and gather != "pass" and check_gather(engine, gather) is None
    return gathered_for_step(engine) if once else nullcontext()


def _single_reduction(engine, reduction: str):
    return engine.coalesce_grad_reduction() if reduction == "coalesce" else nullcontext()
