"""Linear probe: logistic regression on frozen image features, L2 strength chosen on held-out training data.

    python -m recipes.linear_probe --model runs/demo/model --set animal_mnist
    python -m recipes.linear_probe --model M --set image_folder --train-root /data/x/train --root /data/x/test

The CLIP paper's protocol (Radford et al. 2021, appendix A.3): L-BFGS logistic regression on the image
embeddings; the inverse L2 strength C is swept on a validation part of the training split, coarse (one value
per decade over 1e-6..1e6) then refined (eight steps over the decade either side of the best); the chosen C is
refit on the whole training split and top-1 on the test split is reported. A set with no train split of its
own (animal_mnist, one image folder) is cut by a fixed permutation: `--test-fraction` for test, then
`--val-fraction` of the rest for validation.

Features are computed batch by batch from a streaming loader and only they are kept (N x embed_dim float32):
images never have to fit in memory at once.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.eval_sets import KINDS, EvalSetConfig, build_eval_set
from recipes.evaluate import embed_eval_set

COARSE = [10.0 ** e for e in range(-6, 7)]


def features(model, set_cfg: EvalSetConfig, image_size: int, batch_size: int, workers: int = 0,
             device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of a labelled eval set, embedded one batch at a time."""
    from data_pipeline.tokenizer import Tokenizer

    eval_set = build_eval_set(set_cfg, DataConfig(workers=workers), Tokenizer(2), image_size=image_size,
                              batch_size=batch_size)
    was_training = model.training
    model.eval()
    emb = embed_eval_set(model, ({"image": b["image"], "label": b["label"]} for b in eval_set.batches), device)
    model.train(was_training)
    keep = emb["label"] >= 0
    return emb["image"][keep].numpy().astype(np.float32), emb["label"][keep].numpy()


def split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) index arrays: a fixed random `fraction` of range(n) and the others."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[cut:]), np.sort(order[:cut])


def _fit(x, y, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def choose_c(x_train, y_train, x_val, y_val) -> tuple[float, list[tuple[float, float]]]:
    """The C with the best validation top-1: a decade sweep, then eight steps over the decades around the best."""
    sweep = [(c, float(_fit(x_train, y_train, c).score(x_val, y_val))) for c in COARSE]
    best = max(sweep, key=lambda s: s[1])[0]
    fine = [best * 10.0 ** (e / 4) for e in range(-4, 5) if e != 0]
    sweep += [(c, float(_fit(x_train, y_train, c).score(x_val, y_val))) for c in fine]
    best_c, _ = max(sweep, key=lambda s: (s[1], -abs(np.log10(s[0]))))  # ties: the C nearest 1
    return best_c, sorted(sweep)


def linear_probe(x_train, y_train, x_test, y_test, val_fraction: float = 0.2, seed: int = 0) -> dict:
    fit_idx, val_idx = split(len(y_train), val_fraction, seed)
    c, sweep = choose_c(x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx])
    top1 = float(_fit(x_train, y_train, c).score(x_test, y_test))
    counts = np.bincount(y_test)
    return {"top1": top1, "C": c, "chance_top1": float(counts.max() / counts.sum()), "train": int(len(fit_idx)),
            "val": int(len(val_idx)), "test": int(len(y_test)), "sweep": sweep}


def probe_eval_set(model, kind: str, batch_size: int = 256, max_samples: int = 0, test_fraction: float = 0.2,
                   val_fraction: float = 0.2, seed: int = 0) -> dict:
    """A probe on one labelled set cut into train / val / test (e.g. animal_mnist)."""
    x, y = features(model, EvalSetConfig(kind=kind, max_samples=max_samples), model.cfg.vision.image_size, batch_size)
    train, test = split(len(y), test_fraction, seed)
    return linear_probe(x[train], y[train], x[test], y[test], val_fraction, seed)


def main(argv=None) -> None:
    from model.pretrained import load_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated model folder")
    p.add_argument("--set", default="animal_mnist", choices=[k for k in KINDS if k not in ("shards", "coco", "flickr30k")])
    p.add_argument("--root", default="", help="test images (image_folder, imagenet)")
    p.add_argument("--train-root", default="", help="training images in the same layout; without it the set is cut")
    p.add_argument("--max-samples", type=int, default=0, help="use N images spread over each set (0 = all)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    for name in ("test_fraction", "val_fraction"):
        if not 0 < getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    try:
        model, cfg = load_pretrained(args.model, device=args.device)
        size = cfg.vision.image_size
        test_cfg = EvalSetConfig(kind=args.set, root=args.root, max_samples=args.max_samples)
        x, y = features(model, test_cfg, size, args.batch_size, args.workers, args.device)
        if args.train_root:
            train_cfg = EvalSetConfig(kind=args.set, root=args.train_root, max_samples=args.max_samples)
            x_train, y_train = features(model, train_cfg, size, args.batch_size, args.workers, args.device)
            x_test, y_test = x, y
        else:
            train, test = split(len(y), args.test_fraction, args.seed)
            x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    results = linear_probe(x_train, y_train, x_test, y_test, args.val_fraction, args.seed)
    print(f"linear probe top-1 {100 * results['top1']:.1f}% (majority class {100 * results['chance_top1']:.1f}%), "
          f"C = {results['C']:.3g}; {results['train']} train / {results['val']} val / {results['test']} test")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
