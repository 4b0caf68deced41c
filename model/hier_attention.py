"""Hierarchy-aware attention: (C ⊙ softmax(QKᵀ/√d)) V (`multiply`, the paper), or softmax(QKᵀ/√d + log C) V
(`bias`, renormalised).

Three implementations of one function, chosen by `HierConfig.attn_impl`:
- reference: materialises C from products of links and the per-head probabilities; the ground truth.
- sdpa: the efficient torch path, C built per sample from the O(N) tables (never per head). `bias`: log C is
  the additive float mask of torch SDPA (fused on CPU, and differentiable in the mask). `multiply`: an autograd
  Function with a hand-written backward that keeps one per-head N×N tensor, the probabilities P (autograd over
  the reference keeps P and C ⊙ P), and recomputes C ⊙ P from P and the per-sample C.
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

from model.constituent_prior import ConstituentPrior

log = logging.getLogger("hiclip.model")

IMPLS = ("auto", "reference", "sdpa", "triton")
MODES = ("multiply", "bias")


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
        # C is 0 towards padding, which is masked below (log 1 there), and across a link that underflowed to 0:
        # log of the smallest normal instead of -inf keeps the gradient finite (0 through the clamp).
        c = c if allowed is None else torch.where(allowed, c, 1.0)
        scores = scores + c.clamp_min(torch.finfo(c.dtype).tiny).log()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = scores.softmax(dim=-1)
    if prior.mode == "multiply":
        p = c * p  # not renormalised: rows sum to at most 1
    p = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return p @ v


class _MultiplyAttention(torch.autograd.Function):
    """(C ⊙ softmax(S)) V with S = QKᵀ/√d masked, C = e^{log C} [B, 1, N, N] (0 where masked).

    Backward, with W = C ⊙ P and D_i = dO_i·O_i: dV = Wᵀ dO, dB = Σ_heads W ⊙ (dO Vᵀ) (the gradient of log C),
    dS = W ⊙ (dO Vᵀ) − P ⊙ D. Softmax and the gradient algebra run in fp32 whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_c: Tensor, mask: Tensor | None) -> Tensor:
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        p = scores.softmax(dim=-1, dtype=acc)
        del scores
        c = log_c.to(acc).exp()
        out = (p * c).to(v.dtype) @ v
        ctx.save_for_backward(q, k, v, out, p, c)
        ctx.log_c_dtype = log_c.dtype
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, out, p, c = ctx.saved_tensors
        w = p * c
        dv = w.to(v.dtype).transpose(-1, -2) @ d_out
        dw = (d_out @ v.transpose(-1, -2)).to(w.dtype).mul_(w)  # W ⊙ (dO Vᵀ)
        del w
        d_log_c = dw.sum(dim=1, keepdim=True)
        delta = (d_out.to(p.dtype) * out.to(p.dtype)).sum(dim=-1, keepdim=True)
        ds = dw.sub_(p * delta).mul_(q.shape[-1] ** -0.5).to(q.dtype)
        dq = ds @ k
        dk = ds.transpose(-1, -2) @ q
        return dq, dk, dv, d_log_c.to(ctx.log_c_dtype), None


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                   dropout_p: float = 0.0) -> Tensor:
    """The efficient path: per-sample log C [B, 1, N, N] from the tables, broadcast over heads (module docstring)."""
    allowed = allowed_pairs(q.shape[-2], prior.lengths, causal, q.device)
    log_c = prior.log_prior()[:, None]
    if allowed is not None:
        log_c = log_c.masked_fill(~allowed, float("-inf"))
    if prior.mode == "bias":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=log_c.to(q.dtype), dropout_p=dropout_p)
    if dropout_p > 0:
        raise NotImplementedError("attn_impl=sdpa has no attention dropout in prior_mode=multiply; use reference")
    mask = None if allowed is None else torch.zeros((), device=q.device).masked_fill(~allowed, float("-inf"))
    return _MultiplyAttention.apply(q, k, v, log_c, mask)


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


def resolve_impl(impl: str, mode: str, q: Tensor, dropout_p: float) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if dropout_p > 0:  # only SDPA (bias) and the reference implement attention dropout
        pick = "sdpa" if mode == "bias" else "reference"
        _log_pick(pick, "attention dropout is on")
        return pick
    if q.is_cuda and _triton_available():
        _log_pick("triton", "CUDA tensors, triton importable")
        return "triton"
    _log_pick("sdpa", "no CUDA/triton for these inputs")
    return "sdpa"


def hier_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                   dropout_p: float = 0.0) -> Tensor:
    """HiCLIP attention over [B, H, N, D] tensors with the layer's prior; dispatches on prior.impl."""
    if prior.mode not in MODES:
        raise ValueError(f"prior_mode must be one of {MODES}, got {prior.mode!r}")
    impl = resolve_impl(prior.impl, prior.mode, q, dropout_p)
    if impl == "reference":
        return reference_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if dropout_p > 0:
        raise NotImplementedError("attn_impl=triton has no attention dropout; use sdpa or auto")
    from model.kernels.hier_attention_triton import triton_attention

    return triton_attention(q, k, v, prior, causal=causal)
