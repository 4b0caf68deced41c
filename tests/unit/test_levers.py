"""Scale levers (model/transformer.py, model/vision.py, model/regions.py): activation checkpointing gives the same
gradients and keeps less; patch dropout keeps a sub-grid on which HiCLIP's Group prior is the brute-force one, the
region level reads the kept patches, and evaluation never drops anything."""
import dataclasses

import pytest
import torch

from model.clip import CLIP
from model.config import HierConfig, TextConfig, VisionConfig
from model.regions import RegionTokens
from model.vision import VisionTower
from tests.unit.test_pyramid_model import pyramid_batch, small_config


def with_levers(cfg, checkpointing="none", patch_dropout=0.0, every=2):
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, checkpointing=checkpointing, checkpoint_every=every,
                                        patch_dropout=patch_dropout),
        text=dataclasses.replace(cfg.text, checkpointing=checkpointing, checkpoint_every=every))


def grads(model: CLIP, batch: dict, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(batch)
    # Every level and the temperature enter the loss with different weights, so no gradient can cancel.
    loss = sum((i + 1) * out[k].pow(2).mul(torch.linspace(-1, 1, out[k].shape[-1])).sum()
               for i, k in enumerate(("global", "local", "region", "caption", "summary", "objects")))
    (loss * out["logit_scale"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,every", [("blocks", 1), ("every_k", 2)])
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_checkpointing_gives_the_same_gradients(mode, every, patch_dropout):
    """HiCLIP x PyramidCLIP, fp32, dropout on: the recomputation replays the links, the f1/f2 split and the RNG."""
    cfg = small_config("hier", dropout=0.2)
    cfg.vision.layers = 4
    batch = pyramid_batch()
    torch.manual_seed(0)
    plain = CLIP(with_levers(cfg, patch_dropout=patch_dropout)).train()
    checkpointed = CLIP(with_levers(cfg, mode, patch_dropout, every)).train()
    checkpointed.load_state_dict(plain.state_dict())
    marks = checkpointed.visual.transformer.checkpointed
    assert marks == ([True] * 4 if mode == "blocks" else [True, False, True, False])
    ref, got = grads(plain, batch, seed=7), grads(checkpointed, batch, seed=7)
    assert ref.keys() == got.keys() and len(ref) == len(list(plain.parameters()))
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # The comparison can fail: another dropout draw moves the gradients.
    other = grads(checkpointed, batch, seed=8)
    assert max(((other[n] - g).norm() / g.norm()).item() for n, g in ref.items()) > 1e-2


def test_checkpointing_in_bf16_gives_the_same_gradients():
    cfg = small_config("hier", dropout=0.2)
    batch = pyramid_batch()
    torch.manual_seed(0)
    plain = CLIP(cfg).train().to(torch.bfloat16)
    checkpointed = CLIP(with_levers(cfg, "blocks")).train().to(torch.bfloat16)
    checkpointed.load_state_dict(plain.state_dict())
    ref, got = grads(plain, batch, seed=7), grads(checkpointed, batch, seed=7)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=0, msg=name)  # the same kernels on the same values


def saved_bytes(model: CLIP, batch: dict) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    return sum(seen.values())


def test_block_checkpointing_keeps_far_less_for_backward():
    cfg = small_config("hier")
    cfg.vision.layers, cfg.text.layers = 6, 6
    batch = pyramid_batch()
    torch.manual_seed(0)
    none, blocks = (saved_bytes(CLIP(with_levers(cfg, mode)).train(), batch) for mode in ("none", "blocks"))
    every_2 = saved_bytes(CLIP(with_levers(cfg, "every_k", every=2)).train(), batch)
    assert blocks < 0.25 * none and blocks < every_2 < 0.75 * none, (none, every_2, blocks)


def test_eval_outputs_do_not_depend_on_patch_dropout():
    for attention in ("vanilla", "hier"):
        torch.manual_seed(0)
        plain = CLIP(small_config(attention)).eval()
        dropping = CLIP(with_levers(small_config(attention), patch_dropout=0.5)).eval()
        dropping.load_state_dict(plain.state_dict())
        batch = pyramid_batch()
        with torch.no_grad():
            a, b = plain(batch), dropping(batch)
        for level in a:
            assert torch.equal(a[level], b[level]), (attention, level)
        # ... and it does drop in training: the outputs change.
        dropping.train()
        with torch.no_grad():
            assert not torch.allclose(dropping(batch)["global"], a["global"]), attention


def hier_tower(patch_dropout: float, grid: int = 6, layers: int = 2, attention: str = "hier") -> VisionTower:
    cfg = VisionConfig(image_size=8 * grid, patch_size=8, width=32, layers=layers, heads=2, attention=attention,
                       region_split=-1, patch_dropout=patch_dropout)
    torch.manual_seed(0)
    tower = VisionTower(cfg, embed_dim=16, dropout=0.0, hier=HierConfig(attn_impl="reference"))
    for block in tower.transformer.blocks:  # larger projections: links far from 0.5, so a wrong neighbour shows
        if block.prior is not None:
            block.prior.w_q.data.mul_(8)
    return tower.train()


def test_patch_dropout_keeps_a_fraction_of_patches():
    x = torch.randn(3, 1 + 36, 32)
    kept, grid, keep = hier_tower(0.5, attention="vanilla").drop_patches(x)
    assert grid is None and kept.shape == (3, 1 + 18, 32) and torch.equal(kept[:, 0], x[:, 0])
    assert len({tuple(k) for k in keep.tolist()}) > 1  # a fresh draw per sample
    for tower_p, side in ((0.5, 4), (0.75, 3), (0.95, 2)):  # round(6·sqrt(1-p)), never below 2 x 2
        kept, grid, keep = hier_tower(tower_p).drop_patches(x)
        assert grid == (side, side) and kept.shape == (3, 1 + side * side, 32)
        rows, cols = keep // 6, keep % 6
        for r, c in zip(rows.view(3, side, side), cols.view(3, side, side)):
            # Whole rows and whole columns: row index constant along a sub-grid row, column along a column.
            assert (r == r[:, :1]).all() and (c == c[:1]).all()
            assert (r[1:, 0] > r[:-1, 0]).all() and (c[0, 1:] > c[0, :-1]).all()
    assert torch.equal(kept[:, 1:], x[:, 1:].gather(1, keep[..., None].expand(-1, -1, 32)))


def brute_force_links(prior, x: torch.Tensor, keep: torch.Tensor, g: int, prev: dict | None) -> dict:
    """Links between each kept patch and its nearest kept neighbour in the full grid, straight from docs/method.md
    §1.2."""
    t = prior.ln(x[1:])
    q, k = t @ prior.w_q.t() + prior.b_q, t @ prior.w_k.t()
    where = {divmod(int(j), g): i for i, j in enumerate(keep)}  # (row, col) in the full grid -> token
    rows, cols = sorted({r for r, _ in where}), sorted({c for _, c in where})

    def neighbours(r, c):
        out = {}
        for name, (dr, dc) in {"n": (-1, 0), "s": (1, 0), "w": (0, -1), "e": (0, 1)}.items():
            rr, cc = r + dr, c + dc
            while 0 <= rr < g and 0 <= cc < g and (rr, cc) not in where:  # walk past dropped patches
                rr, cc = rr + dr, cc + dc
            if (rr, cc) in where:
                out[(rr, cc)] = where[(rr, cc)]
        return out

    p = {}
    for u, iu in where.items():
        nbrs = neighbours(*u)
        s = torch.stack([q[iu] @ k[iv] / prior.cfg.sigma for iv in nbrs.values()]).softmax(0)
        p.update({(u, v): s[n] for n, v in enumerate(nbrs)})
    links = {}
    for (u, v), puv in p.items():
        fresh = (puv * p[(v, u)]).sqrt()
        links[(u, v)] = fresh if prev is None else prev[(u, v)] + (1 - prev[(u, v)]) * fresh
    return {"links": links, "where": where, "rows": rows, "cols": cols}


def brute_force_prior(b: dict) -> torch.Tensor:
    """C between kept patches: the larger product of links along the two one-turn paths through kept patches."""
    links, where, rows, cols = b["links"], b["where"], b["rows"], b["cols"]

    def along(cells):
        out = torch.tensor(1.0)
        for u, v in zip(cells, cells[1:]):
            out = out * links[(u, v)]
        return out

    def row_path(r, c1, c2):
        step = 1 if c2 >= c1 else -1
        return [(r, c) for c in cols[cols.index(c1)::step][: abs(cols.index(c2) - cols.index(c1)) + 1]]

    def col_path(c, r1, r2):
        step = 1 if r2 >= r1 else -1
        return [(r, c) for r in rows[rows.index(r1)::step][: abs(rows.index(r2) - rows.index(r1)) + 1]]

    n = len(where)
    c_mat = torch.ones(n + 1, n + 1)  # CLS first: C = 1 to and from it
    for (r1, c1), i in where.items():
        for (r2, c2), j in where.items():
            path_1 = along(row_path(r1, c1, c2)) * along(col_path(c2, r1, r2))
            path_2 = along(col_path(c1, r1, r2)) * along(row_path(r2, c1, c2))
            c_mat[i + 1, j + 1] = torch.maximum(path_1, path_2)
    return c_mat


def test_group_prior_on_kept_patches_is_the_brute_force_prior():
    tower = hier_tower(0.5, grid=6, layers=2)
    calls, kept = [], {}
    for block in tower.transformer.blocks:
        block.prior.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
    drop = tower.drop_patches
    tower.drop_patches = lambda x: kept.setdefault("out", drop(x))
    torch.manual_seed(3)
    with torch.no_grad():
        tower(torch.randn(2, 3, 48, 48))
    _, grid, keep = kept["out"]
    assert grid == (4, 4) and len(calls) == 2
    for s in range(2):
        prev = None
        for module, x, (_, prior) in calls:
            brute = brute_force_links(module, x[s], keep[s], 6, prev)
            expected = brute_force_prior(brute)
            torch.testing.assert_close(prior.log_prior()[s].exp(), expected, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(prior.prior_reference()[s], expected, rtol=1e-4, atol=1e-6)
            prev = brute["links"]
        assert expected.min() < 0.5  # the priors are not trivially all ones


def test_roi_align_over_kept_patches():
    g, width = 4, 8
    regions = RegionTokens("boxes", width, g, feature_dim=12)
    patches = torch.randn(1, g * g, width)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.5, 0.75], [0.3, 0.3, 0.7, 0.7]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain = regions._roi_tokens(patches, boxes, mask)
    every = torch.arange(g * g)[None]
    torch.testing.assert_close(regions._roi_tokens(patches, boxes, mask, keep=every), plain)
    keep = torch.tensor([[0, 3, 9, 15]])  # (0,0), (0,3), (2,1), (3,3)
    got = regions._roi_tokens(patches[:, keep[0]], boxes, mask, keep=keep)
    # The whole view: the mean of the kept patches (ROI-align's samples weigh the cells equally here).
    torch.testing.assert_close(got[0, 0], patches[0, keep[0]].mean(0))
    # The box over cell (2, 1) alone: exactly that kept patch.
    torch.testing.assert_close(got[0, 1], patches[0, 9])
    # Between kept cells: a convex combination of kept patches only, not of the dropped cells under the box.
    weights = torch.linalg.lstsq(patches[0, keep[0]].T, got[0, 2, :, None]).solution[:, 0]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert (weights > -1e-4).all()


@pytest.mark.parametrize("section,kwargs,message", [
    (VisionConfig, dict(checkpointing="all"), "checkpointing must be one of none, blocks, every_k, got 'all'"),
    (TextConfig, dict(checkpointing="every_k", checkpoint_every=0), "checkpoint_every must be ≥ 1, got 0"),
    (VisionConfig, dict(patch_dropout=1.0), r"patch_dropout must be in \[0, 1\), got 1.0"),
])
def test_lever_config_checks(section, kwargs, message):
    with pytest.raises(ValueError, match=message):
        section(**kwargs)


def test_levers_do_not_change_the_parameters():
    torch.manual_seed(0)
    names = [n for n, _ in CLIP(small_config("hier")).named_parameters()]
    torch.manual_seed(0)
    assert names == [n for n, _ in CLIP(with_levers(small_config("hier"), "blocks", 0.5)).named_parameters()]
