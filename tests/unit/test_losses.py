"""Contrastive losses: tiled and Triton match dense, and all of them match straightforward references."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config_tree import build
from model.losses import (
    AUTO_TILED_MIN_LOGITS,
    IMAGE_LEVELS,
    TEXT_LEVELS,
    LossConfig,
    _resolve_impl,
    compute_loss,
    gather_with_grad,
    info_nce,
    row_logsumexp,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _embeddings(n: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=gen, dtype=dtype), dim=-1)


def _reference_info_nce(rows, cols, scale, valid, row_offset, alpha):
    """Row by row: log_softmax over the valid columns against an explicit target vector."""
    kept = valid.nonzero().flatten().tolist()
    total = 0.0
    for i in range(rows.shape[0]):
        positive = row_offset + i
        if positive not in kept:
            continue
        logits = scale * (cols[kept] @ rows[i])
        target = torch.full((len(kept),), alpha / (len(kept) - 1) if len(kept) > 1 else 0.0, dtype=rows.dtype)
        target[kept.index(positive)] = 1.0 - alpha if len(kept) > 1 else 1.0
        total = total - (target * logits.log_softmax(0)).sum()
    return total


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_info_nce_matches_row_by_row_reference(impl, alpha, masked):
    rows, cols = _embeddings(9, 16, seed=1), _embeddings(23, 16, seed=2)
    scale = torch.tensor([7.0], dtype=torch.float64)
    valid = torch.ones(23, dtype=torch.bool)
    if masked:
        valid = torch.rand(23, generator=torch.Generator().manual_seed(3)) > 0.4
    valid[5] = False  # row 0 of this shard (offset 5) is a missing sample
    got = info_nce(rows, cols, scale, valid=valid, row_offset=5, alpha=alpha, impl=impl, tile_size=4)
    torch.testing.assert_close(got, _reference_info_nce(rows, cols, scale, valid, 5, alpha), rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("masked", [False, True])
def test_tiled_matches_dense_value_and_gradients_fp32(alpha, masked):
    batch, total, dim = 200, 333, 48  # not multiples of the tile: ragged last blocks
    rows = _embeddings(batch, dim, seed=4, dtype=torch.float32)
    cols = _embeddings(total, dim, seed=5, dtype=torch.float32)
    valid = (torch.rand(total, generator=torch.Generator().manual_seed(6)) > 0.25) if masked else None
    results = {}
    for impl in ("dense", "tiled"):
        leaves = [rows.clone().requires_grad_(), cols.clone().requires_grad_(),
                  torch.tensor([20.0], requires_grad=True)]
        loss = info_nce(*leaves, valid=valid, row_offset=100, alpha=alpha, impl=impl, tile_size=64)
        results[impl] = (loss, *torch.autograd.grad(loss, leaves))
    for dense, tiled in zip(results["dense"], results["tiled"]):
        assert _relative_error(tiled, dense) <= 1e-5
    if masked:  # masked columns are constants: exactly zero gradient
        assert torch.all(results["tiled"][2][~valid] == 0) and torch.all(results["dense"][2][~valid] == 0)


def test_tiled_gradcheck_fp64():
    rows, cols = _embeddings(6, 5, seed=7).requires_grad_(), _embeddings(11, 5, seed=8).requires_grad_()
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    valid = torch.ones(11, dtype=torch.bool)
    valid[[2, 9]] = False
    assert torch.autograd.gradcheck(
        lambda x, y, s: info_nce(x, y, s, valid=valid, row_offset=3, alpha=0.2, impl="tiled", tile_size=4),
        (rows, cols, scale))


def test_no_valid_column_gives_zero_loss_and_finite_gradients():
    for impl in ("dense", "tiled"):
        rows, cols = _embeddings(4, 8, seed=9).requires_grad_(), _embeddings(8, 8, seed=10).requires_grad_()
        loss = info_nce(rows, cols, torch.tensor([5.0], dtype=torch.float64), valid=torch.zeros(8, dtype=torch.bool),
                        impl=impl, alpha=0.2)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.all(rows.grad == 0) and torch.all(cols.grad == 0)


def test_row_logsumexp_of_fully_masked_rows_is_a_constant():
    # Called directly (not through info_nce, which zeroes such rows), the masked logits must still get no
    # gradient, exactly as the dense masked_fill gives.
    for impl in ("dense", "tiled"):
        rows, cols = _embeddings(5, 8, seed=12).requires_grad_(), _embeddings(7, 8, seed=13).requires_grad_()
        scale = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
        lse = row_logsumexp(rows, cols, scale, torch.zeros(7, dtype=torch.bool), impl=impl, tile_size=3)
        lse.sum().backward()
        assert torch.isfinite(lse).all()
        assert torch.all(rows.grad == 0) and torch.all(cols.grad == 0) and torch.all(scale.grad == 0)


def _clip_inputs(batch=12, dim=16, seed=11):
    return {"global": _embeddings(batch, dim, seed)}, {"caption": _embeddings(batch, dim, seed + 1)}


def test_clip_loss_is_symmetric_cross_entropy_with_torch_label_smoothing():
    image, text = _clip_inputs()
    scale = torch.tensor([10.0], dtype=torch.float64)
    logits = scale * image["global"] @ text["caption"].T
    labels = torch.arange(logits.shape[0])
    for alpha in (0.0, 0.2):
        # torch spreads ε over all N classes, the positive included: ε = α·N/(N−1) gives our target.
        eps = alpha * logits.shape[0] / (logits.shape[0] - 1)
        expected = (F.cross_entropy(logits, labels, label_smoothing=eps)
                    + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2
        for impl in ("dense", "tiled"):
            cfg = LossConfig(kind="clip", impl=impl, label_smoothing=alpha, tile_size=5)
            loss, metrics = compute_loss(cfg, image, text, {}, scale, gather=False)
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(metrics["loss/global_caption"], expected, rtol=1e-12, atol=0)


def _pyramid_inputs(batch=16, dim=16):
    image = {level: _embeddings(batch, dim, seed=20 + k) for k, level in enumerate(IMAGE_LEVELS)}
    text = {level: _embeddings(batch, dim, seed=30 + k) for k, level in enumerate(TEXT_LEVELS)}
    return image, text


def test_pyramid_with_identical_levels_is_clip():
    image, text = _clip_inputs()
    image_all = {level: image["global"] for level in IMAGE_LEVELS}
    text_all = {level: text["caption"] for level in TEXT_LEVELS}
    scale = torch.tensor([10.0], dtype=torch.float64)
    for alpha in (0.0, 0.2):
        clip, _ = compute_loss(LossConfig(kind="clip", label_smoothing=alpha), image, text, {}, scale, gather=False)
        pyramid, _ = compute_loss(LossConfig(kind="pyramid", label_smoothing=alpha), image_all, text_all, {}, scale,
                                  gather=False)
        torch.testing.assert_close(pyramid, clip, rtol=1e-12, atol=0)


def _subset_term(image_emb, text_emb, keep, scale, alpha):
    """A masked term computed the obvious way: drop the missing samples, then plain symmetric smoothed CLIP."""
    x, y = image_emb[keep], text_emb[keep]
    n = x.shape[0]
    every = torch.ones(n, dtype=torch.bool)
    image_to_text = _reference_info_nce(x, y, scale, every, 0, alpha)
    text_to_image = _reference_info_nce(y, x, scale, every, 0, alpha)
    return (image_to_text + text_to_image) / (2 * n)


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_pyramid_matches_weighted_terms_on_subsets(impl):
    image, text = _pyramid_inputs()
    gen = torch.Generator().manual_seed(40)
    masks = {level: torch.rand(16, generator=gen) > 0.3 for level in ("region", "summary", "objects")}
    ones = torch.ones(16, dtype=torch.bool)
    scale, alpha = torch.tensor([9.0], dtype=torch.float64), 0.2
    cfg = LossConfig(kind="pyramid", impl=impl, label_smoothing=alpha, lambda_global=0.25, mu_local=0.35, tile_size=5)
    loss, metrics = compute_loss(cfg, image, text, masks, scale, gather=False)

    def term(image_level, text_level):
        keep = masks.get(image_level, ones) & masks.get(text_level, ones)
        value = _subset_term(image[image_level], text[text_level], keep, scale, alpha)
        torch.testing.assert_close(metrics[f"loss/{image_level}_{text_level}"], value, rtol=1e-12, atol=0)
        return value

    peer = (term("global", "summary") + term("local", "caption")) / 2
    cross_global = (term("global", "objects") + term("region", "summary")) / 2
    cross_local = (term("local", "objects") + term("region", "caption")) / 2
    expected = (1 - 0.25 - 0.35) * peer + 0.25 * cross_global + 0.35 * cross_local
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_pyramid_terms_without_pairs_drop_and_weights_renormalise():
    image, text = _pyramid_inputs()
    scale = torch.tensor([9.0], dtype=torch.float64)
    cfg = LossConfig(kind="pyramid", impl="dense", label_smoothing=0.2)
    none = torch.zeros(16, dtype=torch.bool)

    # Only (local, caption) survives: it is the whole loss, not a third of a half of it.
    only_caption = {"region": none, "summary": none, "objects": none}
    loss, metrics = compute_loss(cfg, image, text, only_caption, scale, gather=False)
    torch.testing.assert_close(loss, metrics["loss/local_caption"], rtol=1e-12, atol=0)
    assert metrics["pairs/global_summary"] == 0 and metrics["pairs/local_caption"] == 16

    # No objects: each cross group keeps its region term alone; the peer group is whole.
    loss, metrics = compute_loss(cfg, image, text, {"objects": none}, scale, gather=False)
    expected = (metrics["loss/global_summary"] + metrics["loss/local_caption"]) / 2 / 3 \
        + metrics["loss/region_summary"] / 3 + metrics["loss/region_caption"] / 3
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_pyramid_loss_backward_reaches_every_present_level():
    image, text = _pyramid_inputs()
    leaves = {level: emb.clone().requires_grad_() for level, emb in {**image, **text}.items()}
    scale = torch.tensor([9.0], dtype=torch.float64, requires_grad=True)
    masks = {"summary": torch.zeros(16, dtype=torch.bool)}
    loss, _ = compute_loss(LossConfig(kind="pyramid", impl="tiled", tile_size=6),
                           {lvl: leaves[lvl] for lvl in IMAGE_LEVELS}, {lvl: leaves[lvl] for lvl in TEXT_LEVELS},
                           masks, scale, gather=False)
    loss.backward()
    assert torch.all(leaves["summary"].grad == 0)  # every term using it dropped out
    assert all(leaves[level].grad.abs().sum() > 0 for level in leaves if level != "summary")
    assert scale.grad.shape == (1,) and scale.grad.abs() > 0


def test_missing_level_and_bad_config_raise():
    image, text = _clip_inputs()
    with pytest.raises(KeyError, match="summary"):
        compute_loss(LossConfig(kind="pyramid"), {**image, "local": image["global"], "region": image["global"]},
                     {**text, "objects": text["caption"]}, {}, torch.tensor([1.0]), gather=False)
    with pytest.raises(ValueError, match="impl"):  # choices are checked where data enters: the builder
        build(LossConfig, {"impl": "flash"})
    with pytest.raises(ValueError, match="lambda_global"):
        LossConfig(lambda_global=0.8, mu_local=0.3)


def test_auto_impl_and_gather_without_distributed():
    small, big = torch.zeros(8, 4), torch.zeros(AUTO_TILED_MIN_LOGITS // 8, 4)
    assert _resolve_impl("auto", small, small) == "dense"
    assert _resolve_impl("auto", small, big) == "tiled"  # CPU tensors: the PyTorch tile loop
    assert _resolve_impl("dense", small, big) == "dense"
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def _check_triton_against_dense() -> None:
    """Runs in a fresh interpreter with TRITON_INTERPRET=1 (the flag is read when kernels are defined)."""
    from model.kernels.contrastive_triton import _column_splits

    torch.manual_seed(0)
    # Ragged against the blocks a GPU runs too (32 fp32, 64 bf16), in every dimension; the columns split, merged.
    assert _column_splits(150, 300, 32) == (10, 32) and _column_splits(150, 300, 64) == (5, 64)
    for alpha, masked, dtype in ((0.0, False, torch.float32), (0.2, True, torch.float32), (0.2, True, torch.bfloat16)):
        batch, total, dim = 150, 300, 96
        rows = F.normalize(torch.randn(batch, dim), dim=-1).to(dtype)
        cols = F.normalize(torch.randn(total, dim), dim=-1).to(dtype)
        valid = torch.rand(total) > 0.3 if masked else None
        results = {}
        for impl in ("dense", "triton"):
            leaves = [rows.clone().requires_grad_(), cols.clone().requires_grad_(),
                      torch.tensor([14.0], requires_grad=True)]
            loss = info_nce(*leaves, valid=valid, row_offset=100, alpha=alpha, impl=impl)
            results[impl] = [t.float() for t in (loss, *torch.autograd.grad(loss, leaves))]
        # bf16 embeddings: both paths upcast to fp32; only the bf16 rounding of the returned gradients differs.
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        for name, dense, triton_value in zip(("loss", "rows", "cols", "scale"), results["dense"], results["triton"]):
            error = _relative_error(triton_value, dense)
            assert error <= tolerance, f"{name} ({dtype}, alpha={alpha}, masked={masked}): relative error {error:.2e}"
    # No valid column at all: a finite constant, as in the dense path.
    leaves = [rows.float().requires_grad_(), cols.float().requires_grad_(), torch.tensor([14.0], requires_grad=True)]
    lse = row_logsumexp(*leaves, torch.zeros(total, dtype=torch.bool), impl="triton")
    lse.sum().backward()
    assert torch.isfinite(lse).all() and all(torch.all(leaf.grad == 0) for leaf in leaves)


def test_triton_kernel_matches_dense_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    code = "import tests.unit.test_losses as t; t._check_triton_against_dense()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
