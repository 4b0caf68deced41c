"""Properties of the constituent priors (docs/method.md §1.1, §1.2) and their O(N) tables."""
import math

import pytest
import torch

from model.config import HierConfig
from model.constituent_prior import group_log_prior, group_prior_reference, tree_log_prior, tree_prior_reference
from model.hier_prior import GroupPrior, TreePrior, break_cost, exclusive_cumsum
from model.transformer import Transformer


def _text_padding(lengths, n):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def _two_layers(module, x, pad):
    links_1, _ = module(x, None, pad)
    links_2, prior_2 = module(x + torch.randn_like(x), links_1, pad)
    return links_1, links_2, prior_2


def test_tree_prior_properties_and_tables():
    torch.manual_seed(0)
    module = TreePrior(24, cfg=HierConfig(sigma=2.0))
    pad = _text_padding([12, 7, 3], 12)
    links_1, links_2, prior = _two_layers(module, torch.randn(3, 12, 24), pad)
    c = prior.prior_reference()
    real = ~pad
    pairs = real[:, :, None] & real[:, None, :]

    torch.testing.assert_close(c, c.transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(torch.diagonal(c, dim1=1, dim2=2), torch.ones(3, 12))
    assert (c[pairs] > 0).all() and (c <= 1).all()
    # Non-splittable: links never decrease from one layer to the next.
    assert (links_2 >= links_1).all() and (links_2 > links_1)[real[:, 1:] & real[:, :-1]].any()
    # Links to and from padding are exactly 0, so C towards padding is 0 (off the diagonal).
    edge_to_pad = pad[:, 1:] | pad[:, :-1]
    assert (links_2[edge_to_pad] == 0).all()
    off_diag = ~torch.eye(12, dtype=torch.bool)
    assert (c[(pad[:, None, :] | pad[:, :, None]) & off_diag] == 0).all()
    # The tables give the same prior on every unmasked pair.
    torch.testing.assert_close(prior.log_prior()[pairs], c.log()[pairs], rtol=1e-5, atol=1e-5)


def test_tree_prior_is_a_product_of_links():
    links = torch.tensor([[0.5, 0.25, 0.8]])
    c = tree_prior_reference(links)[0]
    assert c[0, 3] == pytest.approx(0.5 * 0.25 * 0.8)
    assert c[3, 1] == pytest.approx(0.25 * 0.8)
    beta = exclusive_cumsum(break_cost(links, None), dim=1)
    torch.testing.assert_close(tree_log_prior(beta)[0].exp(), c)


@pytest.mark.parametrize("tokens", [3, 20])  # fewer / more tokens than channels: both ways of computing q·k
def test_first_token_link_uses_its_only_neighbour(tokens):
    """Token 0 has one neighbour: its softmax gives it probability 1, so â_{0,1} = sqrt(p_{1,0})."""
    torch.manual_seed(0)
    module = TreePrior(8, cfg=HierConfig())
    torch.nn.init.normal_(module.b_q)
    x = torch.randn(1, tokens, 8)
    links, _ = module(x, None, None)
    t = module.ln(x)
    q, k = t @ module.w_q.T + module.b_q, t @ module.w_k.T  # plain projections (the module uses associativity)
    s_10, s_12 = (q[0, 1] @ k[0, 0]) / 256, (q[0, 1] @ k[0, 2]) / 256
    p_10 = torch.softmax(torch.stack([s_10, s_12]), 0)[0]
    torch.testing.assert_close(links[0, 0], p_10.sqrt())


# A 3×3 grid worked by hand. horizontal[r, c] links (r, c)–(r, c+1); vertical[r, c] links (r, c)–(r+1, c).
H3 = torch.tensor([[0.9, 0.5], [0.8, 0.7], [0.6, 0.4]])
V3 = torch.tensor([[0.3, 0.9, 0.5], [0.6, 0.2, 0.8]])
HAND_WORKED = {
    # (query patch, key patch): C, with patches numbered row-major.
    (0, 8): 0.18,  # row 0 then column 2: (0.9·0.5)(0.5·0.8) = 0.18 beats column 0 then row 2: 0.0432
    (2, 6): 0.096,  # column 2 then row 2: (0.5·0.8)(0.6·0.4) = 0.096 beats row 0 then column 0: 0.081
    (1, 3): 0.72,  # column 1 then row 1: 0.9·0.8 = 0.72 beats row 0 then column 0: 0.9·0.3 = 0.27
    (4, 1): 0.9,  # same column: one vertical link
    (3, 5): 0.56,  # same row: 0.8·0.7
    (4, 4): 1.0,
}


@pytest.mark.parametrize("has_cls", [False, True])
def test_group_prior_on_a_hand_worked_3x3_grid(has_cls):
    c_ref = group_prior_reference(H3[None], V3[None], has_cls)[0]
    row_cost = exclusive_cumsum(break_cost(H3[None], None), dim=2)
    col_cost = exclusive_cumsum(break_cost(V3[None], None), dim=1)
    c_tables = group_log_prior(row_cost, col_cost, has_cls)[0].exp()
    shift = int(has_cls)
    for (u, v), expected in HAND_WORKED.items():
        for c in (c_ref, c_tables):
            assert c[u + shift, v + shift].item() == pytest.approx(expected, rel=1e-6)
            assert c[v + shift, u + shift].item() == pytest.approx(expected, rel=1e-6)
    if has_cls:
        assert torch.equal(c_ref[0], torch.ones(10)) and torch.equal(c_ref[:, 0], torch.ones(10))
    torch.testing.assert_close(c_tables, c_ref)


def test_group_prior_properties_and_tables():
    torch.manual_seed(0)
    module = GroupPrior(24, grid=(4, 5), has_cls=True, cfg=HierConfig(sigma=2.0))
    (h1, v1), (h2, v2), prior = _two_layers(module, torch.randn(2, 21, 24), None)
    c = prior.prior_reference()
    torch.testing.assert_close(c, c.transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(torch.diagonal(c, dim1=1, dim2=2), torch.ones(2, 21))
    assert (c > 0).all() and (c <= 1).all()
    assert (h2 >= h1).all() and (v2 >= v1).all() and (h2 > h1).any()
    torch.testing.assert_close(prior.log_prior(), c.log(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no padding"):
        module(torch.randn(2, 21, 24), None, torch.zeros(2, 21, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_links_never_decrease_through_a_transformer(kind):
    torch.manual_seed(0)
    cfg = HierConfig(sigma=1.0)
    if kind == "text":
        make_prior = lambda: TreePrior(32, cfg=cfg)  # noqa: E731
        x, pad = torch.randn(2, 10, 32), _text_padding([10, 6], 10)
    else:
        make_prior = lambda: GroupPrior(32, grid=(3, 3), has_cls=True, cfg=cfg)  # noqa: E731
        x, pad = torch.randn(2, 10, 32), None
    stack = Transformer(32, 4, 4, 2.0, 0.0, make_prior)
    _, per_layer = stack(x, key_padding_mask=pad, causal=kind == "text", return_links=True)
    assert len(per_layer) == 4
    flat = [torch.cat([t.flatten() for t in (links if isinstance(links, tuple) else (links,))]) for links in per_layer]
    for lower, upper in zip(flat, flat[1:]):
        assert (upper >= lower).all()
    assert (flat[-1] > flat[0]).any() and (flat[-1] <= 1).all()


def test_prior_runs_in_fp32_under_half_inputs():
    module = TreePrior(16, cfg=HierConfig()).to(torch.bfloat16)
    links, prior = module(torch.randn(2, 5, 16, dtype=torch.bfloat16), None, None)
    assert links.dtype == prior.beta.dtype == torch.float32
    assert math.isfinite(prior.beta.sum().item())


def _saturating_inputs(module, n_tokens, batch=2, gap=300.0, seed=0):
    """Block inputs whose neighbour scores differ by ~gap: softmaxes saturate, links come out exactly 0 or 1 in
    fp32 (and sqrt(p·p) at 0 would have an infinite derivative)."""
    g = torch.Generator().manual_seed(seed)
    width = module.ln.normalized_shape[0]
    x = torch.randn(batch, n_tokens, width, generator=g)
    with torch.no_grad():  # scores q_u·k_v / σ with q = k direction: scaling W_Q makes the gaps as large as asked
        module.w_q.copy_(torch.eye(width) * gap)
        module.w_k.copy_(torch.eye(width))
        module.b_q.zero_()
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "sdpa"])  # triton: tests/unit/test_hier_attention.py (interpreter)
@pytest.mark.parametrize("mode", ["multiply", "bias"])
@pytest.mark.parametrize("kind", ["text", "vision"])
def test_saturated_links_give_finite_gradients_equal_to_float64(kind, mode, impl, dtype):
    from model.hier_attention import reference_attention, sdpa_attention
    from tests.unit.test_hier_attention import check_saturated_prior

    check_saturated_prior({"reference": reference_attention, "sdpa": sdpa_attention}[impl], kind, mode, dtype)


@pytest.mark.parametrize("grid", [(1, 5), (4, 1), (1, 1)])
@pytest.mark.parametrize("has_cls", [True, False])
def test_one_row_one_column_and_single_patch_grids(grid, has_cls):
    from model.hier_attention import reference_attention, sdpa_attention

    torch.manual_seed(0)
    h, w = grid
    module = GroupPrior(16, grid=grid, has_cls=has_cls, cfg=HierConfig(sigma=2.0))
    n = h * w + has_cls
    x = torch.randn(2, n, 16, requires_grad=True)
    links, prior = module(x, None, None)
    links, prior = module(x * 0.5, links, None)
    assert links[0].shape == (2, h, w - 1) and links[1].shape == (2, h - 1, w)
    assert prior.row_cost.shape == prior.col_cost.shape == (2, h, w)
    c = prior.prior_reference()
    assert torch.allclose(prior.log_prior().exp(), c, atol=1e-6)
    q, k, v = torch.randn(3, 2, 2, n, 8).unbind(0)
    out = sdpa_attention(q, k, v, prior, causal=False)
    torch.testing.assert_close(out, reference_attention(q, k, v, prior, causal=False))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("grid", [(3, 4), (1, 5), (4, 1), (1, 1)])
def test_grid_scores_from_the_gram_matrix_equal_the_elementwise_ones(grid):
    """Both ways to score a grid's neighbours (model.hier_prior.gram_scores picks one by size): the same four score
    maps and the same gradients, in float64, on both sides of a sample boundary."""
    from model.hier_prior import _GridGramDots, _NeighbourDots, gram_scores

    assert gram_scores(7 * 7) and not gram_scores(14 * 14)
    torch.manual_seed(0)
    a, t = (torch.randn(3, *grid, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gram, elementwise = _GridGramDots.apply(a, t), _NeighbourDots.apply(a, t, 1, 2)
    for got, want in zip(gram, elementwise, strict=True):
        torch.testing.assert_close(got, want)
    weights = [torch.randn_like(s) for s in elementwise]
    for got, want in zip(torch.autograd.grad(gram, (a, t), weights), torch.autograd.grad(elementwise, (a, t), weights)):
        torch.testing.assert_close(got, want)
    # the south score of patch (0, 0) by hand: its query against the key one row down
    if grid[0] > 1:
        torch.testing.assert_close(gram[0][1, 0, 0], a[1, 0, 0] @ t[1, 1, 0])
