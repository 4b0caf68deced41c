"""Fused hierarchy-aware attention in Triton: FlashAttention-style forward and backward, log C computed on the fly.

The constituent prior enters as its O(N) tables (docs/method.md §1): the cumulative break costs β of a token sequence
(`TREE`), or the per-row and per-column cumulative costs R, Cc of a patch grid (`GROUP`, token 0 = CLS when
HAS_CLS). Each tile rebuilds its log C from those tables, so no N×N prior or probability ever reaches memory.

Modes, with S = QKᵀ/√d and B = log C:
- bias:     O = softmax(S + B) V                     (normaliser over e^{S+B})
- multiply: O = (C ⊙ softmax(S)) V = Σ_j e^{S+B} v_j / Σ_j e^{S}
  One pass keeps the unbiased normaliser l = Σ e^{S-m} beside the biased numerator Σ e^{S+B-m} v: B ≤ 0, so the
  running max of S bounds both. The saved row statistic is lse = m + log l of the normalising logits.
Backward (W = the weights applied to V, P = the normalising softmax, D_i = dO_i·O_i):
  dV = Wᵀ dO,  dS = W ⊙ (dO Vᵀ) − P ⊙ D,  dB = W ⊙ (dO Vᵀ) (multiply) or dS (bias).
dB is summed over heads into one fp32 [B, N, N] buffer and taken back to the tables by autograd through the
tables→log C function of model.hier_prior; everything else stays tiled. Accumulation is fp32; inputs are upcast
to fp32 after loading when UPCAST (always under TRITON_INTERPRET=1, whose bf16 arithmetic is wrong).
"""
from __future__ import annotations

import itertools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.constituent_prior import ConstituentPrior, group_log_prior, tree_log_prior
from model.kernels.launch_spec import KernelSpec


