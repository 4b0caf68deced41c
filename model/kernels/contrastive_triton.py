"""Triton kernels for the tiled contrastive loss: lse_i = log Σ_{valid j} exp(s·⟨x_i, y_j⟩) and its backward.

The same computation as the PyTorch tile loop in model/losses.py (which owns the autograd Function and the
rest of the loss), for CUDA tensors: a forward kernel keeps an online log-sum-exp per row while it walks the
column blocks; backward recomputes each block of logits from the saved lse and accumulates
    A = G Y  (one program per row block)    and    C = Gᵀ X  (one program per column block),
G_ij = grad_lse_i · softmax(z_i)_j. The forward and A split the columns over a second grid axis (a local
batch of 1,024 rows is only 16 row blocks: without it 16 programs would walk all 64k columns): each split
writes its partial (max, sum) or its partial A to its own slot, merged in torch. Every output element has a
single owner program, so there are no atomics and the result is deterministic; embedding widths d of
512–1024 do not fit a register accumulator, so the owner adds into its fp32 output rows in global memory, one
d-chunk at a time, with a barrier between iterations (the load and the store of a chunk may be done by
different threads).

Accumulation is fp32. The scores ⟨x, y⟩ are dots of the input dtype (bf16 × bf16 products are exact in
fp32); the gradient dots G·Y and Gᵀ·X use IEEE fp32 for fp32 inputs and TF32 for 16-bit ones (their
embeddings are exact in TF32; G is rounded to it). Under TRITON_INTERPRET=1 (set before this module is
imported; the tests use it) 16-bit tiles are upcast after loading, as the interpreter's bf16 arithmetic is
wrong. The interpreter runs the tiles a GPU runs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from model.kernels.launch_spec import KernelSpec

_TARGET_PROGRAMS = 256  # column splits fill about two waves of an H100's 132 SMs ...
_MAX_SPLITS = 16  # ... but each holds a [B, d] fp32 partial of A


@triton.jit
def _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """⟨x_i, y_j⟩ for a [BLOCK_M, BLOCK_N] block, accumulated over d in BLOCK_D chunks (out of range: 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(X + offs_m[:, None] * stride_x + dd[None, :], mask=(offs_m[:, None] < B) & (dd[None, :] < D),
                    other=0.0)
        y = tl.load(Y + offs_n[:, None] * stride_y + dd[None, :], mask=(offs_n[:, None] < N) & (dd[None, :] < D),
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_fwd_kernel(X, Y, SCALE, VALID, MAX, SUM, B, N, D, stride_x, stride_y, split_cols,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial (max, Σ exp(z - max)) of rows over one split of the columns, into MAX/SUM[split, row]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    scale = tl.load(SCALE).to(tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(split * split_cols, tl.minimum(N, (split + 1) * split_cols), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = tl.load(VALID + offs_n, mask=offs_n < N, other=0) != 0
        z = _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y, UPCAST, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D) * scale
        # Invalid columns get the same finite MASKED logit as the dense path; columns past N do not exist.
        z = tl.where(keep[None, :], z, MASKED)
        z = tl.where((offs_n < N)[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        run_max = new_max
    tl.store(MAX + split * B + offs_m, run_max, mask=offs_m < B)
    tl.store(SUM + split * B + offs_m, run_sum, mask=offs_m < B)


@triton.jit
def _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """G = grad_lse_i · softmax(z_i)_j for one block, zero at masked or out-of-range rows and columns."""
    scale = tl.load(SCALE).to(tl.float32)
    lse = tl.load(LSE + offs_m, mask=offs_m < B, other=0.0)
    grad = tl.load(GRAD + offs_m, mask=offs_m < B, other=0.0).to(tl.float32)
    keep = tl.load(VALID + offs_n, mask=offs_n < N, other=0) != 0
    z = _scores(X, Y, offs_m, offs_n, B, N, D, stride_x, stride_y, UPCAST, PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_D) * scale
    return tl.where(keep[None, :], tl.exp(z - lse[:, None]), 0.0) * grad[:, None]


@triton.jit
def _lse_bwd_rows_kernel(X, Y, SCALE, VALID, LSE, GRAD, A, B, N, D, stride_x, stride_y, stride_a, split_cols,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A[split, rows of this program] = G Y over this split's columns, A zero-initialised fp32 [splits, B, d]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    A += split.to(tl.int64) * B * stride_a
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(split * split_cols, tl.minimum(N, (split + 1) * split_cols), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y,
                        UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            y = tl.load(Y + offs_n[:, None] * stride_y + dd[None, :],
                        mask=(offs_n[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
            out = A + offs_m[:, None] * stride_a + dd[None, :]
            inside = (offs_m[:, None] < B) & (dd[None, :] < D)
            tl.store(out, tl.load(out, mask=inside, other=0.0) + tl.dot(g, y, input_precision=PRECISION), mask=inside)
            tl.debug_barrier()


@triton.jit
def _lse_bwd_cols_kernel(X, Y, SCALE, VALID, LSE, GRAD, C, B, N, D, stride_x, stride_y, stride_c,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """C[columns of this program] = Gᵀ X, C zero-initialised fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        g = _grad_block(X, Y, SCALE, VALID, LSE, GRAD, offs_m, offs_n, B, N, D, stride_x, stride_y,
                        UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            x = tl.load(X + offs_m[:, None] * stride_x + dd[None, :],
                        mask=(offs_m[:, None] < B) & (dd[None, :] < D), other=0.0).to(tl.float32)
            out = C + offs_n[:, None] * stride_c + dd[None, :]
            inside = (offs_n[:, None] < N) & (dd[None, :] < D)
            tl.store(out, tl.load(out, mask=inside, other=0.0) + tl.dot(tl.trans(g), x, input_precision=PRECISION),
                     mask=inside)
            tl.debug_barrier()


def _tiles(dtype: torch.dtype) -> tuple[int, int, int]:
    """(block: rows, columns and channels per tile; warps; pipeline stages), on a GPU and in the interpreter alike.

    Checked for sm_80 / sm_90 by tests/unit/test_kernels_aot.py. fp32 runs IEEE dots on CUDA cores with operands
    in registers: 64-wide tiles spilled 1-15 KB per thread, 32-wide ones at most 220 B. 16-bit: tensor-core dots,
    8 warps (4 spilled up to 0.9 KB).
    """
    return (32, 4, 2) if dtype == torch.float32 else (64, 8, 2)


def _constants(dtype: torch.dtype, masked_logit: float | None = None) -> dict:
    """Compile-time parameters, the same on a GPU and under the interpreter but for UPCAST."""
    block = _tiles(dtype)[0]
    constants = dict(UPCAST=dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
                     PRECISION="ieee" if dtype == torch.float32 else "tf32",
                     BLOCK_M=block, BLOCK_N=block, BLOCK_D=block)
    return constants if masked_logit is None else {"MASKED": masked_logit, **constants}


def _launch(dtype: torch.dtype) -> dict:
    _, warps, stages = _tiles(dtype)
    return dict(num_warps=warps, num_stages=stages)


def _column_splits(rows: int, columns: int, block: int) -> tuple[int, int]:
    """(splits, columns per split, a multiple of the block) for the grids that walk the columns."""
    col_blocks = max(1, triton.cdiv(columns, block))
    wanted = min(_MAX_SPLITS, col_blocks, max(1, triton.cdiv(_TARGET_PROGRAMS, triton.cdiv(rows, block))))
    per_split = triton.cdiv(col_blocks, wanted)
    return triton.cdiv(col_blocks, per_split), per_split * block


def _prepare(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor):
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton contrastive kernels take fp32/bf16/fp16 embeddings, got {rows.dtype}")
    if cols.dtype != rows.dtype:
        raise TypeError(f"the Triton contrastive kernels take rows and columns of one dtype, got {rows.dtype} "
                        f"and {cols.dtype}")
    # Rows may be strided (e.g. one level of a stacked [B, levels, d] tensor); elements within a row may not.
    rows, cols = (t if t.stride(1) == 1 else t.contiguous() for t in (rows, cols))
    return rows, cols, scale.reshape(1).float().contiguous(), valid.to(torch.uint8).contiguous()


def lse_forward(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, masked_logit: float) -> Tensor:
    """lse [B] fp32 of the scaled logits rows @ colsᵀ, columns where `valid` is False set to `masked_logit`."""
    rows, cols, scale, valid = _prepare(rows, cols, scale, valid)
    (batch, dim), total = rows.shape, cols.shape[0]
    block = _tiles(rows.dtype)[0]
    splits, split_cols = _column_splits(batch, total, block)
    run_max = torch.empty(splits, batch, dtype=torch.float32, device=rows.device)
    run_sum = torch.empty_like(run_max)
    _lse_fwd_kernel[(triton.cdiv(batch, block), splits)](
        rows, cols, scale, valid, run_max, run_sum, batch, total, dim, rows.stride(0), cols.stride(0), split_cols,
        **_constants(rows.dtype, masked_logit), **_launch(rows.dtype))
    top = run_max.max(0).values  # finite: every split has at least one column, masked ones at a finite logit
    return top + (run_sum * (run_max - top).exp()).sum(0).log()


def lse_backward(rows: Tensor, cols: Tensor, scale: Tensor, valid: Tensor, lse: Tensor,
                 grad_lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_i grad_lse_i · lse_i w.r.t. rows, cols and the (0-d) scale; masked columns get zero."""
    in_rows, in_cols = rows, cols
    rows, cols, scale, valid = _prepare(rows, cols, scale, valid)
    (batch, dim), total = rows.shape, cols.shape[0]
    block = _tiles(rows.dtype)[0]
    splits, split_cols = _column_splits(batch, total, block)
    g_y = torch.zeros(splits, batch, dim, dtype=torch.float32, device=rows.device)
    g_t_x = torch.zeros(total, dim, dtype=torch.float32, device=rows.device)
    args = (rows, cols, scale, valid, lse.float().contiguous(), grad_lse.float().contiguous())
    launch = dict(**_constants(rows.dtype), **_launch(rows.dtype))
    _lse_bwd_rows_kernel[(triton.cdiv(batch, block), splits)](
        *args, g_y, batch, total, dim, rows.stride(0), cols.stride(0), g_y.stride(1), split_cols, **launch)
    _lse_bwd_cols_kernel[(triton.cdiv(total, block),)](
        *args, g_t_x, batch, total, dim, rows.stride(0), cols.stride(0), g_t_x.stride(0), **launch)
    g_y = g_y.sum(0) if splits > 1 else g_y[0]
    # ds = Σ_ij G_ij ⟨x_i, y_j⟩ = Σ_i ⟨(G Y)_i, x_i⟩: O(B·d), no extra pass over the logits.
    grad_scale = (g_y * rows.float()).sum()
    return g_y.mul_(scale).to(in_rows.dtype), g_t_x.mul_(scale).to(in_cols.dtype), grad_scale


def compile_specs(masked_logit: float, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Everything the launchers above can pick, for model/kernels/aot.py (MASKED: the loss's one constant)."""
    for dtype in dtypes:
        for fn in (_lse_fwd_kernel, _lse_bwd_rows_kernel, _lse_bwd_cols_kernel):
            constants = _constants(dtype, masked_logit if fn is _lse_fwd_kernel else None)
            constants["UPCAST"] = dtype == torch.float32
            pointers = {"X": dtype, "Y": dtype, "SCALE": torch.float32, "VALID": torch.uint8, "MAX": torch.float32,
                        "SUM": torch.float32, "LSE": torch.float32, "GRAD": torch.float32, "A": torch.float32,
                        "C": torch.float32}
            yield KernelSpec(f"{fn.__name__} {str(dtype)[6:]}", fn, constants,
                             {k: v for k, v in pointers.items() if k in fn.arg_names}, (), *_tiles(dtype)[1:])
