"""Claims: (1) a 2-rank ZeRO-3 warm start adds about one module's parameters of private memory per rank, not a
copy of the model; (2) locking a tower cuts each rank's optimizer state by the tower's share of parameters.

    python bench/warm_start.py [--preset vit_b32] [--layers 4] [--stages 3 2]

A Hugging Face CLIPModel of the preset's architecture (towers cut to --layers blocks; random weights) is saved
locally; tests/integration/warm_start_worker.py then runs on 2 gloo ranks under each ZeRO stage: two engines
warm-started from it through recipes.engine.build_engine (one free, one with the vision tower locked), 2 steps
each. Reported per stage: the peak private (RssAnon) memory each rank added inside the warm start, next to
the model's fp32 size, its largest module, and — measured in this process, side by side — what reading the
source as one state dict (`safetensors.torch.load_file`, what a naive warm start does on every rank) adds
(private and resident, file-backed pages included);
each rank's optimizer-state bytes free vs locked, against 1 - locked share. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def naive_load_peak(folder: Path) -> tuple[int, int]:
    """Peak private and resident memory added by reading the whole source state dict and keeping it until the
    copy is done, as a naive warm start does on every rank (`load_file` maps the file: its pages are file-backed)."""
    from safetensors.torch import load_file

    from tests.integration.warm_start_worker import PeakRss

    with PeakRss() as peak:
        state = load_file(folder / "model.safetensors")
        total = sum(t.float().sum().item() for t in state.values())  # touch every page, as a copy would
        time.sleep(0.01)
    del state, total
    return peak.anon, peak.total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b32")
    p.add_argument("--layers", type=int, default=4, help="blocks per tower (the preset's widths)")
    p.add_argument("--stages", type=int, nargs="+", default=[3, 2])
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    import torch
    from transformers import CLIPConfig, CLIPModel

    from model.interop import hf_clip_config
    from recipes.config import load_config
    from tests.integration.launch import torchrun

    model_args = [f"model.preset={args.preset}", f"model.vision.layers={args.layers}",
                  f"model.text.layers={args.layers}", "model.vision.region_split=-1"]
    cfg = load_config("recipes/configs/demo.yaml", model_args).model
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(**hf_clip_config(cfg))).save_pretrained(f"{tmp}/hf")
        naive_anon, naive_rss = naive_load_peak(Path(tmp, "hf"))
        for stage in args.stages:
            out = Path(tmp, f"zero{stage}.json")
            torchrun(2, ["tests/integration/warm_start_worker.py", str(out), f"ds_configs/zero{stage}.json",
                         f"{tmp}/hf", str(args.steps), *model_args, "train.lock.visual.mode=all"], timeout=1800)
            r = json.loads(out.read_text())
            results[f"zero{stage}"] = {
                "step0_exact": r["step0_exact_module"] and r["step0_exact_master"],
                "warm_start_peak_anon_mb": [mb(x["warm_start_peak_anon"]) for x in r["per_rank"]],
                "warm_start_peak_rss_mb": [mb(x["warm_start_peak_rss"]) for x in r["per_rank"]],
                "warm_start_rss_over_model": [round(x["warm_start_peak_rss"] / r["model_fp32_bytes"], 3)
                                              for x in r["per_rank"]],
                "optimizer_mb_free": [mb(x["free"]) for x in r["per_rank"]],
                "optimizer_mb_locked": [mb(x["locked"]) for x in r["per_rank"]],
                "optimizer_locked_over_free": [round(x["locked"] / x["free"], 4) for x in r["per_rank"]],
                "one_minus_locked_share": round(1 - r["locked_share"], 4),
                "locked_identical": r["locked_identical"],
            }
            print(f"ZeRO-{stage}: {results[f'zero{stage}']}", file=sys.stderr)
    print(json.dumps({"bench": "warm_start", "preset": args.preset, "layers": args.layers,
                      "model_mb": mb(r["model_fp32_bytes"]), "largest_module_mb": mb(r["largest_module_fp32_bytes"]),
                      "naive_full_load_peak_anon_mb": mb(naive_anon), "naive_full_load_peak_rss_mb": mb(naive_rss),
                      **results}))


if __name__ == "__main__":
    main()
