"""Contrastive losses: CLIP and PyramidCLIP (docs/method.md §2.2), dense or tiled, single process or sharded over
ranks.

One InfoNCE direction scores this rank's B local rows x_i against the N gathered global columns y_j,
z_ij = s·⟨x_i, y_j⟩ with s the (exp'd, clamped) logit scale. The positive of local row i is global column
r = row_offset + i. Columns of invalid samples (a missing level) are masked out, and N_v counts the valid
ones. Softened negatives: the target gives 1 − α to the positive and α/(N_v − 1) to each valid negative
(all of it to the positive when N_v = 1). Because the target sums to one,

    ℓ_i = −Σ_j t_ij log softmax(z_i)_j = lse_i − Σ_j t_ij z_ij
        = lse_i − (t_pos − t_neg)·z_ir − t_neg·s·⟨x_i, Σ_{valid j} y_j⟩.

Only lse_i = log Σ_{valid j} exp(z_ij) needs the B×N logits; the rest is O((B + N)·d). So the whole loss
is one row-wise log-sum-exp plus linear terms, and that log-sum-exp has three implementations behind one
switch:
- dense: materialises the B×N logits (fast for small batches, memory O(B·N));
- tiled: a custom autograd Function that walks tile × tile blocks with an online log-sum-exp (forward) and
  recomputes each block in backward (FlashAttention's trick), holding one block of logits at a time;
- triton: the same Function with Triton kernels (model/kernels/contrastive_triton.py), for CUDA tensors.

Distributed convention: each rank computes the loss of its own rows only, against columns gathered with
`gather_with_grad` (whose backward sums every rank's column gradients onto the owner). Per-rank losses are
normalised by the GLOBAL number of valid rows, so Σ over ranks of the per-rank losses is the global loss
and each rank's gradient w.r.t. its local embeddings is the exact global gradient. DeepSpeed (and DDP)
AVERAGE parameter gradients over ranks, so the caller multiplies the loss by the world size before
backward; that holds for the temperature too, whose gradient here is also a per-rank partial sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from model.config_tree import require

IMAGE_LEVELS = ("global", "local", "region")
TEXT_LEVELS = ("caption", "summary", "objects")

# Term groups, each a tuple of (image level, text level) pairs (docs/method.md §2.2).
CLIP_TERMS: dict[str, tuple[tuple[str, str], ...]] = {"clip": (("global", "caption"),)}
PYRAMID_TERMS: dict[str, tuple[tuple[str, str], ...]] = {
    "peer": (("global", "summary"), ("local", "caption")),
    "cross_global": (("global", "objects"), ("region", "summary")),
    "cross_local": (("local", "objects"), ("region", "caption")),
}

# Logit given to masked columns: finite, so a row with no valid column stays NaN-free, and so negative
# that exp(MASKED_LOGIT − lse) is exactly 0 whenever the row has one valid column (|z| ≤ 100 in practice).
MASKED_LOGIT = -1e30

# impl="auto" goes tiled once the logits of one direction would hold this many entries (B_local × N):
# 4096² fp32 logits are 64 MiB, and dense fwd+bwd keeps several such matrices alive (docs/performance.md).
AUTO_TILED_MIN_LOGITS = 4096 * 4096


@dataclass
class LossConfig:
    kind: Literal["clip", "pyramid"] = "clip"  # clip: (global, caption) only | pyramid: the six PyramidCLIP terms
    # dense | tiled (PyTorch tile loop) | triton (CUDA; CPU under TRITON_INTERPRET=1) | auto: by size and device
    impl: Literal["auto", "dense", "tiled", "triton"] = "auto"
    label_smoothing: float = 0.2  # α of the softened negatives (docs/method.md §2.2); 0 gives the original CLIP loss
    lambda_global: float = 1.0 / 3.0  # λ, weight of the cross-level global terms
    mu_local: float = 1.0 / 3.0  # μ, weight of the cross-level local terms; peer terms get 1 − λ − μ
    tile_size: int = 1024  # rows and columns per block of the tiled PyTorch implementation

    def __post_init__(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "in [0, 1)")
        require(self.lambda_global >= 0, "lambda_global", self.lambda_global, "≥ 0")
        require(self.mu_local >= 0, "mu_local", self.mu_local, "≥ 0")
        peer = 1 - self.lambda_global - self.mu_local
        require(peer >= -1e-9, "lambda_global + mu_local", self.lambda_global + self.mu_local,
                f"≤ 1 (the peer terms get 1 − λ − μ = {peer:.3g})")
        require(self.tile_size >= 1, "tile_size", self.tile_size, "≥ 1")

    def term_groups(self) -> dict[str, tuple[tuple[str, str], ...]]:
        return CLIP_TERMS if self.kind == "clip" else PYRAMID_TERMS

    def group_weights(self) -> dict[str, float]:
        if self.kind == "clip":
            return {"clip": 1.0}
        return {
            "peer": 1.0 - self.lambda_global - self.mu_local,
            "cross_global": self.lambda_global,
            "cross_local": self.mu_local,
        }


# --------------------------------------------------------------------------------------------------------
# Gathering across ranks


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank holds a partial gradient for all N rows; the owner of a slice needs their sum.
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order); backward sums the gradients onto the owner.

    Every rank must pass the same shape. Identity when torch.distributed is not initialised or has one rank.
    """
    return _GatherWithGrad.apply(x, group) if _distributed(group) else x


