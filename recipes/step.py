"""One optimizer step: forward the local batch, contrastive loss over the global batch, backward, engine step."""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.losses import IMAGE_LEVELS, TEXT_LEVELS, LossConfig, compute_loss
from recipes.grad_cache import GradCacheConfig, cached_backward
from recipes.guard import Guard


def split_levels(out: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Model output -> (image embeddings, text embeddings, per-sample validity masks) by level."""
    image = {k: out[k] for k in IMAGE_LEVELS if k in out}
    text = {k: out[k] for k in TEXT_LEVELS if k in out}
    masks = {k: out[f"{k}_mask"] for k in (*IMAGE_LEVELS, *TEXT_LEVELS) if f"{k}_mask" in out}
    return image, text, masks


def train_step(engine, batch: dict, loss_cfg: LossConfig, grad_cache: GradCacheConfig | None = None,
               guard: Guard | None = None) -> dict[str, torch.Tensor]:
    """Returns detached metric tensors (no host sync here unless the guard decides); `reduce_metrics` turns them
    into numbers. With a guard, a step whose global loss is non-finite stops before the backward."""
    def loss_fn(out: dict[str, torch.Tensor]):
        image, text, masks = split_levels(out)
        loss, metrics = compute_loss(loss_cfg, image, text, masks, out["logit_scale"], gather=True)
        return (guard.fault(loss, out) if guard else loss), metrics

    admit = guard.admit if guard else None
    if grad_cache is not None and grad_cache.chunk_size > 0:  # chunked, gradient-cached (recipes/grad_cache.py)
        _, metrics = cached_backward(engine, batch, loss_fn, grad_cache, admit)
        if guard is not None and not guard.admitted:
            return metrics
    else:
        out = engine(batch)
        loss, metrics = loss_fn(out)
        if admit is not None and not admit(loss):
            return metrics
        # Each rank's loss covers its own rows; their sum is the global loss. DeepSpeed averages gradients over
        # ranks, so scale by the world size to get the gradient of the global loss.
        engine.backward(loss * dist.get_world_size())
    engine.step()
    return metrics


def reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum the per-rank loss shares into global values (one collective); call on every rank at log steps."""
    partial = sorted(k for k in metrics if k.startswith("loss"))
    totals = torch.stack([metrics[k].float() for k in partial])
    dist.all_reduce(totals)
    out = {k: v.item() for k, v in metrics.items() if k not in partial}
    out.update(zip(partial, totals.tolist()))
    out["temperature"] = 1.0 / out.pop("logit_scale")
    return out
