"""Constituent priors of HiCLIP (SPEC §1): link probabilities between neighbours and the O(N) tables of C.

A prior module reads a block's input tokens and the previous layer's links, and returns this layer's links
(non-splittable: a^l = a^{l-1} + (1 - a^{l-1}) â^l) plus a `ConstituentPrior`, the object the attention calls.

C is never stored as N×N by the efficient paths. Its logarithm is a difference of cumulative break costs
(cost = -log a per edge): with β_k = Σ_{m<k} cost_m along a sequence, log C_ij = -|β_j - β_i|. On a grid, the
costs cumulate along each row (R) and each column (Cc), and the two one-turn paths read four table entries.
Because β is non-decreasing, |β_j - β_i| is written as (β_j - β_i)·sign(j - i): the same value, but its gradient
matches the product of links even where a link is exactly 1.

Padding (text only) is a suffix, as `model.text.padding_mask` makes it: links to and from padding are 0, padded
keys are masked, and a padded query attends only to itself (C_ii = 1; its output is never read).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.config import HierConfig
from model.hier_attention import hier_attention

# A score for a neighbour that does not exist: finite, so a token without neighbours gives no NaN gradients.
_ABSENT = -1e9


def non_splittable(prev: Tensor | None, fresh: Tensor) -> Tensor:
    """a^l = a^{l-1} + (1 - a^{l-1}) · â^l with a^0 = 0: once two neighbours merge they never split."""
    return fresh if prev is None else prev + (1.0 - prev) * fresh


def pair_link(p_forward: Tensor, p_backward: Tensor, edge_valid: Tensor | None) -> Tensor:
    """â = sqrt(p_{u→v} · p_{v→u}), exactly 0 on invalid edges (with a finite gradient: sqrt'(0) is infinite)."""
    product = p_forward * p_backward
    if edge_valid is None:
        return product.sqrt()
    return torch.where(edge_valid, torch.where(edge_valid, product, 1.0).sqrt(), 0.0)


def break_cost(links: Tensor, edge_valid: Tensor | None) -> Tensor:
    """-log a per edge; 0 on invalid (padding) edges, which no unmasked query/key pair ever crosses."""
    tiny = torch.finfo(links.dtype).tiny
    cost = -links.clamp_min(tiny).log()
    return cost if edge_valid is None else torch.where(edge_valid, cost, 0.0)


def exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """[.., n-1, ..] edge costs -> [.., n, ..] cumulative costs starting at 0."""
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, x.cumsum(dim)], dim=dim)


# ---------------------------------------------------------------------------------------------------------------
# The prior as seen by the attention: O(N) tables, plus the links for the reference path.


class ConstituentPrior(NamedTuple):
    """One layer's constituent prior C for a batch, and the attention that applies it.

    A NamedTuple, not a dataclass: ZeRO-3 hooks the tensors a module returns (tuples, lists, dicts, named
    tuples) to re-gather its parameters before their backward; tensors inside other objects go unseen.

    kind 'tree': `beta` [B, N]. kind 'group': `row_cost`, `col_cost` [B, H, W] (cumulative along the row and
    along the column), `has_cls` (token 0 is outside the grid, C = 1 to and from it). `links` is the layer's
    link tensor (tree) or (horizontal, vertical) pair (group), used only by the reference path.
    """

    kind: str
    mode: str  # multiply | bias
    impl: str  # auto | reference | sdpa | triton
    links: Tensor | tuple[Tensor, Tensor]
    lengths: Tensor | None = None  # [B] valid tokens per sample (tree with padding)
    beta: Tensor | None = None
    row_cost: Tensor | None = None
    col_cost: Tensor | None = None
    has_cls: bool = False

    def log_prior(self) -> Tensor:
        """log C [B, N, N] from the tables (the efficient builder; -inf never appears)."""
        if self.kind == "tree":
            return tree_log_prior(self.beta)
        return group_log_prior(self.row_cost, self.col_cost, self.has_cls)

    def prior_reference(self) -> Tensor:
        """C [B, N, N] as products of links along paths: the readable ground truth."""
        if self.kind == "tree":
            return tree_prior_reference(self.links)
        horizontal, vertical = self.links
        return group_prior_reference(horizontal, vertical, self.has_cls)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, dropout_p: float = 0.0) -> Tensor:
        """(C ⊙ softmax(QKᵀ/√d)) V or softmax(QKᵀ/√d + log C) V over [B, H, N, D], per `mode` and `impl`."""
        return hier_attention(q, k, v, self, causal=causal, dropout_p=dropout_p)