# --------------------------------------------------------------------------------------------------------
# Row-wise log-sum-exp of the scaled, column-masked logits: the only part of the loss that needs B×N logits


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16/fp16 → fp32, fp64 stays fp64


def _masked_logits(scaled_rows: Tensor, cols: Tensor, valid: Tensor) -> Tensor:
    # The scale multiplies the [B, d] side, not the [B, N] product: one less B×N pass.
    return (scaled_rows @ cols.to(scaled_rows.dtype).T).masked_fill_(~valid, MASKED_LOGIT)


def _dense_lse(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor) -> Tensor:
    return torch.logsumexp(_masked_logits(rows.to(_compute_dtype(rows)) * scale, cols, valid), dim=1)


def _torch_lse_forward(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, tile: int) -> Tensor:
    dtype = _compute_dtype(rows)
    lse = rows.new_empty(rows.shape[0], dtype=dtype)
    for r0 in range(0, rows.shape[0], tile):
        x = rows[r0 : r0 + tile].to(dtype) * scale
        run_max = x.new_full((x.shape[0],), -math.inf)
        run_sum = x.new_zeros(x.shape[0])
        for c0 in range(0, cols.shape[0], tile):
            z = _masked_logits(x, cols[c0 : c0 + tile], valid[c0 : c0 + tile])
            new_max = torch.maximum(run_max, z.amax(dim=1))
            run_sum = run_sum * (run_max - new_max).exp() + z.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        lse[r0 : r0 + tile] = run_max + run_sum.log()
    return lse


def _torch_lse_backward(rows, cols, scale, valid, lse, grad_lse, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    # With P = softmax(z) (zero at masked columns: they are constants), g = grad_lse and z = s·X Yᵀ:
    # dX = s·diag(g) P Y, dY = s·Pᵀ diag(g) X, ds = Σ_ij g_i P_ij ⟨x_i, y_j⟩ = Σ_i g_i ⟨(P Y)_i, x_i⟩.
    # g is applied to the [B, d] sides, never to a block of P; ds needs no extra pass over the logits.
    dtype = lse.dtype
    p_y = torch.zeros_like(rows, dtype=dtype)  # P Y
    p_t_gx = torch.zeros_like(cols, dtype=dtype)  # Pᵀ diag(g) X
    grad_lse = grad_lse.to(dtype)
    for r0 in range(0, rows.shape[0], tile):
        x = rows[r0 : r0 + tile].to(dtype)
        x_scaled, g_x, lse_r = x * scale, x * grad_lse[r0 : r0 + tile, None], lse[r0 : r0 + tile, None]
        for c0 in range(0, cols.shape[0], tile):
            y, keep = cols[c0 : c0 + tile].to(dtype), valid[c0 : c0 + tile]
            # Recomputed exactly as in forward; masked_fill_ again for rows with no valid column at all.
            p = _masked_logits(x_scaled, y, keep).sub_(lse_r).exp_().masked_fill_(~keep, 0.0)
            p_y[r0 : r0 + tile] += p @ y
            p_t_gx[c0 : c0 + tile] += p.T @ g_x
    grad_rows = p_y.mul_(grad_lse[:, None])  # diag(g) P Y
    grad_scale = (grad_rows * rows.to(dtype)).sum()
    return grad_rows.mul_(scale).to(rows.dtype), p_t_gx.mul_(scale).to(cols.dtype), grad_scale


class _TiledLSE(torch.autograd.Function):
    """lse_i = log Σ_{valid j} exp(s·⟨x_i, y_j⟩), never holding more than one block of logits."""

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, tile: int, backend: str) -> Tensor:
        if backend == "triton":
            from model.kernels import contrastive_triton

            lse = contrastive_triton.lse_forward(rows, cols, scale, valid, MASKED_LOGIT)
        else:
            lse = _torch_lse_forward(rows, cols, scale, valid, tile)
        ctx.save_for_backward(rows, cols, scale, valid, lse)
        ctx.tile, ctx.backend = tile, backend
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):
        rows, cols, scale, valid, lse = ctx.saved_tensors
        if ctx.backend == "triton":
            from model.kernels import contrastive_triton

            grads = contrastive_triton.lse_backward(rows, cols, scale, valid, lse, grad_lse)
        else:
            grads = _torch_lse_backward(rows, cols, scale, valid, lse, grad_lse, ctx.tile)
        grad_rows, grad_cols, grad_scale = grads
        return grad_rows, grad_cols, grad_scale.reshape(scale.shape).to(scale.dtype), None, None, None


