"""Constituent priors of HiCLIP (docs/method.md §1): link probabilities between neighbours and the O(N) tables of C.

A prior module reads a block's input tokens and the previous layer's links, and returns this layer's links
(non-splittable: a^l = a^{l-1} + (1 - a^{l-1}) â^l) plus a `ConstituentPrior` (model/constituent_prior.py), the
tables the attention reads. C is never stored as N×N by the efficient paths.

Padding (text only) is a suffix, as `model.text.padding_mask` makes it: links to and from padding are 0, padded
keys are masked, and a padded query attends only to itself (C_ii = 1; its output is never read).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import HierConfig
from model.constituent_prior import ConstituentPrior

# A score for a neighbour that does not exist: finite, so a token without neighbours gives no NaN gradients.
_ABSENT = -1e9


def non_splittable(prev: Tensor | None, fresh: Tensor) -> Tensor:
    """a^l = a^{l-1} + (1 - a^{l-1}) · â^l with a^0 = 0: once two neighbours merge they never split."""
    return fresh if prev is None else prev + (1.0 - prev) * fresh


def pair_link(logp_forward: Tensor, logp_backward: Tensor, edge_valid: Tensor | None) -> Tensor:
    """â = sqrt(p_{u→v} · p_{v→u}) from log-probabilities, exactly 0 on invalid edges.

    As exp(½(log p + log p')): a saturated softmax (score gap ≳ 100 in fp32) makes p exactly 0, where sqrt'(0) is
    infinite and the gradient NaN; log p stays finite there, and so does every derivative.
    """
    link = torch.exp(0.5 * (logp_forward + logp_backward))
    return link if edge_valid is None else torch.where(edge_valid, link, 0.0)


def break_cost(links: Tensor, edge_valid: Tensor | None) -> Tensor:
    """-log a per edge; 0 on invalid (padding) edges, which no unmasked query/key pair ever crosses."""
    tiny = torch.finfo(links.dtype).tiny
    cost = -links.clamp_min(tiny).log()
    return cost if edge_valid is None else torch.where(edge_valid, cost, 0.0)


def exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """[.., n-1, ..] edge costs -> [.., n, ..] cumulative costs starting at 0 (n = 1: no edges, one zero)."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x.new_zeros(shape), x.cumsum(dim)], dim=dim)


class _NeighbourDots(torch.autograd.Function):
    """a_u·t_v for every pair of neighbours along the given token dims of a, t [B, *grid, D], both directions.

    Returns, per dim, (a_i·t_{i+1}, a_{i+1}·t_i) over the N-1 edges of that dim. The same as slicing and summing
    products under autograd, but the backward accumulates the four slices' gradients in place (addcmul) into one
    buffer each for a and t, where autograd would materialise every product's gradient, zero-pad each slice's back
    to full size and add them up: the prior's forward + backward took 0.92-0.93x its old time (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, a: Tensor, t: Tensor, *dims: int):
        ctx.save_for_backward(a, t)
        ctx.dims = dims
        out = []
        for d in dims:
            m = a.shape[d] - 1
            out += [(a.narrow(d, 0, m) * t.narrow(d, 1, m)).sum(-1), (a.narrow(d, 1, m) * t.narrow(d, 0, m)).sum(-1)]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        a, t = ctx.saved_tensors
        da, dt = torch.empty_like(a), torch.empty_like(t)
        written = False
        for i, d in enumerate(ctx.dims):
            m = a.shape[d] - 1
            # (which slice of a, of t) the forward and the backward edge read
            for g, (ia, it) in zip(grads[2 * i: 2 * i + 2], ((0, 1), (1, 0))):
                if g is None:
                    continue
                g = g[..., None].to(a.dtype)
                if written:
                    da.narrow(d, ia, m).addcmul_(t.narrow(d, it, m), g)
                    dt.narrow(d, it, m).addcmul_(a.narrow(d, ia, m), g)
                    continue
                # The first product is written, not added: no pass to zero the buffers, only the one slice along
                # d that this edge does not reach.
                torch.mul(t.narrow(d, it, m), g, out=da.narrow(d, ia, m))
                torch.mul(a.narrow(d, ia, m), g, out=dt.narrow(d, it, m))
                da.narrow(d, m * (1 - ia), 1).zero_()
                dt.narrow(d, m * (1 - it), 1).zero_()
                written = True
        if not written:  # no score was used
            da.zero_()
            dt.zero_()
        return (da, dt, *([None] * len(ctx.dims)))


def _grid_pairs(s: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four neighbour diagonals of a per-sample [B, P, P] matrix over a row-major h×w grid (P = h·w), as views:
    (south, north) [B, h-1, w] at (u, u+w) and (u+w, u); (east, west) [B, h, w-1] at (u, u+1) and (u+1, u)."""
    b, p, _ = s.shape
    step = (p * p, w * (p + 1), p + 1)  # next sample, next row of the grid, next column
    base = s.storage_offset()
    return (s.as_strided((b, h - 1, w), step, base + w), s.as_strided((b, h - 1, w), step, base + w * p),
            s.as_strided((b, h, w - 1), step, base + 1), s.as_strided((b, h, w - 1), step, base + p))


class _GridGramDots(torch.autograd.Function):
    """`_NeighbourDots` over both dims of an h×w grid, from one Gram matrix S = A Tᵀ per sample (P × P, P = h·w).

    The same four score maps (south, north, east, west), read off S's diagonals at offsets ±1 and ±w; the backward
    scatters their gradients into a zero P × P matrix and takes dA = dS T, dT = dSᵀ A. It does P/4 times the
    multiply-adds of the elementwise path, but as three batched GEMMs that read A and T once, where the elementwise
    path makes ~12 passes over [B, P, D] tensors. Forward + backward on a CPU thread at D = 768, in 0.49x the
    elementwise time at 7×7 (ViT-B/32 at 224 px), 0.66x at 10×10, 0.74x at 12×12, but 1.11x at 14×14 (ViT-B/16)
    (bench/neighbour_scores.py), hence `gram_scores`.
    """

    @staticmethod
    def forward(ctx, a: Tensor, t: Tensor):
        b, h, w, d = a.shape
        s = torch.bmm(a.reshape(b, h * w, d), t.reshape(b, h * w, d).transpose(1, 2))
        ctx.save_for_backward(a, t)
        return _grid_pairs(s, h, w)

    @staticmethod
    def backward(ctx, *grads):
        a, t = ctx.saved_tensors
        b, h, w, d = a.shape
        ds = a.new_zeros(b, h * w, h * w)
        for view, g in zip(_grid_pairs(ds, h, w), grads):
            if g is not None:
                view.copy_(g)
        da = torch.bmm(ds, t.reshape(b, h * w, d)).view_as(a)
        dt = torch.bmm(ds.transpose(1, 2), a.reshape(b, h * w, d)).view_as(t)
        return da, dt


def gram_scores(patches: int) -> bool:
    """Whether a grid's neighbour scores come from its Gram matrix (`_GridGramDots`) rather than elementwise
    products: up to 144 patches (12×12); the crossover measured by bench/neighbour_scores.py lies between 12×12 and
    14×14, as it should: the Gram's work grows as P² against the products' P."""
    return patches <= 144


# ---------------------------------------------------------------------------------------------------------------
# The modules: links from tokens.


def folds_projection(tokens: int, width: int) -> bool:
    """Whether `project` applies W_Qᵀ W_K (d×d×d, once) rather than W_Q and W_K (two token GEMMs): with more tokens
    than channels, forward and backward cost 3·T·d² + 3·d³ against 6·T·d² (model/flops.py counts the same)."""
    return tokens > width


class _NeighbourScorer(nn.Module):
    """The prior's own LayerNorm and W_Q, W_K (d_model -> d_model); scores q_u·k_v / σ in fp32 at least.

    W_Q, b_Q, W_K are direct parameters rather than nn.Linear children: they are read in this module's forward
    (see `project`), and ZeRO-3 gathers a module's own parameters when its forward runs. There is no key bias:
    it would add the same q·b to every neighbour's score, which the softmax cancels.
    """

    def __init__(self, width: int, cfg: HierConfig):
        super().__init__()
        self.cfg = cfg
        self.ln = nn.LayerNorm(width)
        self.w_q = nn.Parameter(torch.randn(width, width) * width**-0.5)  # [out, in], as nn.Linear
        self.b_q = nn.Parameter(torch.zeros(width))
        self.w_k = nn.Parameter(torch.randn(width, width) * width**-0.5)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) with a_u·b_v = q_u·k_v, where t = LN(x), q = W_Q t + b_Q and k = W_K t.

        With more tokens than channels, associativity saves one of the two token-sized GEMMs:
        q_u·k_v = (t_u W_Qᵀ W_K + b_Q W_K)·t_v, and the d×d product W_Qᵀ W_K costs less than a
        [tokens, d]×[d, d] GEMM.
        """
        t = self.ln(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # links and tables are never half precision
        if folds_projection(t[..., 0].numel(), t.shape[-1]):
            a = torch.addmm(self.b_q @ self.w_k, t.flatten(0, -2), self.w_q.t() @ self.w_k).view_as(t)
            return a.to(dtype), t.to(dtype)
        return (t @ self.w_q.t() + self.b_q).to(dtype), (t @ self.w_k.t()).to(dtype)

    def neighbour_scores(self, q: Tensor, k: Tensor, *dims: int) -> tuple[Tensor, ...]:
        """Per token dim, the scores (s_{i,i+1}, s_{i+1,i}) = (q_i·k_{i+1}, q_{i+1}·k_i) / σ over its edges."""
        if dims == (1, 2) and gram_scores(q.shape[1] * q.shape[2]):
            dots = _GridGramDots.apply(q, k)
        else:
            dots = _NeighbourDots.apply(q, k, *dims)
        return tuple(s / self.cfg.sigma for s in dots)


class TreePrior(_NeighbourScorer):
    """Tree Transformer's constituent prior over a token sequence (docs/method.md §1.1)."""

    def forward(self, x: Tensor, prev_links: Tensor | None, key_padding_mask: Tensor | None):
        q, k = self.project(x)  # [B, N, D], with q_u·k_v the neighbour score's numerator
        right, left = self.neighbour_scores(q, k, 1)  # s_{i,i+1} and s_{i+1,i}, i = 0..N-2
        b, n = x.shape[:2]
        absent = right.new_full((b, 1), _ABSENT)
        # Each token's scores (to the left, to the right); the sequence ends have one neighbour.
        scores = torch.stack([torch.cat([absent, left], 1), torch.cat([right, absent], 1)], dim=-1)
        edge_valid = None
        if key_padding_mask is not None:
            real = ~key_padding_mask
            edge_valid = real[:, :-1] & real[:, 1:]
            left_real = nn.functional.pad(real[:, :-1], (1, 0), value=False)
            right_real = nn.functional.pad(real[:, 1:], (0, 1), value=False)
            scores = scores.masked_fill(~torch.stack([left_real, right_real], dim=-1), _ABSENT)
        logp = scores.log_softmax(-1)  # log (p_{i,i-1}, p_{i,i+1})
        fresh = pair_link(logp[:, :-1, 1], logp[:, 1:, 0], edge_valid)
        links = non_splittable(prev_links, fresh)
        beta = exclusive_cumsum(break_cost(links, edge_valid), dim=1)
        lengths = None if key_padding_mask is None else (~key_padding_mask).sum(-1)
        prior = ConstituentPrior("tree", self.cfg.prior_mode, self.cfg.attn_impl, links, lengths=lengths, beta=beta)
        return links, prior


class GroupPrior(_NeighbourScorer):
    """Group Transformer's 2-D constituent prior over an H×W patch grid (docs/method.md §1.2); token 0 is CLS if
    has_cls.

    Links are a pair (horizontal [B, H, W-1], vertical [B, H-1, W]).
    """

    def __init__(self, width: int, grid: tuple[int, int], has_cls: bool = True, *, cfg: HierConfig):
        super().__init__(width, cfg)
        self.grid = grid
        self.has_cls = has_cls

    def forward(self, x: Tensor, prev_links: tuple[Tensor, Tensor] | None, key_padding_mask: Tensor | None,
                grid: tuple[int, int] | None = None):
        """grid: the tokens' grid when not the module's own (patch dropout keeps a sub-grid of rows and columns)."""
        if key_padding_mask is not None:
            raise ValueError("GroupPrior: a patch grid has no padding (key_padding_mask must be None)")
        h, w = grid or self.grid
        patches = x[:, 1:] if self.has_cls else x
        q, k = self.project(patches.unflatten(1, (h, w)))  # [B, H, W, D]
        # (r, c) -> (r+1, c), (r+1, c) -> (r, c), (r, c) -> (r, c+1), (r, c+1) -> (r, c)
        south, north, east, west = self.neighbour_scores(q, k, 1, 2)
        pad = nn.functional.pad
        # Each patch's scores to its (north, south, west, east) neighbours; a missing one gets _ABSENT.
        scores = torch.stack([
            pad(north, (0, 0, 1, 0), value=_ABSENT),
            pad(south, (0, 0, 0, 1), value=_ABSENT),
            pad(west, (1, 0), value=_ABSENT),
            pad(east, (0, 1), value=_ABSENT),
        ], dim=-1)
        logp = scores.log_softmax(-1)
        fresh_h = pair_link(logp[:, :, :-1, 3], logp[:, :, 1:, 2], None)
        fresh_v = pair_link(logp[:, :-1, :, 1], logp[:, 1:, :, 0], None)
        prev_h, prev_v = prev_links if prev_links is not None else (None, None)
        horizontal, vertical = non_splittable(prev_h, fresh_h), non_splittable(prev_v, fresh_v)
        row_cost = exclusive_cumsum(break_cost(horizontal, None), dim=2)  # [B, H, W]
        col_cost = exclusive_cumsum(break_cost(vertical, None), dim=1)  # [B, H, W]
        prior = ConstituentPrior("group", self.cfg.prior_mode, self.cfg.attn_impl, (horizontal, vertical),
                                 row_cost=row_cost, col_cost=col_cost, has_cls=self.has_cls)
        return (horizontal, vertical), prior
