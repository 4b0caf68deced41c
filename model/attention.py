"""Vanilla multi-head attention dispatch: flash-attn when it can run, torch SDPA otherwise.

flash-attn is an optional GPU extra; every call falls back to SDPA, which computes the same function.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_mask(key_padding_mask: Tensor | None, causal: bool, n: int, device) -> Tensor | None:
    """Boolean mask [B|1, 1, N, N], True where a query may attend, or None when nothing is masked."""
    mask = None
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:  # True marks padding
        keep = ~key_padding_mask[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
              causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention over [B, H, N, D] tensors; key_padding_mask is [B, N] with True at padding."""
    if key_padding_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        from flash_attn import flash_attn_func  # [B, N, H, D] layout

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal)
        return out.transpose(1, 2)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    mask = build_mask(key_padding_mask, causal, q.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