def _resolve_impl(impl: str, rows: Tensor, cols: Tensor) -> str:
    if impl != "auto":
        return impl
    if rows.shape[0] * cols.shape[0] < AUTO_TILED_MIN_LOGITS:
        return "dense"
    return "triton" if rows.is_cuda else "tiled"


def row_logsumexp(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, *, impl: str = "dense",
                  tile_size: int = 1024) -> Tensor:
    """lse_i = log Σ_j exp(scale·⟨rows_i, cols_j⟩) over the columns where `valid` [N] is True (fp32 or fp64)."""
    impl = _resolve_impl(impl, rows, cols)
    if impl == "dense":
        return _dense_lse(rows, cols, scale, valid)
    if impl not in ("tiled", "triton"):
        raise ValueError(f"unknown loss implementation {impl!r}")
    return _TiledLSE.apply(rows, cols, scale, valid, tile_size, "torch" if impl == "tiled" else impl)


# --------------------------------------------------------------------------------------------------------
# InfoNCE with softened negatives


def info_nce(rows: Tensor, cols: Tensor, logit_scale: Tensor, *, valid: Tensor | None = None, row_offset: int = 0,
             alpha: float = 0.0, impl: str = "dense", tile_size: int = 1024) -> Tensor:
    """Sum over this rank's valid rows of the smoothed InfoNCE loss of `rows` [B, d] against `cols` [N, d].

    rows: this rank's L2-normalised embeddings; cols: the gathered global embeddings of the other modality;
    the positive of row i is column row_offset + i. valid: bool [N] over the GLOBAL batch, False for samples
    missing from this pair of levels; row i is valid iff valid[row_offset + i] (a missing sample is excluded
    both as a row and as a column). Returns a SUM: the caller divides by the global number of valid rows.
    Computed in fp32 (fp64 for fp64 inputs) whatever the embeddings' dtype. impl: dense | tiled | triton |
    auto (dense below AUTO_TILED_MIN_LOGITS logits, else triton on CUDA and tiled elsewhere).
    """
    batch, total = rows.shape[0], cols.shape[0]
    if valid is None:
        valid = torch.ones(total, dtype=torch.bool, device=cols.device)
    row_valid = valid[row_offset : row_offset + batch]
    dtype = _compute_dtype(rows)
    x, y = rows.to(dtype), cols.to(dtype)

    num_valid = valid.sum()
    t_neg = alpha / (num_valid - 1).clamp(min=1).to(dtype)  # a tensor: no host sync
    t_pos = 1.0 - t_neg * (num_valid - 1)  # 1 − α, or 1 when the positive is the only valid column
    positive = (x * y[row_offset : row_offset + batch]).sum(dim=1) * logit_scale
    valid_sum = valid.to(dtype) @ y  # Σ of the valid columns: the smoothing term is linear in it
    smoothing = (x @ valid_sum) * logit_scale

    lse = row_logsumexp(rows, cols, logit_scale, valid, impl=impl, tile_size=tile_size)
    per_row = lse - (t_pos - t_neg) * positive - t_neg * smoothing
    return torch.where(row_valid, per_row, 0.0).sum()


