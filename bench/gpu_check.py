"""First run on a GPU: everything this repo has only proven on CPU, checked in one process (≤ 8 min on one
A100 / H100 / H200), ending with one JSON line.

    python bench/gpu_check.py [--budget-s 420] [--out gpu_check.json]

Sections (each guarded: a failure is recorded in the JSON and the next section runs; none runs past the budget):
- `hier_attention`: the Triton hierarchy-aware kernels against the float64 sdpa path (errors of the output and
  of every input gradient: q, k, v and the prior's tables) at N = 50, 197, 577 (vision Group prior with CLS,
  ViT-B/32 and B/16 at 224², B/16 at 384²) and N = 77 (text Tree prior, causal, padded), fp32 and bf16, both
  prior modes; forward + backward time and peak memory of Triton, the sdpa path and vanilla SDPA (no prior;
  FlashAttention-2 on CUDA for bf16), achieved TFLOP/s. Width 768, 12 heads of 64 (ViT-B).
- `zero3_train` (below) runs second, with TRAIN_RESERVE_S of the budget kept for it.
- `contrastive`: the Triton log-sum-exp kernels against the dense path at 16k and 64k columns (1,024 local
  rows, width 512), fp32 and bf16: errors, time, peak memory.
- `flash_attn`: the flash-attn path of model/attention.py against SDPA, if flash_attn imports.
- `zero3_train`: 30 steps of a ViT-B/16 HiCLIP × PyramidCLIP (recipes/configs/hiclip_pyramid_b16.yaml) with
  DeepSpeed ZeRO-3, bf16, NCCL (a world of one) on synthetic shards through the real loader: loss finite and
  falling, samples/s, MFU against the device's bf16 peak, peak memory against `--dry-run`'s model states.
Without CUDA the GPU sections are named in `skipped` and the rest (config, dry run, shards) still runs, which
is what tests/unit/test_gpu_check.py checks. `--tiny` swaps in the tiny preset and 4 steps (a smoke test).

Pass criteria (the `checks` object; exit code 1 if one fails or a section errors): kernel errors ≤ 1e-4
relative in fp32 and ≤ 2e-2 in bf16; Triton ≤ 1.3× vanilla SDPA at N = 197 (fwd + bwd, bf16); the ZeRO-3 run
completes with a finite, falling loss.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
HEADS, HEAD_DIM = 12, 64
# tokens: (kind, batch, grid or text length): about 10-30k tokens per call, as in a B/16 training step
ATTENTION_CASES = {50: ("group", 128, 7), 197: ("group", 64, 14), 577: ("group", 16, 24), 77: ("tree", 128, 77)}
RATIO_LIMIT_197 = 1.3
TRAIN_RESERVE_S = 200  # the attention cases stop while this much of the budget is left for the ZeRO-3 run


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def cuda_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_memory(fn) -> int:
    """Bytes allocated by one call of fn() above what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------------------------------
# Hierarchy-aware attention


def make_prior(kind: str, batch: int, size: int, mode: str, device):
    """A prior from the real modules on random tokens (σ = 4: links well away from 1/2), with its leaves."""
    from model.config import HierConfig
    from model.hier_prior import GroupPrior, TreePrior

    torch.manual_seed(0)
    cfg = HierConfig(prior_mode=mode, sigma=4.0)
    if kind == "group":
        module, n, pad = GroupPrior(64, grid=(size, size), has_cls=True, cfg=cfg), size * size + 1, None
    else:
        n = size
        lengths = torch.randint(8, n + 1, (batch,))
        lengths[0] = n
        module, pad = TreePrior(64, cfg=cfg), torch.arange(n)[None, :] >= lengths[:, None]
        pad = pad.to(device)
    module = module.to(device)
    with torch.no_grad():
        _, prior = module(torch.randn(batch, n, 64, device=device), None, pad)
    return prior, n


def prior_leaves(prior, dtype):
    """The prior with its tables as fresh leaves of `dtype` (the gradients the check compares)."""
    if prior.kind == "tree":
        beta = prior.beta.detach().to(dtype).requires_grad_()
        return prior._replace(beta=beta), [beta]
    row, col = (t.detach().to(dtype).requires_grad_() for t in (prior.row_cost, prior.col_cost))
    return prior._replace(row_cost=row, col_cost=col), [row, col]


