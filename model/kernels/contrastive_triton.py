"""Triton kernels for the tiled contrastive loss: lse_i = log Σ_{valid j} exp(s·⟨x_i, y_j⟩) and its backward.

The same computation as the PyTorch tile loop in model/losses.py (which owns the autograd Function and the
rest of the loss), for CUDA tensors: a forward kernel keeps an online log-sum-exp per row while it walks the
column blocks; backward recomputes each block of logits from the saved lse and accumulates
    A = G Y  (one program per row block)    and    C = Gᵀ X  (one program per column block),
G_ij = grad_lse_i · softmax(z_i)_j. Each output block has a single owner program, so there are no atomics
and the result is deterministic; embedding widths d of 512–1024 do not fit a register accumulator, so the
owner adds into its fp32 output rows in global memory, one d-chunk at a time.

Arithmetic is fp32 inside the kernels: tiles are upcast right after loading (the Triton interpreter gets
bf16 arithmetic wrong, and fp32 is what the loss needs). The dots use IEEE fp32 for fp32 inputs and TF32
for bf16/fp16 inputs, which is exact for them (their mantissas fit in TF32's).

Runs on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported), which the tests use.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter runs each tile operation in numpy: big tiles are much faster there.
_BLOCK = 128 if os.environ.get("TRITON_INTERPRET") == "1" else 64


@triton.jit
def _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y,
            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """⟨x_i, y_j⟩ for a [BLOCK_M, BLOCK_N] block, accumulated over d in BLOCK_D chunks (out of range: 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(X + offs_m[:, None] * stride_x + dd[None, :],
                    mask=(offs_m[:, None] < B) & (dd[None, :] < D), other=0.0).to(tl.float32)
        y = tl.load(Y + offs_n[:, None] * stride_y + dd[None, :],
                    mask=(offs_n[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_fwd_kernel(X, Y, SCALE, VALID, LSE, B, N, D, stride_x, stride_y,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(SCALE).to(tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = tl.load(VALID + offs_n, mask=offs_n < N, other=0) != 0
        z = _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D) * scale
        # Invalid columns get the same finite MASKED logit as the dense path; columns past N do not exist.
        z = tl.where(keep[None, :], z, MASKED)
        z = tl.where((offs_n < N)[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        run_max = new_max
    tl.store(LSE + offs_m, run_max + tl.log(run_sum), mask=offs_m < B)


@triton.jit
def _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """G = grad_lse_i · softmax(z_i)_j for one block, zero at masked or out-of-range rows and columns."""
    scale = tl.load(SCALE).to(tl.float32)
    lse = tl.load(LSE + offs_m, mask=offs_m < B, other=0.0)
    grad = tl.load(GRAD + offs_m, mask=offs_m < B, other=0.0).to(tl.float32)
    keep = tl.load(VALID + offs_n, mask=offs_n < N, other=0) != 0
    z = _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D) * scale
    return tl.where(keep[None, :], tl.exp(z - lse[:, None]), 0.0) * grad[:, None]


@triton.jit
def _lse_bwd_rows_kernel(X, Y, SCALE, VALID, LSE, GRAD, A, B, N, D, stride_x, stride_y, stride_a,
                         PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A[rows of this program] = G Y, A zero-initialised fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y,
                        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            y = tl.load(Y + offs_n[:, None] * stride_y + dd[None, :],
                        mask=(offs_n[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
            out = A + offs_m[:, None] * stride_a + dd[None, :]
            inside = (offs_m[:, None] < B) & (dd[None, :] < D)
            tl.store(out, tl.load(out, mask=inside, other=0.0) + tl.dot(g, y, input_precision=PRECISION), mask=inside)


@triton.jit
def _lse_bwd_cols_kernel(X, Y, SCALE, VALID, LSE, GRAD, C, B, N, D, stride_x, stride_y, stride_c,
                         PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """C[columns of this program] = Gᵀ X, C zero-initialised fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        g = _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y,
                        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            x = tl.load(X + offs_m[:, None] * stride_x + dd[None, :],
                        mask=(offs_m[:, None] < B) & (dd[None, :] < D), other=0.0).to(tl.float32)
            out = C + offs_n[:, None] * stride_c + dd[None, :]
            inside = (offs_n[:, None] < N) & (dd[None, :] < D)
            tl.store(out, tl.load(out, mask=inside, other=0.0) + tl.dot(tl.trans(g), x, input_precision=PRECISION),
                     mask=inside)


def _prepare(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor):
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton contrastive kernels take fp32/bf16/fp16 embeddings, got {rows.dtype}")
    precision = "ieee" if rows.dtype == torch.float32 else "tf32"
    # Rows may be strided (e.g. one level of a stacked [B, levels, d] tensor); elements within a row may not.
    rows, cols = (t if t.stride(1) == 1 else t.contiguous() for t in (rows, cols))
    return rows, cols, scale.reshape(1).float().contiguous(), valid.to(torch.uint8).contiguous(), precision


def lse_forward(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, masked_logit: float) -> Tensor:
    """lse [B] fp32 of the scaled logits rows @ colsᵀ, columns where `valid` is False set to `masked_logit`."""
    rows, cols, scale, valid, precision = _prepare(rows, cols, scale, valid)
    (batch, dim), total = rows.shape, cols.shape[0]
    lse = torch.empty(batch, dtype=torch.float32, device=rows.device)
    _lse_fwd_kernel[(triton.cdiv(batch, _BLOCK),)](
        rows, cols, scale, valid, lse, batch, total, dim, rows.stride(0), cols.stride(0),
        MASKED=masked_logit, PRECISION=precision, BLOCK_M=_BLOCK, BLOCK_N=_BLOCK, BLOCK_D=_BLOCK)
    return lse


def lse_backward(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, lse: Tensor,
                 grad_lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_i grad_lse_i · lse_i w.r.t. rows, cols and the (0-d) scale; masked columns get zero."""
    in_rows, in_cols = rows, cols
    rows, cols, scale, valid, precision = _prepare(rows, cols, scale, valid)
    (batch, dim), total = rows.shape, cols.shape[0]
    g_y = torch.zeros(batch, dim, dtype=torch.float32, device=rows.device)
    g_t_x = torch.zeros(total, dim, dtype=torch.float32, device=rows.device)
    args = (rows, cols, scale, valid, lse.float().contiguous(), grad_lse.float().contiguous())
    blocks = dict(PRECISION=precision, BLOCK_M=_BLOCK, BLOCK_N=_BLOCK, BLOCK_D=_BLOCK)
    _lse_bwd_rows_kernel[(triton.cdiv(batch, _BLOCK),)](
        *args, g_y, batch, total, dim, rows.stride(0), cols.stride(0), g_y.stride(0), **blocks)
    _lse_bwd_cols_kernel[(triton.cdiv(total, _BLOCK),)](
        *args, g_t_x, batch, total, dim, rows.stride(0), cols.stride(0), g_t_x.stride(0), **blocks)
    # ds = Σ_ij G_ij ⟨x_i, y_j⟩ = Σ_i ⟨(G Y)_i, x_i⟩: O(B·d), no extra pass over the logits.
    grad_scale = (g_y * rows.float()).sum()
    return g_y.mul_(scale).to(in_rows.dtype), g_t_x.mul_(scale).to(in_cols.dtype), grad_scale
