"""Hierarchy-aware attention: the efficient CPU path against the reference, gradcheck, dispatch, and training."""
import copy
import dataclasses
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.clip import CLIP
from model.config import PRESETS, HierConfig
from model.hier_attention import hier_attention, reference_attention, resolve_impl, sdpa_attention
from model.hier_prior import GroupPrior, TreePrior
from model.losses import LossConfig, compute_loss

REPO_ROOT = Path(__file__).resolve().parents[2]

# name: (prior factory, tokens, padding lengths or None, causal)
CASES = {
    "text_causal_padded": (lambda cfg: TreePrior(32, cfg=cfg), 13, [13, 9, 4], True),
    "text_bidirectional_padded": (lambda cfg: TreePrior(32, cfg=cfg), 13, [13, 9, 4], False),
    "text_causal_unpadded": (lambda cfg: TreePrior(32, cfg=cfg), 13, None, True),
    "vision_cls_grid": (lambda cfg: GroupPrior(32, grid=(4, 3), has_cls=True, cfg=cfg), 13, None, False),
    "vision_no_cls": (lambda cfg: GroupPrior(32, grid=(3, 5), has_cls=False, cfg=cfg), 15, None, False),
}


def padding(lengths, n):
    return None if lengths is None else torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def forward_backward(attend, module, x, q, k, v, pad, causal, seed=1):
    """Output and gradients w.r.t. q, k, v, the block input x, and the prior's parameters (two layers deep)."""
    module.zero_grad()
    x, q, k, v = (t.detach().clone().requires_grad_() for t in (x, q, k, v))
    links, _ = module(x, None, pad)
    _, prior = module(x.flip(1), links, pad)  # a second layer: the non-splittable update is on the path
    out = attend(q, k, v, prior, causal=causal)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)  # same in fp64
    (out * weights).sum().backward()
    return {"out": out, "q": q.grad, "k": k.grad, "v": v.grad, "x": x.grad,
            **{name: p.grad.clone() for name, p in module.named_parameters()}}


def assert_relative_close(got: dict, want: dict, tol: float, context: str = ""):
    for name in want:
        err = (got[name].float() - want[name]).abs().max() / want[name].abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e} {context}"


def random_inputs(n, heads=3, head_dim=16, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 32, generator=g)
    q, k, v = torch.randn(3, batch, heads, n, head_dim, generator=g).unbind(0)
    return x, q, k, v


def check_against_reference(attend, case: str, mode: str, seed: int) -> None:
    """Forward and gradients (q, k, v, block input, prior parameters) within 1e-4 relative, fp32."""
    make, n, lengths, causal = CASES[case]
    torch.manual_seed(seed)
    module = make(HierConfig(prior_mode=mode, sigma=4.0))  # σ small enough that links move away from 1/2
    x, q, k, v = random_inputs(n, seed=seed)
    pad = padding(lengths, n)
    want = forward_backward(reference_attention, module, x, q, k, v, pad, causal)
    got = forward_backward(attend, module, x, q, k, v, pad, causal)
    assert_relative_close(got, want, 1e-4, f"({case}, {mode}, seed {seed})")


def check_fp16_over_several_tiles(attend, mode: str) -> None:
    """77 tokens over 64-wide tiles (a partial second tile, causal tile skipping) with fp16 q, k, v."""
    torch.manual_seed(0)
    module = TreePrior(32, cfg=HierConfig(prior_mode=mode, sigma=4.0))
    x, q, k, v = random_inputs(77, batch=2, heads=2, head_dim=24)
    q, k, v = (t.half().float() for t in (q, k, v))  # the reference sees the same rounded inputs
    pad = padding([77, 30], 77)
    want = forward_backward(reference_attention, module, x, q, k, v, pad, True)
    got = forward_backward(attend, module, x, q.half(), k.half(), v.half(), pad, True)
    assert got["out"].dtype == got["q"].dtype == torch.float16
    assert_relative_close(got, want, 5e-3, f"(fp16, {mode})")