def tree_log_prior(beta: Tensor) -> Tensor:
    """log C_ij = -(β_j - β_i)·sign(j - i) from the cumulative break costs β [B, N]."""
    n = beta.shape[-1]
    idx = torch.arange(n, device=beta.device)
    sign = torch.sign(idx[None, :] - idx[:, None]).to(beta.dtype)
    return -(beta[:, None, :] - beta[:, :, None]) * sign


def group_log_prior(row_cost: Tensor, col_cost: Tensor, has_cls: bool) -> Tensor:
    """log C between grid patches: minus the cheaper of the two one-turn paths, each a sum of two table gaps.

    Every term is a table broadcast over a [B, r1, c1, r2, c2] view (query (r1, c1), key (r2, c2)), so the
    forward is elementwise and the backward is a sum: no gathers, no scatters.
    """
    b, h, w = row_cost.shape

    def at(table: Tensor) -> dict[str, Tensor]:
        """table[b, r, c] at the four (row, column) corners, as broadcastable [B, r1, c1, r2, c2] views."""
        return {"r1c1": table[:, :, :, None, None], "r1c2": table[:, :, None, None, :],
                "r2c1": table.transpose(1, 2)[:, None, :, :, None], "r2c2": table[:, None, None, :, :]}

    R, K = at(row_cost), at(col_cost)  # R: cost along a row up to a column; K: along a column up to a row
    idx_h = torch.arange(h, device=row_cost.device)
    idx_w = torch.arange(w, device=row_cost.device)
    row_sign = torch.sign(idx_h[None, :] - idx_h[:, None]).to(row_cost.dtype).view(h, 1, h, 1)  # sign(r2 - r1)
    col_sign = torch.sign(idx_w[None, :] - idx_w[:, None]).to(row_cost.dtype).view(1, w, 1, w)  # sign(c2 - c1)
    # Path 1 runs along row r1, turns at (r1, c2), runs along column c2; path 2 turns at (r2, c1).
    path_1 = (R["r1c2"] - R["r1c1"]) * col_sign + (K["r2c2"] - K["r1c2"]) * row_sign
    path_2 = (K["r2c1"] - K["r1c1"]) * row_sign + (R["r2c2"] - R["r2c1"]) * col_sign
    log_c = -torch.minimum(path_1, path_2).reshape(b, h * w, h * w)
    if has_cls:
        log_c = nn.functional.pad(log_c, (1, 0, 1, 0))  # CLS: log C = 0 to and from every token
    return log_c


def tree_prior_reference(links: Tensor) -> Tensor:
    """C_ij = ∏_{k=i}^{j-1} a_{k,k+1} for j > i, symmetric, C_ii = 1, from links [B, N-1]."""
    b, m = links.shape
    n = m + 1
    c = torch.ones(b, n, n, dtype=links.dtype, device=links.device)
    for i in range(n):
        # Products of the links i..j-1 for every j > i.
        c[:, i, i + 1:] = torch.cumprod(links[:, i:], dim=-1)
    upper = torch.triu(c, diagonal=1)
    return upper + upper.transpose(1, 2) + torch.eye(n, dtype=links.dtype, device=links.device)


def group_prior_reference(horizontal: Tensor, vertical: Tensor, has_cls: bool) -> Tensor:
    """C between patches: the larger of the two one-turn paths' link products; CLS has C = 1 to and from all.

    horizontal [B, H, W-1] links (r, c)–(r, c+1); vertical [B, H-1, W] links (r, c)–(r+1, c).
    """
    b, h, w1 = horizontal.shape
    w = w1 + 1
    row_paths = torch.stack([tree_prior_reference(horizontal[:, r]) for r in range(h)], dim=1)  # [B, H, W, W]
    col_paths = torch.stack([tree_prior_reference(vertical[:, :, c]) for c in range(w)], dim=1)  # [B, W, H, H]
    r = torch.arange(h, device=horizontal.device).repeat_interleave(w)  # row of each patch, row-major
    c = torch.arange(w, device=horizontal.device).repeat(h)
    r1, c1, r2, c2 = r[:, None], c[:, None], r[None, :], c[None, :]  # query (r1, c1), key (r2, c2)
    path_1 = row_paths[:, r1, c1, c2] * col_paths[:, c2, r1, r2]  # along row r1, then down column c2
    path_2 = col_paths[:, c1, r1, r2] * row_paths[:, r2, c1, c2]  # along column c1, then along row r2
    c_grid = torch.maximum(path_1, path_2)
    if has_cls:
        c_grid = nn.functional.pad(c_grid, (1, 0, 1, 0), value=1.0)
    return c_grid