def attention_case(n_tokens: int, dtype: torch.dtype, mode: str, device) -> dict:
    from model.hier_attention import sdpa_attention
    from model.kernels.hier_attention_triton import triton_attention

    kind, batch, size = ATTENTION_CASES[n_tokens]
    prior, n = make_prior(kind, batch, size, mode, device)
    causal = kind == "tree"
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = torch.randn(3, batch, HEADS, n, HEAD_DIM, device=device, generator=g).unbind(0)
    weights = torch.randn(batch, HEADS, n, HEAD_DIM, device=device, generator=g)

    def run(attend, table_dtype, qkv_dtype):
        p, tables = prior_leaves(prior, table_dtype)
        leaves = [t.detach().to(qkv_dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, p, causal=causal)
        grads = torch.autograd.grad((out.float() * weights).sum(), [*leaves, *tables])
        return [out.detach(), *grads]

    # Reference: the sdpa path (tested equal to the readable reference) in float64, from the same rounded inputs.
    rounded = [t.to(dtype).double() for t in (q, k, v)]
    q64, k64, v64 = rounded
    p64, tables64 = prior_leaves(prior, torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    out64 = sdpa_attention(*leaves64, p64, causal=causal)
    want = [out64.detach(), *torch.autograd.grad((out64 * weights.double()).sum(), [*leaves64, *tables64])]
    del out64
    got = run(triton_attention, torch.float32, dtype)
    names = ["out", "dq", "dk", "dv", *(["dbeta"] if kind == "tree" else ["drow_cost", "dcol_cost"])]
    errors = {name: relative_error(a, b) for name, a, b in zip(names, got, want)}
    del got, want, leaves64, p64, tables64

    mask = None
    if prior.lengths is not None:  # vanilla attention with the same padding and causality, as the text tower
        from model.attention import build_mask

        mask = build_mask(torch.arange(n, device=device)[None, :] >= prior.lengths[:, None], causal, n, device)

    def vanilla():
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if mask is None:
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        out.float().mul(weights).sum().backward()

    def timed(attend):
        def call():
            p, tables = prior_leaves(prior, torch.float32)
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = attend(*leaves, p, causal=causal)
            out.float().mul(weights).sum().backward()
        return call

    variants = {"triton": timed(triton_attention), "sdpa_path": timed(sdpa_attention), "vanilla_sdpa": vanilla}
    seconds = {name: cuda_time(fn) for name, fn in variants.items()}
    memory = {name: peak_memory(fn) for name, fn in variants.items()}
    flops = 3.5 * 4 * batch * HEADS * n * n * HEAD_DIM * (0.5 if causal else 1.0)  # fwd 2 GEMMs, bwd 2.5×
    return {
        "kind": kind, "batch": batch, "tokens": n, "dtype": str(dtype)[6:], "mode": mode,
        "errors": errors, "max_error": max(errors.values()), "tolerance": TOLERANCE[dtype],
        "ms": {name: s * 1e3 for name, s in seconds.items()},
        "peak_mib": {name: b / 2**20 for name, b in memory.items()},
        "triton_over_vanilla": seconds["triton"] / seconds["vanilla_sdpa"],
        "triton_tflops": flops / seconds["triton"] / 1e12,
    }


def section_hier_attention(budget: Budget) -> dict:
    device = torch.device("cuda")
    results = []
    for n_tokens in ATTENTION_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("multiply", "bias"):
                if budget.left() < TRAIN_RESERVE_S + 20:
                    results.append({"tokens": n_tokens, "dtype": str(dtype)[6:], "mode": mode,
                                    "skipped": "time budget"})
                    continue
                results.append(attention_case(n_tokens, dtype, mode, device))
                torch.cuda.empty_cache()
    return {"cases": results}


# ---------------------------------------------------------------------------------------------------------------
# Contrastive kernels


def section_contrastive(budget: Budget) -> dict:
    from model.losses import MASKED_LOGIT, row_logsumexp  # noqa: F401  (MASKED_LOGIT: what the kernels mask to)

    device = torch.device("cuda")
    results = []
    for columns in (16_384, 65_536):
        for dtype in (torch.float32, torch.bfloat16):
            if budget.left() < 45:
                results.append({"columns": columns, "dtype": str(dtype)[6:], "skipped": "time budget"})
                continue
            g = torch.Generator(device=device).manual_seed(0)
            rows = F.normalize(torch.randn(1024, 512, device=device, generator=g), dim=-1).to(dtype)
            cols = F.normalize(torch.randn(columns, 512, device=device, generator=g), dim=-1).to(dtype)
            valid = torch.rand(columns, device=device, generator=g) > 0.1
            grad = torch.randn(1024, device=device, generator=g)

            def run(impl, compute_dtype=None):
                leaves = [t.detach().to(compute_dtype or dtype).requires_grad_() for t in (rows, cols)]
                leaves.append(torch.tensor(14.0, device=device, requires_grad=True))
                lse = row_logsumexp(*leaves, valid, impl=impl)
                return [lse.detach(), *torch.autograd.grad((lse * grad).sum(), leaves)]

            want = run("dense", torch.float64)  # float64 from the same rounded embeddings
            got = run("triton")
            errors = {name: relative_error(a, b) for name, a, b in zip(("lse", "rows", "cols", "scale"), got, want)}
            del want, got
            seconds = {impl: cuda_time(lambda: run(impl), repeats=5) for impl in ("triton", "dense", "tiled")}
            memory = {impl: peak_memory(lambda: run(impl)) for impl in ("triton", "dense", "tiled")}
            results.append({"rows": 1024, "columns": columns, "width": 512, "dtype": str(dtype)[6:],
                            "errors": errors, "max_error": max(errors.values()), "tolerance": TOLERANCE[dtype],
                            "ms": {k: s * 1e3 for k, s in seconds.items()},
                            "peak_mib": {k: b / 2**20 for k, b in memory.items()}})
            torch.cuda.empty_cache()
    return {"cases": results}


# ---------------------------------------------------------------------------------------------------------------
# flash-attn


def section_flash_attn(budget: Budget) -> dict:
    from model.attention import attention, flash_attn_available

    if not flash_attn_available():
        raise RuntimeError("unreachable: checked before")
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = torch.randn(3, 64, HEADS, 197, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16).unbind(0)
    out = {}
    for causal in (False, True):
        flash = attention(q, k, v, causal=causal)
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        out[f"causal={causal}"] = {"error": relative_error(flash, reference),
                                   "ms_flash": cuda_time(lambda: attention(q, k, v, causal=causal)) * 1e3,
                                   "ms_sdpa": cuda_time(lambda: F.scaled_dot_product_attention(
                                       q, k, v, is_causal=causal)) * 1e3}
    return out


# ---------------------------------------------------------------------------------------------------------------
# One-GPU DeepSpeed ZeRO-3 run through the real loader


def train_config(work: Path, tiny: bool, on_gpu: bool):
    """The B/16 HiCLIP × PyramidCLIP recipe, shortened to 30 steps on synthetic shards (tiny: the tiny preset)."""
    from data_pipeline.synthetic import make_shards
    from recipes.config import load_config

    steps, batch = (4, 8) if tiny else (30, 64)
    shards = make_shards(str(work / "shards"), num_shards=4, samples_per_shard=128,  # resampled: drawn again
                         image_size=64 if tiny else 96)
    spec = f"{work / 'shards'}/shard-{{0000..{len(shards) - 1:04d}}}.tar"
    overrides = [
        f"data.train_shards={spec}", "data.workers=2", "data.shuffle_buffer=64", f"data.pin_memory={on_gpu}",
        "data.resampled=true",
        f"train.steps={steps}", f"train.batch_size={batch}", "train.warmup_steps=3",
        "train.ds_config=ds_configs/zero3.json", "train.precision=bf16",
        f"checkpoint.dir={work / 'checkpoints'}", "checkpoint.every_steps=1000000", "checkpoint.keep_last=1",
        f"logging.dir={work / 'logs'}", f"logging.every_steps={max(1, steps // 6)}", "logging.wandb=false",
        "logging.progress=false", "eval.every_steps=0",
    ]
    if tiny:
        overrides += ["model.preset=tiny", "model.vision.attention=hier", "model.text.attention=hier"]
    return load_config(str(ROOT / "recipes/configs/hiclip_pyramid_b16.yaml"), overrides), shards


def section_zero3_train(tiny: bool, run_training: bool) -> dict:
    from recipes.dry_run import dry_run

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cfg, shards = train_config(work, tiny, run_training and torch.cuda.is_available())
        plan = dry_run(cfg, world_size=1, gpus_per_node=1)
        vision = cfg.model.vision
        out = {"vision": f"width {vision.width}, {vision.layers} layers, patch {vision.patch_size}", "params_m": plan.params / 1e6, "steps": cfg.train.steps,
               "batch": cfg.train.batch_size, "shards": len(shards), "dry_run_zero3_model_states_gib": plan.zero3_gb}
        if not run_training:
            return out
        from recipes.pretrain import train

        start = time.perf_counter()
        train(cfg)
        out["seconds"] = time.perf_counter() - start
        records = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        last = records[-1]
        out.update(losses=losses, loss_finite=all(math.isfinite(x) for x in losses),
                   # the mean of the last third of the logged losses below the first one
                   loss_falling=len(losses) >= 3 and statistics.mean(losses[-max(1, len(losses) // 3):]) < losses[0],
                   samples_per_s=last.get("samples_per_s"), mfu=last.get("mfu"),
                   tflops_per_device=last.get("tflops_per_device"))
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
            out.update(peak_allocated_gib=peak, peak_over_model_states=peak / max(plan.zero3_gb, 1e-9))
        return out


# ---------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=props.total_memory / 2**30)
        from recipes.metrics import peak_tflops

        env["peak_bf16_tflops"], env["peak_source"] = peak_tflops(torch.device("cuda", 0))
    else:
        env["device"] = "cpu"
    return env


def checks(sections: dict) -> dict:
    out = {}
    cases = sections.get("hier_attention", {}).get("cases", [])
    measured = [c for c in cases if "max_error" in c]
    if measured:
        out["hier_errors_within_tolerance"] = all(c["max_error"] <= c["tolerance"] for c in measured)
        at_197 = [c["triton_over_vanilla"] for c in measured if c["tokens"] == 197 and c["dtype"] == "bfloat16"]
        if at_197:
            out["hier_197_bf16_within_1.3x_vanilla"] = max(at_197) <= RATIO_LIMIT_197
    measured = [c for c in sections.get("contrastive", {}).get("cases", []) if "max_error" in c]
    if measured:
        out["contrastive_errors_within_tolerance"] = all(c["max_error"] <= c["tolerance"] for c in measured)
    train = sections.get("zero3_train", {})
    if "losses" in train:
        out["zero3_loss_finite_and_falling"] = bool(train["loss_finite"] and train["loss_falling"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=450.0, help="sections start only while time is left")
    parser.add_argument("--tiny", action="store_true", help="tiny preset, 4 steps (smoke test of the train section)")
    parser.add_argument("--train-on-cpu", action="store_true", help="run the train section without CUDA (gloo)")
    parser.add_argument("--out", default="", help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are IEEE; the kernels never use TF32

    from model.attention import flash_attn_available

    plan = {
        "hier_attention": (lambda: section_hier_attention(budget)) if on_gpu else "no CUDA device",
        "zero3_train": lambda: section_zero3_train(args.tiny, on_gpu or args.train_on_cpu),
        "contrastive": (lambda: section_contrastive(budget)) if on_gpu else "no CUDA device",
        "flash_attn": (lambda: section_flash_attn(budget)) if on_gpu and flash_attn_available() else (
            "no CUDA device" if not on_gpu else "flash_attn not importable"),
    }
    sections, skipped, errors = {}, {}, {}
    for name, run in plan.items():
        if isinstance(run, str):
            skipped[name] = run
            continue
        if budget.left() < 30:
            skipped[name] = "time budget"
            continue
        t0 = time.perf_counter()
        try:
            sections[name] = run()
        except Exception as e:  # noqa: BLE001  (record and go on: one GPU session must give every answer it can)
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            print(traceback.format_exc(), file=sys.stderr)
        sections.setdefault(name, {})["section_seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if not (on_gpu or args.train_on_cpu):
        skipped["zero3_train.training"] = "no CUDA device (config, dry run and shards only)"
    result = {"environment": environment(), "sections": sections, "skipped": skipped, "errors": errors,
              "checks": checks(sections), "seconds": budget.seconds - budget.left()}
    line = json.dumps(result, default=float)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 1 if errors or not all(result["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
