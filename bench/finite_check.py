"""What the non-finite check before a checkpoint costs (recipes/finite.py), at ViT-B/16 CLIP size, side by side
with the checkpoint save it guards, in one process on CPU.

    python bench/finite_check.py [--preset vit_b16] [--repeats 3]

A world of one, ZeRO-2, bf16: the rank holds the whole state (bf16 weights, fp32 masters, two Adam moments:
14 bytes a parameter), so this is the worst case; N ranks each scan 1/N of it. One optimizer step at batch 1
first, so the moments exist. Then `state_is_finite` and DeepSpeed's `save_checkpoint` (to a temporary folder),
interleaved, compared by the ratio of medians. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recipes.config import load_config
    from recipes.engine import build_engine, deepspeed_config, init_distributed
    from recipes.finite import local_state, state_is_finite
    from recipes.step import train_step

    init_distributed()
    cfg = load_config(None, [f"model.preset={args.preset}", "train.precision=bf16", "train.batch_size=1",
                             "train.ds_config=ds_configs/zero2.json", "model.vision.region_split=-1"])
    torch.manual_seed(0)
    engine = build_engine(cfg, deepspeed_config(cfg))
    size, context = cfg.model.vision.image_size, cfg.model.text.context_length
    text = torch.zeros(1, context, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    train_step(engine, {"image": torch.randn(1, 3, size, size), "text": text}, cfg.loss)
    nbytes = sum(t.numel() * t.element_size() for t in local_state(engine))
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())

    check, save = [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for i in range(args.repeats):
            t0 = time.perf_counter()
            assert state_is_finite(engine)
            check.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.save_checkpoint(tmp, tag=f"t{i}", save_latest=False)
            save.append(time.perf_counter() - t0)
    c, s = statistics.median(check), statistics.median(save)
    print(f"{args.preset}: {params / 1e6:.1f} M parameters, {nbytes / 2**30:.2f} GiB of state scanned on one rank")
    print(f"state_is_finite {c:.3f} s ({nbytes / c / 2**30:.1f} GiB/s)   save_checkpoint {s:.3f} s   "
          f"({args.repeats} repeats, {args.threads} thread)")
    print(json.dumps({"bench": "finite_check", "preset": args.preset, "params_m": round(params / 1e6, 1),
                      "state_gib": round(nbytes / 2**30, 2), "check_s": round(c, 3), "save_s": round(s, 3),
                      "check_vs_save": round(c / s, 3)}))


if __name__ == "__main__":
    main()
