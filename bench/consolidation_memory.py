"""Claim: consolidating a ZeRO-3 checkpoint holds about one output shard in private memory, not the model.

    python bench/consolidation_memory.py [--preset vit_b32] [--shard-mb 100] [--stages 3 2]

A 1-rank checkpoint of the preset's CLIP is written by the trainer's own engine (recipes/engine.py,
recipes/checkpointing.py, one optimizer step so Adam's moments are on disk) in a child process; then another
child runs recipes.convert.consolidate (fp32, shards of --shard-mb) while a sampler thread reads
/proc/self/status every 5 ms. Reported per stage:
    model_mb          fp32 bytes of all parameters
    largest_shard_mb  the largest safetensors file written
    peak_anon_mb      peak private (anonymous) memory above the baseline after imports: what the consolidation
                      itself allocates
    peak_file_mb      peak file-backed resident pages: the memory-mapped optimizer shards DeepSpeed's lazy mode
                      reads (page cache, which the kernel can drop under pressure)
    peak_rss_mb       the process's peak RSS (ru_maxrss), imports included
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: str, preset: str, stage: int) -> None:
    import torch

    from recipes import checkpointing
    from recipes.config import load_config, to_dict
    from recipes.engine import build_engine, deepspeed_config, init_distributed
    from recipes.step import train_step

    cfg = load_config("recipes/configs/demo.yaml", [f"model.preset={preset}", "model.vision.region_split=-1",
                                                   f"train.ds_config=ds_configs/zero{stage}.json", "train.batch_size=2"])
    init_distributed()
    ds = deepspeed_config(cfg)
    engine = build_engine(cfg, ds)
    size = cfg.model.vision.image_size
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1] = 49406, 49407
    train_step(engine, {"image": torch.randn(2, 3, size, size), "text": tokens}, cfg.loss)
    checkpointing.save(engine, out, 1, {"data": None, "config": to_dict(cfg)})


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(ckpt: str, out: str, shard_mb: int) -> dict:
    from recipes.convert import consolidate

    base_anon, base_file = status_kb("RssAnon"), status_kb("RssFile")
    peaks = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["anon"] = max(peaks["anon"], status_kb("RssAnon") - base_anon)
            peaks["file"] = max(peaks["file"], status_kb("RssFile") - base_file)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    folder = consolidate(ckpt, out, max_shard_mb=shard_mb)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    shards = [p.stat().st_size for p in folder.glob("*.safetensors")]
    from model.pretrained import load_state_dict

    model_bytes = sum(t.numel() * 4 for t in load_state_dict(folder).values())
    return {"model_mb": round(model_bytes / 2**20, 1), "largest_shard_mb": round(max(shards) / 2**20, 1),
            "shards": len(shards), "peak_anon_mb": round(peaks["anon"] / 1024, 1),
            "peak_file_mb": round(peaks["file"] / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(seconds, 1)}


def child(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b32")
    p.add_argument("--shard-mb", type=int, default=100)
    p.add_argument("--stages", type=int, nargs="+", default=[3, 2])
    p.add_argument("--_make", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._make:
        return make_checkpoint(args._make[0], args._make[1], int(args._make[2]))
    if args._measure:
        return print(json.dumps(measure(args._measure[0], args._measure[1], int(args._measure[2]))))
    results = {}
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            child(["--_make", f"{tmp}/ckpt", args.preset, str(stage)])
            results[f"zero{stage}"] = json.loads(child(["--_measure", f"{tmp}/ckpt", f"{tmp}/model",
                                                        str(args.shard_mb)]))
            print(f"ZeRO-{stage}: {results[f'zero{stage}']}", file=sys.stderr)
    print(json.dumps({"bench": "consolidation_memory", "preset": args.preset, "shard_mb": args.shard_mb, **results}))


if __name__ == "__main__":
    main()
