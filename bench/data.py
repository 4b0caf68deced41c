"""Claim: our data pipeline decodes + augments + tokenises at least as fast per worker as open_clip's.

Both pipelines run in this process on one thread (= one DataLoader worker's work), on the same shards,
at 224 px with the same work per sample: read tar -> shuffle buffer -> decode -> random resized crop
(90-100% of the area, bicubic) -> float + CLIP normalisation -> tokenise (77) -> batch.
  ours:      data_pipeline.loader.build_train_loader (torchvision.io decoders + v2 transforms on uint8
             tensors, batched Rust BPE), resampled mode, CLIP (one view) and pyramid (two views, boxes, three
             texts) modes.
  open_clip: open_clip_train.data.get_wds_dataset (shipped in the open-clip-torch wheel) with
             open_clip.image_transform(224, is_train=True) and open_clip.tokenize, resampled mode.
Datasets: the demo emoji shards (72 px PNG) and synthetic 256 px JPEG shards (photo-sized decode).
Rounds alternate between the pipelines and the best round of each counts (the machine is shared).

    python bench/data.py [--samples 512] [--rounds 3] [--batch-size 32]
Last line: {"bench": "data", "ours_vs_open_clip": <min over datasets>, "samples_per_s_per_worker": <ours, demo>, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from types import SimpleNamespace

import torch

from data_pipeline.config import DataConfig
from data_pipeline.demo_data import build as build_demo
from data_pipeline.loader import build_train_loader
from data_pipeline.synthetic import make_shards
from data_pipeline.tokenizer import Tokenizer

IMAGE_SIZE = 224


def samples_per_second(batches, samples: int, batch_size_of) -> float:
    """Throughput after one warm-up batch (which fills the shuffle buffer)."""
    next(batches)
    start, count = time.perf_counter(), 0
    while count < samples:
        count += batch_size_of(next(batches))
    return count / (time.perf_counter() - start)


def ours(spec: str, samples: int, batch_size: int, pyramid: bool, tokenizer: Tokenizer) -> float:
    cfg = DataConfig(train_shards=spec, workers=0, resampled=True, shuffle_buffer=1000)
    loader = build_train_loader(cfg, tokenizer, image_size=IMAGE_SIZE, batch_size=batch_size, rank=0, world_size=1,
                                seed=0, pyramid=pyramid)
    return samples_per_second(iter(loader), samples, lambda batch: len(batch["key"]))


def _open_clip_compatible_with_webdataset_1() -> None:
    """open_clip_train 3.3.0's `group_by_keys_nothrow` expects every item to carry "fname", but
    webdataset 1.x's `tar_file_expander` yields an empty end-of-shard marker ({}) by default and the
    pipeline dies with KeyError('fname'). Ask for no marker (webdataset 0.2's behaviour, which
    open_clip was written against); the rest of open_clip's pipeline is used unchanged."""
    import open_clip_train.data as open_clip_data
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=open_clip_data.log_and_continue):
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return open_clip_data.group_by_keys_nothrow(files, handler=handler)

    open_clip_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def open_clip_pipeline(spec: str, samples: int, batch_size: int) -> float:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    _open_clip_compatible_with_webdataset_1()

    args = SimpleNamespace(train_data=spec, val_data=None, dataset_resampled=True, train_num_samples=10**9,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=0, world_size=1)
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.tokenize)
    return samples_per_second(iter(data.dataloader), samples, lambda batch: len(batch[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512, help="timed samples per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        stats = build_demo(os.path.join(tmp, "demo"))
        make_shards(os.path.join(tmp, "jpeg"), 4, 250, image_size=256, fmt="jpg")
        datasets = {
            "demo emoji png 72px": os.path.join(tmp, "demo", stats["train"]["pattern"]),
            "synthetic jpeg 256px": os.path.join(tmp, "jpeg", "shard-{0000..0003}.tar"),
        }
        results = {}
        for name, spec in datasets.items():
            best = {"ours": 0.0, "ours_pyramid": 0.0, "open_clip": 0.0}
            for _ in range(args.rounds):
                best["open_clip"] = max(best["open_clip"], open_clip_pipeline(spec, args.samples, args.batch_size))
                best["ours"] = max(best["ours"], ours(spec, args.samples, args.batch_size, False, tokenizer))
                best["ours_pyramid"] = max(best["ours_pyramid"], ours(spec, args.samples, args.batch_size, True,
                                                                      tokenizer))
            results[name] = {**best, "ratio": best["ours"] / best["open_clip"]}

    print(f"| dataset (224 px, 1 worker, batch {args.batch_size}) | ours CLIP | open_clip | ours / open_clip "
          f"| ours pyramid (2 views + boxes + 3 texts) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ours']:.0f} | {r['open_clip']:.0f} | {r['ratio']:.2f}x | {r['ours_pyramid']:.0f} |")
    demo = results["demo emoji png 72px"]
    print(json.dumps({
        "bench": "data",
        "ours_vs_open_clip": round(min(r["ratio"] for r in results.values()), 3),
        "samples_per_s_per_worker": round(demo["ours"], 1),
        "open_clip_samples_per_s_per_worker": round(demo["open_clip"], 1),
        "pyramid_samples_per_s_per_worker": round(demo["ours_pyramid"], 1),
        "per_dataset": {name: {k: round(v, 2) for k, v in r.items()} for name, r in results.items()},
        "image_size": IMAGE_SIZE,
        "batch_size": args.batch_size,
        "target": 1.0,
    }))


if __name__ == "__main__":
    main()