def check_saturated_prior(attend, kind: str, mode: str, dtype=torch.float32) -> None:
    """A first layer whose neighbour scores are ~300 apart (softmaxes saturate, links exactly 0 or 1 in fp32),
    under a second, ordinary one. Output and every gradient (q, k, v, block input, both priors' parameters)
    finite; those of the output, q, k, v, the input and the second prior equal to float64's."""
    from tests.unit.test_hier_prior import _saturating_inputs

    torch.manual_seed(0)
    cfg = HierConfig(prior_mode=mode, sigma=4.0)
    if kind == "text":
        make, n, pad, causal = (lambda: TreePrior(32, cfg=cfg)), 13, padding([13, 9], 13), True
    else:
        make, n, pad, causal = (lambda: GroupPrior(32, grid=(4, 3), has_cls=True, cfg=cfg)), 13, None, False
    saturated, ordinary = make(), make()
    x = _saturating_inputs(saturated, n)
    _, q, k, v = random_inputs(n, batch=2)
    with torch.no_grad():
        links, _ = saturated(x, None, pad)
    flat = torch.cat([t.flatten() for t in (links if kind == "vision" else (links,))])
    assert (flat == 0).any() and (flat == 1).any(), "the inputs must saturate links to exactly 0 and 1 in fp32"

    def run(modules, x, q, k, v):
        first, second = modules
        for module in modules:
            module.zero_grad()
        x, q, k, v = (t.detach().clone().requires_grad_() for t in (x, q, k, v))
        links, _ = first(x, None, pad)
        _, prior = second(x.flip(1), links, pad)
        out = attend(q, k, v, prior, causal=causal)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        (out * weights).sum().backward()
        grads = {"out": out, "q": q.grad, "k": k.grad, "v": v.grad, "x": x.grad}
        grads.update({f"second.{name}": p.grad.clone() for name, p in second.named_parameters()})
        return grads, {name: p.grad.clone() for name, p in first.named_parameters()}

    modules_64 = [copy.deepcopy(m).double() for m in (saturated, ordinary)]
    want, _ = run(modules_64, x.double(), q.double(), k.double(), v.double())
    got, first_grads = run([saturated, ordinary], x, *(t.to(dtype) for t in (q, k, v)))
    for name, value in {**got, **first_grads}.items():
        assert torch.isfinite(value).all(), f"{name}: {(~torch.isfinite(value)).sum()} non-finite ({kind}, {mode})"
    assert all(torch.isfinite(value).all() for value in want.values())
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert_relative_close(got, {name: value.float() for name, value in want.items()}, tolerance,
                          f"(saturated, {kind}, {mode}, {dtype})")


@pytest.mark.parametrize("mode", ["multiply", "bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_path_matches_reference(case, mode):
    check_against_reference(sdpa_attention, case, mode, seed=torch.seed() % 2**31)  # fresh inputs each run


@pytest.mark.parametrize("mode", ["multiply", "bias"])
def test_sdpa_path_in_bfloat16(mode):
    """bf16 q, k, v (the prior stays fp32): the output is as close to fp32 as bf16 rounding allows."""
    torch.manual_seed(0)
    module = GroupPrior(32, grid=(4, 3), has_cls=True, cfg=HierConfig(prior_mode=mode, sigma=4.0))
    x, q, k, v = random_inputs(13)
    q, k, v = (t.bfloat16().float() for t in (q, k, v))
    _, prior = module(x, None, None)
    want = reference_attention(q, k, v, prior, causal=False)
    got = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), prior, causal=False)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() / want.abs().max() < 2e-2


def _check_triton_against_reference(seed: int) -> None:
    """Runs in a fresh interpreter with TRITON_INTERPRET=1 (triton reads the flag when kernels are defined)."""
    from model.kernels.hier_attention_triton import triton_attention

    for mode in ("multiply", "bias"):
        for case in CASES:
            check_against_reference(triton_attention, case, mode, seed)
        check_fp16_over_several_tiles(triton_attention, mode)


def _check_triton_packed_qkv() -> None:
    """q, k, v as the transformer passes them: views of one packed qkv, strides (3NW, hd, 3W, 1).

    The gradients must be written with their own strides, not the views': with q's strides the writes of dq
    run past a tight buffer (glibc aborted with heap corruption before the fix).
    """
    from model.kernels.hier_attention_triton import triton_attention

    heads, head_dim = 2, 16
    for case in ("text_causal_padded", "vision_cls_grid"):
        make, n, lengths, causal = CASES[case]
        for mode in ("multiply", "bias"):
            torch.manual_seed(0)
            module = make(HierConfig(prior_mode=mode, sigma=4.0))
            with torch.no_grad():  # only q, k, v take gradients here
                _, prior = module(torch.randn(3, n, 32), None, padding(lengths, n))
            packed = torch.randn(3, n, 3 * heads * head_dim)
            grads = {}
            for name, attend in (("reference", reference_attention), ("triton", triton_attention)):
                qkv = packed.clone().requires_grad_()
                q, k, v = (t.transpose(1, 2) for t in qkv.view(3, n, 3, heads, head_dim).unbind(2))
                assert q.stride() == (3 * n * heads * head_dim, head_dim, 3 * heads * head_dim, 1)
                out = attend(q, k, v, prior, causal=causal)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                grads[name] = {"out": out.detach(), "qkv": qkv.grad}
            assert_relative_close(grads["triton"], grads["reference"], 1e-4, f"(packed qkv, {case}, {mode})")


