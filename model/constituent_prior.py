"""The constituent prior as the attention sees it (docs/method.md §1): O(N) tables of log C, and C itself.

A leaf module: it imports no attention and no prior module, so the prior modules (model/hier_prior.py), the
attention paths (model/hier_attention.py) and the kernels (model/kernels/) all import it and not each other.

Its logarithm is a difference of cumulative break costs (cost = -log a per edge): with β_k = Σ_{m<k} cost_m along
a sequence, log C_ij = -|β_j - β_i|. On a grid, the costs cumulate along each row (R) and each column (Cc), and the
two one-turn paths read four table entries. Because β is non-decreasing, |β_j - β_i| is written as
(β_j - β_i)·sign(j - i): the same value, but its gradient matches the product of links even where a link is 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class ConstituentPrior(NamedTuple):
    """One layer's constituent prior C for a batch: what `model.hier_attention.hier_attention` applies.

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
