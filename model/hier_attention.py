"""Hierarchy-aware attention: (C ⊙ softmax(QKᵀ/√d)) V (`multiply`, the paper) or softmax(QKᵀ/√d + log C) V (`bias`).

Three implementations of one function, chosen by `HierConfig.attn_impl`:
- reference: materialises C from products of links and the per-head probabilities; the ground truth.
- sdpa: log C from the O(N) tables as a per-sample additive float mask of torch SDPA (fused on CPU, and
  differentiable in the mask). For `multiply` the keys are doubled: the biased copy is scaled by ε and the plain
  copy has zero values, so one softmax over 2N keys yields ε·Σ_j e^{S+B}v / (Σ_j e^{S} + ε·Σ_j e^{S+B}), which is
  ε times the paper's output up to a relative ε (ε = 2⁻²⁴, below fp32 rounding); gradients follow exactly.
- triton: a FlashAttention-style kernel that computes log C on the fly from the tables (model/kernels).
`auto` takes triton on CUDA and sdpa elsewhere, and logs its pick once.

Masking: keys beyond a sample's length are masked; a padded query attends only to itself; text is causal.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from model.hier_prior import ConstituentPrior

log = logging.getLogger("hiclip.model")

IMPLS = ("auto", "reference", "sdpa", "triton")
MODES = ("multiply", "bias")
_LOG_EPS = -24 * math.log(2.0)  # ε = 2⁻²⁴: dividing by it is exact in floating point


def allowed_pairs(n: int, lengths: Tensor | None, causal: bool, device) -> Tensor | None:
    """Boolean [B|1, 1, N, N], True where query i may attend key j; None when everything is allowed."""
    idx = torch.arange(n, device=device)
    allowed = None
    if causal:
        allowed = (idx[None, :] <= idx[:, None])[None, None]
    if lengths is not None:
        real = idx[None, :] < lengths[:, None]  # [B, N]
        keep = (real[:, :, None] & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=device)
        keep = keep[:, None]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def reference_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                        dropout_p: float = 0.0) -> Tensor:
    """Readable ground truth: materialise C [B, N, N] and the per-head probabilities [B, H, N, N]."""
    c = prior.prior_reference().to(q.dtype)[:, None]  # shared by all heads
    allowed = allowed_pairs(q.shape[-2], prior.lengths, causal, q.device)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if prior.mode == "bias":
        # C is 0 only towards padding, which is masked below; log(1) there keeps the gradient finite.
        scores = scores + (c if allowed is None else torch.where(allowed, c, 1.0)).log()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = scores.softmax(dim=-1)
    if prior.mode == "multiply":
        p = c * p  # not renormalised: rows sum to at most 1
    p = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return p @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                   dropout_p: float = 0.0) -> Tensor:
    """log C as SDPA's additive float mask [B, 1, N, N] (broadcast over heads); see the module docstring."""
    n = q.shape[-2]
    allowed = allowed_pairs(n, prior.lengths, causal, q.device)
    log_c = prior.log_prior()[:, None]
    if allowed is not None:
        log_c = log_c.masked_fill(~allowed, float("-inf"))
    if prior.mode == "bias":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=log_c.to(q.dtype), dropout_p=dropout_p)
    plain = torch.zeros_like(log_c) if allowed is None else log_c.new_zeros(()).masked_fill(~allowed, float("-inf"))
    mask = torch.cat([log_c + _LOG_EPS, plain.expand_as(log_c)], dim=-1).to(q.dtype)
    out = F.scaled_dot_product_attention(q, torch.cat([k, k], dim=-2), torch.cat([v, torch.zeros_like(v)], dim=-2),
                                         attn_mask=mask, dropout_p=dropout_p)
    return out * math.exp(-_LOG_EPS)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _log_pick(impl: str, reason: str) -> None:
    log.info("hier attention: attn_impl=auto picked %s (%s)", impl, reason)


def resolve_impl(impl: str, q: Tensor, dropout_p: float) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if q.is_cuda and _triton_available() and dropout_p == 0.0:
        _log_pick("triton", "CUDA tensors, triton importable")
        return "triton"
    _log_pick("sdpa", "no CUDA/triton for these inputs" if dropout_p == 0.0 else "attention dropout is on")
    return "sdpa"


def hier_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                   dropout_p: float = 0.0) -> Tensor:
    """HiCLIP attention over [B, H, N, D] tensors with the layer's prior; dispatches on prior.impl."""
    if prior.mode not in MODES:
        raise ValueError(f"prior_mode must be one of {MODES}, got {prior.mode!r}")
    impl = resolve_impl(prior.impl, q, dropout_p)
    if impl == "reference":
        return reference_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if dropout_p > 0:
        raise NotImplementedError("attn_impl=triton has no attention dropout; use sdpa or auto")
    from model.kernels.hier_attention_triton import triton_attention

    return triton_attention(q, k, v, prior, causal=causal)