# --------------------------------------------------------------------------------------------------------
# CLIP / PyramidCLIP


def compute_loss(cfg: LossConfig, image_embs: dict[str, Tensor], text_embs: dict[str, Tensor],
                 masks: dict[str, Tensor], logit_scale: Tensor, gather: bool = True,
                 group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """The CLIP or PyramidCLIP loss of this rank's share of the global batch, and detached per-term metrics.

    image_embs: `global`, `local`, `region` → [B, d]; text_embs: `caption`, `summary`, `objects` → [B, d],
    all L2-normalised (only the levels the loss kind uses are read). masks: level → bool [B], True where the
    sample has that level; a level without a mask is valid everywhere. logit_scale: the exp'd and clamped
    temperature, shape [1]. gather: all-gather every level and mask across `group` (identity without
    torch.distributed), and score local rows against the global batch.

    Every rank issues the same two collectives whatever its data (ZeRO-3 would hang otherwise): one gather of
    all levels stacked, one of all masks. A term with no valid pair in the global batch drops out, and the
    weights renormalise within its group and across groups. The loss is this rank's part of the global
    loss (see the module docstring): multiply by the world size before a DeepSpeed/DDP backward. The
    `loss...` metrics are this rank's parts too (sum them over ranks to log the global values); `pairs/...`
    (global valid-pair counts) and `logit_scale` are the same on every rank.
    """
    groups, weights = cfg.term_groups(), cfg.group_weights()
    levels = sorted({level for terms in groups.values() for pair in terms for level in pair})
    embs = {**image_embs, **text_embs}
    missing = [level for level in levels if level not in embs]
    if missing:
        raise KeyError(f"loss kind {cfg.kind!r} needs embeddings for levels {missing}")
    batch = embs[levels[0]].shape[0]
    device = embs[levels[0]].device

    local = torch.stack([embs[level] for level in levels], dim=1)  # [B, L, d]
    local_masks = torch.stack(
        [masks[level].to(device=device, dtype=torch.bool) if level in masks
         else torch.ones(batch, dtype=torch.bool, device=device) for level in levels], dim=1)  # [B, L]
    if gather:
        global_embs = gather_with_grad(local, group)
        global_masks = gather_with_grad(local_masks, group)
        row_offset = dist.get_rank(group) * batch if _distributed(group) else 0
    else:
        global_embs, global_masks, row_offset = local, local_masks, 0
    index = {level: k for k, level in enumerate(levels)}

    alpha, impl, tile = cfg.label_smoothing, cfg.impl, cfg.tile_size
    dtype = _compute_dtype(local)
    metrics: dict[str, Tensor] = {}
    weighted_sum = local.new_zeros((), dtype=dtype)
    weight_total = local.new_zeros((), dtype=dtype)
    for group_name, terms in groups.items():
        term_sum = local.new_zeros((), dtype=dtype)
        terms_present = local.new_zeros((), dtype=dtype)
        for image_level, text_level in terms:
            i, t = index[image_level], index[text_level]
            valid = global_masks[:, i] & global_masks[:, t]
            num_valid = valid.sum()
            kw = dict(valid=valid, row_offset=row_offset, alpha=alpha, impl=impl, tile_size=tile)
            image_to_text = info_nce(local[:, i], global_embs[:, t], logit_scale, **kw)
            text_to_image = info_nce(local[:, t], global_embs[:, i], logit_scale, **kw)
            term = (image_to_text + text_to_image) / (2 * num_valid.clamp(min=1))
            present = (num_valid > 0).to(dtype)
            term_sum = term_sum + present * term
            terms_present = terms_present + present
            metrics[f"loss/{image_level}_{text_level}"] = term.detach()
            metrics[f"pairs/{image_level}_{text_level}"] = num_valid.detach()
        group_mean = term_sum / terms_present.clamp(min=1)
        group_weight = weights[group_name] * (terms_present > 0).to(dtype)
        weighted_sum = weighted_sum + group_weight * group_mean
        weight_total = weight_total + group_weight
    # No valid pair anywhere: both sums are 0 and the loss is a zero still attached to the graph.
    loss = weighted_sum / weight_total.clamp(min=1e-12)
    metrics["loss"] = loss.detach()
    metrics["logit_scale"] = logit_scale.detach().reshape(())
    return loss, metrics