def _check_triton_multiply_beyond_exp_range() -> None:
    """Multiply mode with β past 95 (three links of 1e-15): past 88.7, e^{log C} outside the sequence overflowed."""
    from model.constituent_prior import ConstituentPrior
    from model.hier_prior import break_cost, exclusive_cumsum
    from model.kernels.hier_attention_triton import triton_attention

    n = 20  # a partial tile: keys 20..63 lie outside the sequence
    links = torch.full((2, n - 1), 0.9)
    links[:, 5:15:4] = 1e-15
    beta = exclusive_cumsum(break_cost(links, None), dim=1)
    assert beta.max() > 95
    prior = ConstituentPrior("tree", "multiply", "triton", links, beta=beta)
    q, k, v = torch.randn(3, 2, 2, n, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    results = {}
    for name, attend in (("sdpa", sdpa_attention), ("triton", triton_attention)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, prior, causal=False)
        out.square().sum().backward()
        results[name] = {"out": out.detach(), **{key: t.grad for key, t in zip("qkv", leaves)}}
    for name, value in results["triton"].items():
        assert torch.isfinite(value).all(), f"{name}: {(~torch.isfinite(value)).sum()} non-finite entries"
    assert_relative_close(results["triton"], results["sdpa"], 1e-4, "(multiply, β = 95)")


def _check_triton_saturated_prior() -> None:
    from model.kernels.hier_attention_triton import triton_attention

    for kind in ("text", "vision"):
        for mode in ("multiply", "bias"):
            for dtype in (torch.float32, torch.bfloat16):
                check_saturated_prior(triton_attention, kind, mode, dtype)


def _run_interpreted(function: str, *args) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    code = f"import tests.unit.test_hier_attention as t; t.{function}{args!r}"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"exit code {result.returncode}: " + result.stderr[-4000:]


def test_triton_kernel_matches_reference_under_interpreter():
    _run_interpreted("_check_triton_against_reference", torch.seed() % 2**31)


def test_triton_kernel_with_packed_qkv_views_under_interpreter():
    _run_interpreted("_check_triton_packed_qkv")


def test_triton_multiply_mode_beyond_exp_range_under_interpreter():
    _run_interpreted("_check_triton_multiply_beyond_exp_range")


def test_triton_saturated_prior_under_interpreter():
    _run_interpreted("_check_triton_saturated_prior")


def test_interpreter_runs_the_gpu_tile_configuration():
    """The interpreter tests run the tiles a GPU runs: only the upcast of 16-bit inputs differs."""
    from model.kernels.hier_attention_triton import kernel_constants

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            gpu, interpreted = (kernel_constants(dtype, head_dim, "group", "multiply", False, False, True, (14, 14),
                                                 interpreting) for interpreting in (False, True))
            assert {key for key in gpu if gpu[key] != interpreted[key]} <= {"UPCAST"}
            assert gpu["PRECISION"] == ("ieee" if dtype == torch.float32 else "tf32")  # no TF32 on fp32 inputs


def test_multiply_is_not_renormalised_and_bias_is():
    torch.manual_seed(0)
    x, q, k, _ = random_inputs(9)
    ones = torch.ones(3, 3, 9, 16)
    for mode, expect_unit_rows in (("multiply", False), ("bias", True)):
        _, prior = TreePrior(32, cfg=HierConfig(prior_mode=mode, sigma=1.0))(x, None, None)
        row_sums = sdpa_attention(q, k, ones, prior, causal=False)[..., 0]  # V = 1 gives the row sums of the weights
        assert torch.allclose(row_sums, torch.ones_like(row_sums)) == expect_unit_rows
        assert (row_sums <= 1 + 1e-6).all()


@pytest.mark.parametrize("impl", ["reference", "sdpa"])  # sdpa's multiply mode has a hand-written backward
@pytest.mark.parametrize("mode", ["multiply", "bias"])
@pytest.mark.parametrize("kind", ["text", "vision"])
def test_gradcheck_float64(kind, mode, impl):
    torch.manual_seed(0)
    cfg = HierConfig(prior_mode=mode, sigma=1.0)
    if kind == "text":
        module, n, pad, causal = TreePrior(8, cfg=cfg).double(), 5, padding([5, 3], 5), True
    else:
        module, n, pad, causal = GroupPrior(8, grid=(2, 2), has_cls=True, cfg=cfg).double(), 5, None, False
    x = torch.randn(2, n, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def layer(x, q, k, v):
        links, _ = module(x, None, pad)
        _, prior = module(x * 0.5, links, pad)
        attend = reference_attention if impl == "reference" else sdpa_attention
        return attend(q, k, v, prior, causal=causal)

    assert torch.autograd.gradcheck(layer, (x, q, k, v))


def test_auto_picks_sdpa_on_cpu_and_logs_it_once(caplog):
    torch.manual_seed(0)
    x, q, k, v = random_inputs(9)
    _, prior = TreePrior(32, cfg=HierConfig(attn_impl="auto"))(x, None, None)
    with caplog.at_level(logging.INFO, logger="hiclip.model"):
        from model import hier_attention as module

        module._log_pick.cache_clear()
        out = hier_attention(q, k, v, prior, causal=True)
        hier_attention(q, k, v, prior, causal=True)
    picks = [r.getMessage() for r in caplog.records if "picked" in r.getMessage()]
    assert picks == [picks[0]] and "sdpa" in picks[0]
    torch.testing.assert_close(out, sdpa_attention(q, k, v, prior, causal=True))
    with pytest.raises(ValueError, match="attn_impl"):
        hier_attention(q, k, v, prior._replace(impl="fast"), causal=True)
    # Attention dropout: SDPA implements it for bias; multiply falls back to the reference.
    assert resolve_impl("auto", "bias", q, 0.1) == "sdpa" and resolve_impl("auto", "multiply", q, 0.1) == "reference"
    assert resolve_impl("reference", "multiply", q, 0.0) == "reference"


def hier_tiny():
    base = PRESETS["tiny"]
    return dataclasses.replace(base, vision=dataclasses.replace(base.vision, attention="hier"),
                               text=dataclasses.replace(base.text, attention="hier"))


@pytest.mark.parametrize("causal", [True, False])
def test_hier_text_tower_ignores_tokens_after_eot(causal):
    """Links to padding are 0 and padded keys are masked: whatever follows EOT cannot reach the EOT embedding."""
    torch.manual_seed(0)
    cfg = hier_tiny()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, causal=causal))
    model = CLIP(cfg).eval()
    text = torch.zeros(1, 77, dtype=torch.long)
    text[0, :6] = torch.tensor([49406, 320, 1929, 525, 320, 49407])
    garbage = text.clone()
    garbage[0, 6:] = 123
    torch.testing.assert_close(model.encode_text(text), model.encode_text(garbage))


