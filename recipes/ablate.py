r"""Variants x seeds from one recipe: train each cell, evaluate it, and tabulate mean ± std per metric.

    python -m recipes.ablate --config recipes/configs/demo.yaml --out runs/ablate --seeds 0,1,2 \
        train.steps=60 train.warmup_steps=6
    python -m recipes.ablate ... --variant clip= --variant deep=model.vision.layers=6,model.text.layers=6

Variants default to the four models (`VARIANTS`); `--variant NAME=k=v,k=v` (repeatable) replaces them, and
`--variants` picks some of the defaults by name. Trailing `a.b=c` overrides apply to every cell. A cell is
OUT/<variant>/seed<k>/: `train.log` (the whole training output), `metrics.jsonl`, `checkpoints/`, `model/`
(consolidated), `result.json`. A cell with a result.json is finished and never re-run; an interrupted one resumes
from its latest checkpoint (`checkpoint.resume=auto`), or skips training when its model folder is complete.

Each cell is evaluated on the recipe's `eval.sets` (zero-shot classification and retrieval, recipes/evaluate.py),
optionally by a linear probe (`--probe`, recipes/linear_probe.py), and, for models with hierarchy-aware vision
attention, by the induction score of each layer against foreground masks (`--induction-images`,
recipes/induction_score.py). Written at the end (and after every cell): OUT/results.json, OUT/table.md (mean ± std
over seeds, sample std) and OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# The four models of docs/method.md, as overrides of one recipe.
HIER = ["model.vision.attention=hier", "model.text.attention=hier"]
VARIANTS: dict[str, list[str]] = {
    "clip": [],
    "hiclip": HIER,
    "pyramidclip": ["loss.kind=pyramid"],
    "hiclip_pyramid": HIER + ["loss.kind=pyramid"],
}
# Keys every cell sets itself; an override of one of them would merge cells.
OWNED = ("train.seed", "checkpoint.dir", "checkpoint.resume", "logging.dir")
COUNTS = ("samples", "classes", "images", "texts")  # bookkeeping, not metrics


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r} must be NAME=key=value,key=value (NAME= for the recipe as it is)")
    return name, [o for o in overrides.split(",") if o]


def cell_overrides(common: list[str], variant: list[str], seed: int, cell: Path) -> list[str]:
    return [*common, *variant, f"train.seed={seed}", f"checkpoint.dir={cell / 'checkpoints'}",
            f"logging.dir={cell}", "checkpoint.resume=auto"]


def train_cell(recipe: str, overrides: list[str], cell: Path, ranks: int) -> None:
    """Train in a fresh process (or `ranks` torchrun processes); all of its output goes to cell/train.log."""
    if ranks > 1:
        launch = ["torchrun", "--standalone", "--nproc_per_node", str(ranks), "-m", "recipes.pretrain"]
    else:
        launch = [sys.executable, "-m", "recipes.pretrain"]
    with open(cell / "train.log", "a") as log:
        log.write(f"\n$ {' '.join(launch)} --config {recipe} {' '.join(overrides)}\n")
        log.flush()
        rc = subprocess.run([*launch, "--config", recipe, *overrides], stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"training exited with status {rc}: see {cell / 'train.log'}")


def evaluate_cell(cfg, model_dir: Path, probe: str, induction_images: str) -> dict:
    """{"metrics": {set/metric: value}, "induction": per-layer scores or None} of one consolidated model."""
    import torch

    from data_pipeline.eval_sets import build_eval_set
    from data_pipeline.tokenizer import Tokenizer
    from model.pretrained import load_pretrained
    from recipes.evaluate import evaluate

    torch.manual_seed(0)
    model, model_cfg = load_pretrained(model_dir)
    tokenizer = Tokenizer.from_folder(str(model_dir))
    metrics = {}
    for set_cfg in cfg.eval.sets:
        eval_set = build_eval_set(set_cfg, cfg.data, tokenizer, image_size=model_cfg.vision.image_size,
                                  batch_size=cfg.eval.batch_size)
        results = evaluate(model, tokenizer, eval_set.batches, eval_set.classnames, eval_set.templates)
        metrics.update({f"{eval_set.name}/{k}": v for k, v in results.items() if k not in COUNTS})
    if probe:
        from recipes.linear_probe import probe_eval_set

        results = probe_eval_set(model, probe, batch_size=cfg.eval.batch_size)
        metrics.update({f"{probe}/probe_{k}": v for k, v in results.items() if k in ("top1", "chance_top1")})
    induction = None
    if induction_images and model_cfg.vision.attention == "hier":
        from data_pipeline.foreground import foreground_paths, foreground_set
        from recipes.induction_score import induction_scores

        images, masks = foreground_set(foreground_paths(induction_images), model_cfg.vision.image_size,
                                       model_cfg.vision.grid_size)
        induction = induction_scores(model, images, masks)
    return {"metrics": metrics, "induction": induction}


def run_cell(recipe: str, common: list[str], name: str, variant: list[str], seed: int, out: Path, ranks: int,
             probe: str, induction_images: str) -> dict:
    from recipes.config import load_config
    from recipes.convert import consolidate

    cell = out / name / f"seed{seed}"
    done = cell / "result.json"
    if done.is_file():
        print(f"[ablate] {name} seed {seed}: finished earlier, kept ({done})", flush=True)
        return json.loads(done.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    overrides = cell_overrides(common, variant, seed, cell)
    cfg = load_config(recipe, overrides)  # a bad override fails here, before any process starts
    model_dir = cell / "model"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        print(f"[ablate] {name} seed {seed}: training ({cell / 'train.log'})", flush=True)
        train_cell(recipe, overrides, cell, ranks)
        consolidate(str(cell / "checkpoints"), str(model_dir))
    train_s = time.perf_counter() - t0
    result = {"variant": name, "seed": seed, "overrides": variant, "common": common, "train_seconds": train_s,
              **evaluate_cell(cfg, model_dir, probe, induction_images)}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, done)  # the cell counts as finished only once its whole result is on disk
    print(f"[ablate] {name} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ table and plot

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for a single seed."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def summarise(results: list[dict], order: list[str]) -> dict:
    """{variant: {"seeds": n, "metrics": {metric: (mean, std)}, "induction": [{key: (mean, std)} per layer]}}."""
    summary = {}
    for name in order:
        cells = [r for r in results if r["variant"] == name]
        if not cells:
            continue
        keys = sorted({k for r in cells for k in r["metrics"]})
        entry = {"seeds": len(cells),
                 "metrics": {k: mean_std([r["metrics"][k] for r in cells if k in r["metrics"]]) for k in keys}}
        scored = [r["induction"] for r in cells if r.get("induction")]
        if scored:
            entry["induction"] = [
                {key: mean_std([s["layers"][layer][key] if key != "threshold" else s["thresholds"][layer]
                                for s in scored])
                 for key in ("ari", "ari_position", "groups", "threshold")}
                for layer in range(len(scored[0]["layers"]))]
        summary[name] = entry
    return summary


def _cell(mean: float, std: float, percent: bool) -> str:
    scale, digits = (100, 1) if percent else (1, 3)
    if math.isnan(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def format_table(summary: dict) -> str:
    names = list(summary)
    metrics = sorted({k for s in summary.values() for k in s["metrics"]})
    header = "| metric | " + " | ".join(f"{n} (n={summary[n]['seeds']})" for n in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for metric in metrics:
        row = [_cell(*summary[n]["metrics"][metric], percent=True) if metric in summary[n]["metrics"] else "–"
               for n in names]
        lines.append(f"| {metric} (%) | " + " | ".join(row) + " |")
    hier = [n for n in names if "induction" in summary[n]]
    if hier:
        lines += ["", "Induction: ARI of each vision layer's patch groups with the foreground mask, against a "
                      "position-only tiling with as many groups (mean ± std over seeds; θ = the layer's threshold).", "",
                  "| variant | layer | θ | groups | ARI groups | ARI position |", "|---|---:|---:|---:|---:|---:|"]
        for n in hier:
            for layer, s in enumerate(summary[n]["induction"], start=1):
                lines.append(f"| {n} | {layer} | {s['threshold'][0]:.3f} | {s['groups'][0]:.1f} | "
                             f"{_cell(*s['ari'], percent=False)} | {_cell(*s['ari_position'], percent=False)} |")
    return "\n".join(lines)


def plot(summary: dict, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    metrics = [m for m in sorted({k for s in summary.values() for k in s["metrics"]})
               if "chance" not in m and ("top1" in m or m.endswith("R@1"))]
    hier = [n for n in names if "induction" in summary[n]]
    fig, axes = plt.subplots(1, 2 if hier else 1, figsize=(13 if hier else 8, 4.2), squeeze=False)
    ax, width = axes[0, 0], 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        means = [100 * summary[name]["metrics"].get(m, (math.nan, 0))[0] for m in metrics]
        stds = [100 * summary[name]["metrics"].get(m, (0, 0))[1] for m in metrics]
        ax.bar(xs, means, width, yerr=[0 if math.isnan(s) else s for s in stds], capsize=3, label=name, alpha=0.8)
        for x, m in zip(xs, metrics):
            seeds = [100 * r["metrics"][m] for r in results if r["variant"] == name and m in r["metrics"]]
            ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
    for j, m in enumerate(metrics):
        chance = next((s["metrics"][k][0] for s in summary.values() for k in s["metrics"]
                       if k == m.rsplit("/", 1)[0] + "/zeroshot_chance_top1" and "top1" in m), None)
        if chance is not None:
            ax.hlines(100 * chance, j - 0.45, j + 0.45, colors="grey", linestyles="dashed")
    ax.set_xticks(range(len(metrics)), [m.replace("/", "\n") for m in metrics], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("mean ± std over seeds (dots: seeds; dashed: majority class)")
    ax.legend(fontsize=8)
    if hier:
        ax = axes[0, 1]
        for name in hier:
            layers = range(1, len(summary[name]["induction"]) + 1)
            ari = [s["ari"] for s in summary[name]["induction"]]
            pos = [s["ari_position"] for s in summary[name]["induction"]]
            ax.errorbar(layers, [a[0] for a in ari], yerr=[0 if math.isnan(a[1]) else a[1] for a in ari],
                        marker="o", capsize=3, label=f"{name}: groups")
            ax.errorbar(layers, [p[0] for p in pos], yerr=[0 if math.isnan(p[1]) else p[1] for p in pos],
                        marker="x", linestyle="dashed", capsize=3, label=f"{name}: position only")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("vision layer")
        ax.set_ylabel("ARI with the foreground mask")
        ax.set_title("induced patch groups vs position-only tiling")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], order: list[str], out: Path) -> str:
    summary = summarise(results, order)
    table = format_table(summary)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"cells": results, "summary": summary}, indent=2))
    plot(summary, results, out / "ablation.png")
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the one recipe every cell starts from")
    p.add_argument("--out", required=True, help="ablation folder (cells, table.md, ablation.png)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2], help="e.g. 0,1,2")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, some of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--variant", action="append", default=[], help="NAME=k=v,k=v; replaces the default variants")
    p.add_argument("--ranks", type=int, default=1, help="training processes per cell (torchrun when > 1)")
    p.add_argument("--probe", default="", help="also a linear probe on this eval set kind (e.g. animal_mnist)")
    p.add_argument("--induction-images", default="demo",
                   help="'demo', a folder of RGBA PNGs, or '' for no induction score (hier vision models only)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. train.steps=60")
    args = p.parse_args(argv)
    try:
        variants = dict(parse_variant(v) for v in args.variant) if args.variant else dict(VARIANTS)
        if args.variants:
            unknown = [v for v in args.variants if v not in variants]
            if unknown:
                raise ValueError(f"--variants: unknown {unknown}, known {list(variants)}")
            variants = {v: variants[v] for v in args.variants}
        owned = [o for o in args.overrides if o.partition("=")[0].strip() in OWNED]
        if owned:
            raise ValueError(f"override {owned[0]!r}: recipes.ablate sets {', '.join(OWNED)} per cell itself")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results, failed = [], []
        for seed in args.seeds:  # seed-major: a run cut short still has every variant at the seeds it finished
            for name, overrides in variants.items():
                try:
                    results.append(run_cell(args.config, args.overrides, name, overrides, seed, out, args.ranks,
                                            args.probe, args.induction_images))
                except RuntimeError as e:  # one broken cell does not cost the others
                    failed.append(f"{name} seed {seed}: {e}")
                    print(f"[ablate] {failed[-1]}", flush=True)
                write_report(results, list(variants), out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(write_report(results, list(variants), out))
    if failed:
        sys.exit("error: cells failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