@triton.jit
def _log_prior_tile(offs_m, offs_n, t_ptr, r_ptr, c_ptr, KIND: tl.constexpr, HAS_CLS: tl.constexpr,
                    GRID_H: tl.constexpr, GRID_W: tl.constexpr):
    """log C for queries offs_m × keys offs_n of one sample, from its tables (see model.hier_prior)."""
    if KIND == 0:  # tree: -(β_j - β_i)·sign(j - i)
        beta_q = tl.load(t_ptr + offs_m, mask=offs_m < GRID_W, other=0.0)
        beta_k = tl.load(t_ptr + offs_n, mask=offs_n < GRID_W, other=0.0)
        sign = tl.where(offs_n[None, :] > offs_m[:, None], 1.0, tl.where(offs_n[None, :] < offs_m[:, None], -1.0, 0.0))
        return -(beta_k[None, :] - beta_q[:, None]) * sign
    else:  # group: minus the cheaper one-turn path
        patch_m = tl.minimum(tl.maximum(offs_m - HAS_CLS, 0), GRID_H * GRID_W - 1)
        patch_n = tl.minimum(tl.maximum(offs_n - HAS_CLS, 0), GRID_H * GRID_W - 1)
        rq = (patch_m // GRID_W)[:, None]
        cq = (patch_m % GRID_W)[:, None]
        rk = (patch_n // GRID_W)[None, :]
        ck = (patch_n % GRID_W)[None, :]
        col_sign = tl.where(ck > cq, 1.0, tl.where(ck < cq, -1.0, 0.0))
        row_sign = tl.where(rk > rq, 1.0, tl.where(rk < rq, -1.0, 0.0))
        path_1 = (tl.load(r_ptr + rq * GRID_W + ck) - tl.load(r_ptr + rq * GRID_W + cq)) * col_sign \
            + (tl.load(c_ptr + rk * GRID_W + ck) - tl.load(c_ptr + rq * GRID_W + ck)) * row_sign
        path_2 = (tl.load(c_ptr + rk * GRID_W + cq) - tl.load(c_ptr + rq * GRID_W + cq)) * row_sign \
            + (tl.load(r_ptr + rk * GRID_W + ck) - tl.load(r_ptr + rk * GRID_W + cq)) * col_sign
        log_c = -tl.minimum(path_1, path_2)
        if HAS_CLS:
            log_c = tl.where((offs_m[:, None] == 0) | (offs_n[None, :] == 0), 0.0, log_c)
        return log_c


@triton.jit
def _prior_tile(offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, HAS_CLS: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr):
    """(log C, allowed) for one tile; log C is 0 wherever the pair is not allowed.

    Outside the sequence the tables load as 0, so log C there is +β_i, not ≤ 0: past β = 88.7, e^{log C} is inf,
    and 0·inf would be NaN in C ⊙ P although P is 0 there.
    """
    allowed = (offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx)
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
    if HAS_LENGTHS:  # a padded query attends only to itself
        real = (offs_m[:, None] < length) & (offs_n[None, :] < length)
        allowed = allowed & (real | (offs_m[:, None] == offs_n[None, :]))
    log_c = _log_prior_tile(offs_m, offs_n, t_ptr, r_ptr, c_ptr, KIND, HAS_CLS, GRID_H, GRID_W)
    return tl.where(allowed, log_c, 0.0), allowed


@triton.jit
def _key_range(start_m, n_ctx, length, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Keys [lo, hi) that queries start_m.. may attend: up to the diagonal if causal; a padded query (i ≥ length)
    attends only to itself, so a block of padded queries needs only its diagonal tile, and real ones stop at the
    length: the padded suffix of a text costs one tile per query block, not a full row."""
    lo = 0
    hi = tl.minimum(n_ctx, start_m + BLOCK_M) if CAUSAL else n_ctx
    if HAS_LENGTHS:
        hi = tl.minimum(hi, tl.maximum(length, start_m + BLOCK_M))
        lo = tl.where(start_m >= length, start_m, 0)
    return lo, hi


@triton.jit
def _query_range(start_n, n_ctx, length, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Queries [lo, hi) that may attend keys start_n.. (the mirror of _key_range; blocks are square)."""
    lo = start_n if CAUSAL else 0
    hi = n_ctx
    if HAS_LENGTHS:
        hi = tl.minimum(n_ctx, tl.maximum(length, start_n + BLOCK_N))
        lo = tl.where(start_n >= length, start_n, lo)
    return lo, hi


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, t_ptr, r_ptr, c_ptr, len_ptr,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                n_heads, n_ctx, head_dim, scale, table_stride,
                KIND: tl.constexpr, MULTIPLY: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                HAS_CLS: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)  # b · stride_b passes 2³¹ at large batch
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                mask=(offs_m[:, None] < n_ctx) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    t_ptr += b * table_stride
    r_ptr += b * table_stride
    c_ptr += b * table_stride
    length = n_ctx
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b)

    # A finite initial max: a tile whose keys are all masked gives exp(-inf - m) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, n_ctx, length, BLOCK_M, CAUSAL, HAS_LENGTHS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_ctx) & d_ok
        k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        log_c, allowed = _prior_tile(offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length,
                                     KIND, CAUSAL, HAS_LENGTHS, HAS_CLS, GRID_H, GRID_W)
        logits = s if MULTIPLY else s + log_c  # the logits that normalise
        logits = tl.where(allowed, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        w = p * tl.exp(log_c) if MULTIPLY else p  # C ⊙ P: B ≤ 0, so m_new bounds the numerator too
        acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    row_ok = offs_m < n_ctx
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past the end have no keys; keep them finite
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(lse_ptr + bh * n_ctx + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length, scale,
              KIND: tl.constexpr, MULTIPLY: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
              HAS_CLS: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one [BLOCK_M, BLOCK_N] tile: W (weights on V), dS (score gradient) and dB (log C gradient)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    log_c, allowed = _prior_tile(offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length,
                                 KIND, CAUSAL, HAS_LENGTHS, HAS_CLS, GRID_H, GRID_W)
    logits = s if MULTIPLY else s + log_c
    p = tl.where(allowed, tl.exp(logits - lse[:, None]), 0.0)
    w = p * tl.exp(log_c) if MULTIPLY else p
    dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dO_i·v_j
    ds = w * dw - p * delta[:, None]
    db = w * dw if MULTIPLY else ds
    return w, ds, db


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, db_ptr,
                   t_ptr, r_ptr, c_ptr, len_ptr,
                   sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, sg_b, sg_h, sg_n,
                   n_heads, n_ctx, head_dim, scale, table_stride,
                   KIND: tl.constexpr, MULTIPLY: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                   HAS_CLS: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of keys: dK, dV over all queries, and this head's share of dB (atomically summed over heads)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    kv_mask = (offs_n[:, None] < n_ctx) & d_ok
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    t_ptr += b * table_stride
    r_ptr += b * table_stride
    c_ptr += b * table_stride
    length = n_ctx
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(start_n, n_ctx, length, BLOCK_N, CAUSAL, HAS_LENGTHS)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < n_ctx) & d_ok
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_n + offs_d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * n_ctx + offs_m, mask=offs_m < n_ctx, other=0.0)
        delta = tl.load(delta_ptr + bh * n_ctx + offs_m, mask=offs_m < n_ctx, other=0.0)
        w, ds, db = _bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length, scale,
                              KIND, MULTIPLY, CAUSAL, HAS_LENGTHS, HAS_CLS, GRID_H, GRID_W, PRECISION)
        dv += tl.dot(tl.trans(w).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        tile_ok = (offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx)
        tl.atomic_add(db_ptr + b * n_ctx * n_ctx + offs_m[:, None] * n_ctx + offs_n[None, :], db, mask=tile_ok)

    # The gradients have their own (contiguous) layout: q, k, v are often strided views of one packed qkv.
    g_offs = b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_d[None, :]
    tl.store(dk_ptr + g_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + g_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, t_ptr, r_ptr, c_ptr, len_ptr,
                  sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n, sg_b, sg_h, sg_n,
                  n_heads, n_ctx, head_dim, scale, table_stride,
                  KIND: tl.constexpr, MULTIPLY: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                  HAS_CLS: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of queries: dQ over all keys."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    q_mask = (offs_m[:, None] < n_ctx) & d_ok
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_n + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * n_ctx + offs_m, mask=offs_m < n_ctx, other=0.0)
    delta = tl.load(delta_ptr + bh * n_ctx + offs_m, mask=offs_m < n_ctx, other=0.0)
    t_ptr += b * table_stride
    r_ptr += b * table_stride
    c_ptr += b * table_stride
    length = n_ctx
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, n_ctx, length, BLOCK_M, CAUSAL, HAS_LENGTHS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_ctx) & d_ok
        k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        _, ds, _ = _bwd_tile(q, k, v, do, lse, delta, offs_m, offs_n, t_ptr, r_ptr, c_ptr, n_ctx, length, scale,
                             KIND, MULTIPLY, CAUSAL, HAS_LENGTHS, HAS_CLS, GRID_H, GRID_W, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch and autograd.


class TileConfig(NamedTuple):
    """Tile shape and launch options; the same on a GPU and under the interpreter (only UPCAST differs)."""

    block: int  # queries and keys per tile (square: the padded-suffix skip relies on it)
    num_warps: int
    num_stages: int


def tile_config(dtype: torch.dtype, head_dim: int) -> TileConfig:
    """The one table of launch options, compiled for sm_80 and sm_90 by tests/unit/test_kernels_aot.py.

    One software-pipelining stage: with more, the pipeliner keeps the group prior's four table gathers in shared
    memory once per stage, past an A100's 163 KiB (bf16, d = 64, backward) and an H100's 227 KiB (fp32). Eight
    warps: with four, the gathers and index tiles spill 0.7–3 KB per thread. fp32 runs IEEE dots on CUDA cores
    (TF32 would miss a 1e-4 tolerance), whose operands live in registers: 32-wide tiles keep them from spilling.
    """
    if dtype == torch.float32:
        return TileConfig(block=32, num_warps=8, num_stages=1)
    return TileConfig(block=64, num_warps=8, num_stages=1)


def kernel_constants(dtype: torch.dtype, head_dim: int, kind: str, mode: str, causal: bool, has_lengths: bool,
                     has_cls: bool, grid_hw: tuple[int, int], interpreting: bool) -> dict:
    """Compile-time parameters. A tree's 'grid' is one row of N tokens (GRID_W = N bounds the β table)."""
    tile = tile_config(dtype, head_dim)
    return dict(KIND=0 if kind == "tree" else 1, MULTIPLY=mode == "multiply", CAUSAL=causal,
                HAS_LENGTHS=has_lengths, HAS_CLS=has_cls, GRID_H=grid_hw[0], GRID_W=grid_hw[1],
                # The interpreter's bf16 arithmetic is wrong: it computes in fp32 after loading.
                UPCAST=interpreting or dtype == torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32",  # tf32 is moot for 16-bit operands
                BLOCK_M=tile.block, BLOCK_N=tile.block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _strides(x: Tensor) -> tuple[int, int, int]:
    assert x.stride(-1) == 1, "the head dimension must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)


def _kernel_tables(kind: str, table_1: Tensor, table_2: Tensor | None, n: int):
    """The kernels' (t, r, c) table arguments in fp32 — (β, -, -) or (-, R, Cc) — and the grid shape."""
    if kind == "tree":
        beta = table_1.float().contiguous()
        return (beta, beta, beta), (1, n)
    row_cost, col_cost = table_1.float().contiguous(), table_2.float().contiguous()
    return (row_cost, row_cost, col_cost), tuple(row_cost.shape[1:])


def _lengths_arg(lengths: Tensor | None, q: Tensor) -> Tensor:
    return lengths.to(torch.int32).contiguous() if lengths is not None else q.new_zeros(1, dtype=torch.int32)


class _HierAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table_1, table_2, lengths, kind, has_cls, causal, mode):
        b, h, n, d = q.shape
        tables, grid_hw = _kernel_tables(kind, table_1, table_2, n)
        meta = kernel_constants(q.dtype, d, kind, mode, causal, lengths is not None, has_cls, grid_hw,
                                _interpreting())
        tile = tile_config(q.dtype, d)
        launch = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
        lens = _lengths_arg(lengths, q)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(n, tile.block), b * h)
        _fwd_kernel[grid](q, k, v, o, lse, *tables, lens, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                          h, n, d, 1.0 / math.sqrt(d), tables[0][0].numel(), **meta, **launch)
        ctx.save_for_backward(q, k, v, o, lse, table_1, table_2, lengths)
        ctx.meta, ctx.launch, ctx.kind, ctx.has_cls = meta, launch, kind, has_cls
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, table_1, table_2, lengths = ctx.saved_tensors
        meta, launch = ctx.meta, ctx.launch
        b, h, n, d = q.shape
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()  # D_i = dO_i·O_i
        tables, _ = _kernel_tables(ctx.kind, table_1, table_2, n)
        lens = _lengths_arg(lengths, q)
        # Not empty_like: for a strided view (q, k, v of a packed qkv) it returns tighter strides than the view's.
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        d_log_c = torch.zeros(b, n, n, device=q.device, dtype=torch.float32)  # summed over heads
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), h, n, d,
                  1.0 / math.sqrt(d), tables[0][0].numel())
        grid = (triton.cdiv(n, meta["BLOCK_M"]), b * h)
        _bwd_kv_kernel[grid](q, k, v, do, lse, delta, dk, dv, d_log_c, *tables, lens, *common, **meta, **launch)
        _bwd_q_kernel[grid](q, k, v, do, lse, delta, dq, *tables, lens, *common, **meta, **launch)
        d_table_1 = d_table_2 = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # Tables -> log C is cheap and per sample: let autograd carry dB back to the tables.
            with torch.enable_grad():
                t1 = table_1.detach().requires_grad_()
                t2 = table_2.detach().requires_grad_() if table_2 is not None else None
                log_c = tree_log_prior(t1) if ctx.kind == "tree" else group_log_prior(t1, t2, ctx.has_cls)
                inputs = (t1,) if t2 is None else (t1, t2)
                grads = torch.autograd.grad(log_c, inputs, d_log_c.to(log_c.dtype))
            d_table_1 = grads[0]
            d_table_2 = grads[1] if t2 is not None else None
        return dq, dk, dv, d_table_1, d_table_2, None, None, None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool) -> Tensor:
    """Fused hierarchy-aware attention over [B, H, N, D] (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if prior.kind == "tree":
        return _HierAttention.apply(q, k, v, prior.beta, None, prior.lengths, "tree", False, causal, prior.mode)
    return _HierAttention.apply(q, k, v, prior.row_cost, prior.col_cost, None, "group", prior.has_cls, causal,
                                prior.mode)


# What the launcher can pick: tree (text, padded; causal or not) and group (vision, with CLS) priors, both modes,
# fp32 and 16-bit inputs, the head dims of the presets. Compiled for sm_80 and sm_90 on the CPU by
# model/kernels/aot.py. Unpadded text and a grid without CLS drop loads from these; the grid shape is a
# constexpr too, and ViT-B/16's 14×14 stands for all (it sizes no tile).
AOT_VARIANTS = {"tree": [(True, True, False), (False, True, False)],  # (causal, has_lengths, has_cls)
                "group": [(False, False, True)]}


def compile_specs(dtypes=(torch.float32, torch.bfloat16, torch.float16), head_dims=(64, 128), kinds=("tree", "group"),
                  modes=("multiply", "bias")):
    for dtype, head_dim, kind, mode in itertools.product(dtypes, head_dims, kinds, modes):
        for causal, has_lengths, has_cls in AOT_VARIANTS[kind]:
            grid_hw = (1, 77) if kind == "tree" else (14, 14)
            constexprs = kernel_constants(dtype, head_dim, kind, mode, causal, has_lengths, has_cls, grid_hw, False)
            tile = tile_config(dtype, head_dim)
            flags = "".join(name for name, on in (("causal", causal), ("padded", has_lengths), ("cls", has_cls)) if on)
            for fn in (_fwd_kernel, _bwd_kv_kernel, _bwd_q_kernel):
                pointers = {name: dtype for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr",
                                                     "dv_ptr")}
                pointers |= {name: torch.float32 for name in ("lse_ptr", "delta_ptr", "db_ptr", "t_ptr", "r_ptr",
                                                              "c_ptr")}
                pointers["len_ptr"] = torch.int32
                label = f"{fn.__name__} {kind} {mode} {str(dtype)[6:]} d{head_dim} {flags or '-'}"
                yield KernelSpec(label, fn, constexprs, {k: v for k, v in pointers.items() if k in fn.arg_names},
                                 ("scale",), tile.num_warps, tile.num_stages)
