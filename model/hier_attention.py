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
    """(C ⊙ softmax(S)) V over the packed projection qkv [B, N, 3, H, D] -> [B, N, H, D], with S = QKᵀ/√d masked
    and C = e^{log C} [B, 1, N, N] (0 where masked).

    Backward, with W = C ⊙ P and D_i = dO_i·O_i: dV = Wᵀ dO, dB = Σ_heads W ⊙ (dO Vᵀ) (the gradient of log C),
    dS = W ⊙ (dO Vᵀ) − P ⊙ D. Softmax and the gradient algebra run in fp32 whatever the input dtype.

    What this costs over fused attention on a CPU is memory traffic, so it runs head by head on the packed
    layout: each head's q, k, v are [B, N, D] matrices with a row stride of 3·H·D, which batched GEMMs read in
    place (taking the heads apart as [B, H, N, D] copies q, k, v into that layout, then each of their gradients
    back). What the GEMMs write goes to head-major buffers, [H, B, N, D] for the output and [3, H, B, N, D] for
    the gradients, each permuted into the packed layout by one copy at the end: a GEMM writes a head's slot of
    the packed layout only one sample at a time (torch's CPU bmm takes its batched BLAS call only for a
    contiguous result), which made those products twice as slow as the copy costs. The 1/√d rides on the GEMMs
    (baddbmm's alpha) for the scores, dQ and dK; the mask is the scores' initial value; the score gradient is
    formed in place in dO Vᵀ's buffer with one fused pass (addcmul).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, log_c: Tensor, mask: Tensor | None) -> Tensor:
        b, n, _, heads, d = qkv.shape
        acc = torch.promote_types(qkv.dtype, torch.float32)
        scale = d**-0.5
        c = log_c.to(acc).exp()[:, 0]  # [B, N, N], shared by the heads
        # The scores' initial value: the mask, or nothing (beta = 0 ignores it).
        start = qkv.new_zeros(()).expand(b, n, n) if mask is None else mask[:, 0].to(qkv.dtype).expand(b, n, n)
        beta = 0.0 if mask is None else 1.0
        out = qkv.new_empty(heads, b, n, d)
        probs = []
        for h in range(heads):
            q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
            scores = torch.baddbmm(start, q, k.transpose(1, 2), beta=beta, alpha=scale)
            p = scores.softmax(dim=-1, dtype=acc)
            del scores
            torch.bmm((p * c).to(v.dtype), v, out=out[h])
            probs.append(p)
        out = out.permute(1, 2, 0, 3).contiguous()  # [B, N, H, D]
        ctx.save_for_backward(qkv, out, c, *probs)
        ctx.log_c_dtype, ctx.scale = log_c.dtype, scale
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        qkv, out, c, *probs = ctx.saved_tensors
        scale = ctx.scale
        b, n, _, heads, d = qkv.shape
        grads = qkv.new_empty(3, heads, b, n, d)  # dQ, dK, dV, head-major
        d_log_c = torch.zeros_like(c)
        delta = (d_out.to(c.dtype) * out.to(c.dtype)).sum(dim=-1)  # [B, N, H]
        for h, p in enumerate(probs):
            q, k, v, g = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h], d_out[:, :, h]
            w = p * c
            torch.bmm(w.to(v.dtype).transpose(1, 2), g, out=grads[2, h])  # dV = Wᵀ dO
            dw = torch.bmm(g, v.transpose(1, 2)).to(w.dtype).mul_(w)  # W ⊙ (dO Vᵀ)
            del w
            d_log_c += dw
            ds = dw.addcmul_(p, delta[:, :, h, None], value=-1.0).to(qkv.dtype)  # ∂L/∂S
            dq, dk = grads[0, h], grads[1, h]  # beta = 0: baddbmm ignores what the buffers hold
            torch.baddbmm(dq, ds, k, beta=0.0, alpha=scale, out=dq)  # dQ = dS K / √d
            torch.baddbmm(dk, ds.transpose(1, 2), q, beta=0.0, alpha=scale, out=dk)  # dK = dSᵀ Q / √d
        return grads.permute(2, 3, 0, 1, 4).contiguous(), d_log_c[:, None].to(ctx.log_c_dtype), None


def _log_prior_and_mask(prior: ConstituentPrior, n: int, causal: bool, device) -> tuple[Tensor, Tensor | None]:
    """log C [B, 1, N, N] with -inf where a pair is not allowed, and the pairs' additive mask (None: all allowed)."""
    allowed = allowed_pairs(n, prior.lengths, causal, device)
    log_c = prior.log_prior()[:, None]
    if allowed is None:
        return log_c, None
    mask = torch.zeros((), device=device).masked_fill(~allowed, float("-inf"))
    return log_c.masked_fill(~allowed, float("-inf")), mask


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, prior: ConstituentPrior, *, causal: bool,
                   dropout_p: float = 0.0) -> Tensor:
    """The efficient path on [B, H, N, D] tensors: per-sample log C [B, 1, N, N] from the tables, broadcast over
    heads (module docstring). The multiply mode packs q, k, v as `sdpa_attention_packed` takes them."""
    if prior.mode == "multiply":
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
        return sdpa_attention_packed(qkv, prior, causal=causal, dropout_p=dropout_p).transpose(1, 2)
    log_c, _ = _log_prior_and_mask(prior, q.shape[-2], causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=log_c.to(q.dtype), dropout_p=dropout_p)


def sdpa_attention_packed(qkv: Tensor, prior: ConstituentPrior, *, causal: bool, dropout_p: float = 0.0) -> Tensor:
    """The efficient path on the packed projection qkv [B, N, 3, H, D] -> [B, N, H, D] (what the block's output
    projection reads without a copy)."""
    if prior.mode == "bias":
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return sdpa_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p).transpose(1, 2)
    if dropout_p > 0:
        raise NotImplementedError("attn_impl=sdpa has no attention dropout in prior_mode=multiply; use reference")
    log_c, mask = _log_prior_and_mask(prior, qkv.shape[1], causal, qkv.device)
    return _MultiplyAttention.apply(qkv, log_c, mask)


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
    if mode not in MODES:
        raise ValueError(f"prior_mode must be one of {MODES}, got {mode!r}")
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
    impl = resolve_impl(prior.impl, prior.mode, q, dropout_p)
    if impl == "reference":
        return reference_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p)
    if dropout_p > 0:
        raise NotImplementedError("attn_impl=triton has no attention dropout; use sdpa or auto")
    from model.kernels.hier_attention_triton import triton_attention

    return triton_attention(q, k, v, prior, causal=causal)


def hier_attention_packed(qkv: Tensor, prior: ConstituentPrior, *, causal: bool, dropout_p: float = 0.0) -> Tensor:
    """`hier_attention` on the packed projection qkv [B, N, 3, H, D], returning [B, N, H, D]: the transformer
    block's entry point, so the CPU path reads q, k, v and writes their gradients in place."""
    if resolve_impl(prior.impl, prior.mode, qkv, dropout_p) == "sdpa":
        return sdpa_attention_packed(qkv, prior, causal=causal, dropout_p=dropout_p)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return hier_attention(q, k, v, prior, causal=causal, dropout_p=dropout_p).transpose(1, 2)