def test_tiny_clip_with_hier_towers_trains():
    torch.manual_seed(0)
    model = CLIP(hier_tiny())
    assert all(block.prior is not None for block in model.visual.transformer.blocks)
    assert all(block.prior is not None for block in model.text.transformer.blocks)
    images = torch.randn(8, 3, 64, 64)
    text = torch.zeros(8, 77, dtype=torch.long)
    for i in range(8):
        n = 4 + i
        text[i, 0], text[i, 1:n - 1], text[i, n - 1] = 49406, torch.randint(1, 49000, (n - 2,)), 49407
    loss_cfg = LossConfig(kind="clip", label_smoothing=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        out = model({"image": images, "text": text})
        loss, _ = compute_loss(loss_cfg, {"global": out["global"]}, {"caption": out["caption"]}, {},
                               out["logit_scale"], gather=False)
        optimizer.zero_grad()
        loss.backward()
        prior_grad = model.text.transformer.blocks[0].prior.w_q.grad
        assert prior_grad is not None and prior_grad.abs().sum() > 0  # the priors learn too
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("case", ["text_causal_padded", "vision_cls_grid"])
@pytest.mark.parametrize("mode", ["multiply", "bias"])
def test_packed_entry_point_matches_the_reference(case, mode):
    """The block's entry (hier_attention_packed on the [B, N, 3, H, D] projection, as a strided view of a wider
    tensor) returns [B, N, H, D] and the projection's gradient as the reference over unpacked q, k, v does."""
    from model.hier_attention import hier_attention_packed

    make, n, lengths, causal = CASES[case]
    torch.manual_seed(0)
    module = make(HierConfig(prior_mode=mode, sigma=4.0, attn_impl="sdpa"))
    x = torch.randn(3, n, 32)
    _, prior = module(x, None, padding(lengths, n))
    wide = torch.randn(3, n, 3 * 32 + 5, requires_grad=True)  # the qkv slice has a row stride of 101
    weights = torch.randn(3, n, 2, 16)
    got_out = hier_attention_packed(wide[..., :96].view(3, n, 3, 2, 16), prior, causal=causal)
    (got_out * weights).sum().backward(retain_graph=True)
    got_grad, wide.grad = wide.grad.clone(), None
    q, k, v = (t.transpose(1, 2) for t in wide[..., :96].view(3, n, 3, 2, 16).unbind(2))
    want_out = reference_attention(q, k, v, prior, causal=causal).transpose(1, 2)
    (want_out * weights).sum().backward()
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, wide.grad, rtol=1e-5, atol=1e-5)
    assert got_grad[..., 96:].abs().max() == 0  # the columns beside qkv get no gradient