# ---------------------------------------------------------------------------------------------------------------
# The modules: links from tokens.


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
        if t[..., 0].numel() > t.shape[-1]:
            a = torch.addmm(self.b_q @ self.w_k, t.flatten(0, -2), self.w_q.t() @ self.w_k).view_as(t)
            return a.to(dtype), t.to(dtype)
        return (t @ self.w_q.t() + self.b_q).to(dtype), (t @ self.w_k.t()).to(dtype)

    def score(self, q: Tensor, k: Tensor) -> Tensor:
        return (q * k).sum(-1) / self.cfg.sigma


class TreePrior(_NeighbourScorer):
    """Tree Transformer's constituent prior over a token sequence (SPEC §1.1)."""

    def forward(self, x: Tensor, prev_links: Tensor | None, key_padding_mask: Tensor | None):
        q, k = self.project(x)  # [B, N, D], with q_u·k_v the neighbour score's numerator
        right = self.score(q[:, :-1], k[:, 1:])  # s_{i,i+1}, i = 0..N-2
        left = self.score(q[:, 1:], k[:, :-1])  # s_{i+1,i}
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
        p = scores.softmax(-1)  # (p_{i,i-1}, p_{i,i+1})
        fresh = pair_link(p[:, :-1, 1], p[:, 1:, 0], edge_valid)
        links = non_splittable(prev_links, fresh)
        beta = exclusive_cumsum(break_cost(links, edge_valid), dim=1)
        lengths = None if key_padding_mask is None else (~key_padding_mask).sum(-1)
        prior = ConstituentPrior("tree", self.cfg.prior_mode, self.cfg.attn_impl, links, lengths=lengths, beta=beta)
        return links, prior


class GroupPrior(_NeighbourScorer):
    """Group Transformer's 2-D constituent prior over an H×W patch grid (SPEC §1.2); token 0 is CLS if has_cls.

    Links are a pair (horizontal [B, H, W-1], vertical [B, H-1, W]).
    """

    def __init__(self, width: int, grid: tuple[int, int], has_cls: bool = True, *, cfg: HierConfig):
        super().__init__(width, cfg)
        self.grid = grid
        self.has_cls = has_cls

    def forward(self, x: Tensor, prev_links: tuple[Tensor, Tensor] | None, key_padding_mask: Tensor | None):
        if key_padding_mask is not None:
            raise ValueError("GroupPrior: a patch grid has no padding (key_padding_mask must be None)")
        h, w = self.grid
        patches = x[:, 1:] if self.has_cls else x
        q, k = self.project(patches.unflatten(1, (h, w)))  # [B, H, W, D]
        east = self.score(q[:, :, :-1], k[:, :, 1:])  # (r, c) -> (r, c+1)
        west = self.score(q[:, :, 1:], k[:, :, :-1])  # (r, c+1) -> (r, c)
        south = self.score(q[:, :-1], k[:, 1:])  # (r, c) -> (r+1, c)
        north = self.score(q[:, 1:], k[:, :-1])  # (r+1, c) -> (r, c)
        pad = nn.functional.pad
        # Each patch's scores to its (north, south, west, east) neighbours; a missing one gets _ABSENT.
        scores = torch.stack([
            pad(north, (0, 0, 1, 0), value=_ABSENT),
            pad(south, (0, 0, 0, 1), value=_ABSENT),
            pad(west, (1, 0), value=_ABSENT),
            pad(east, (0, 1), value=_ABSENT),
        ], dim=-1)
        p = scores.softmax(-1)
        fresh_h = pair_link(p[:, :, :-1, 3], p[:, :, 1:, 2], None)
        fresh_v = pair_link(p[:, :-1, :, 1], p[:, 1:, :, 0], None)
        prev_h, prev_v = prev_links if prev_links is not None else (None, None)
        horizontal, vertical = non_splittable(prev_h, fresh_h), non_splittable(prev_v, fresh_v)
        row_cost = exclusive_cumsum(break_cost(horizontal, None), dim=2)  # [B, H, W]
        col_cost = exclusive_cumsum(break_cost(vertical, None), dim=1)  # [B, H, W]
        prior = ConstituentPrior("group", self.cfg.prior_mode, self.cfg.attn_impl, (horizontal, vertical),
                                 row_cost=row_cost, col_cost=col_cost, has_cls=self.has_cls)
        return (horizontal, vertical), prior
