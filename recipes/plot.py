"""Turn a run's metrics.jsonl into one PNG of curves: loss, lr, temperature, throughput, MFU, data wait, memory,
and the zero-shot eval metrics.

    python -m recipes.plot runs/demo/metrics.jsonl --out runs/demo/curves.png

Panels without data are left out. A step logged twice (a run resumed from an earlier checkpoint) keeps its
last value, which is the one the surviving run produced.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

# (title, which keys it draws); eval keys look like "eval/<set>/<metric>".
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k == "loss" or k.startswith("loss/")),
    ("learning rate", lambda k: k == "lr"),
    ("temperature", lambda k: k == "temperature"),
    ("samples / s", lambda k: k in ("samples_per_s", "samples_per_s_per_device")),
    ("MFU", lambda k: k == "mfu"),
    ("data-wait fraction", lambda k: k == "data_wait"),
    ("memory (GiB)", lambda k: k.startswith("mem_")),
    ("zero-shot top-1", lambda k: k.startswith("eval/") and k.endswith("/zeroshot_top1")),
    ("retrieval R@1", lambda k: k.startswith("eval/") and k.endswith("_R@1") and "chance" not in k),
)


def load_series(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {key: [(step, value), ...] sorted by step}, numbers only, last record per step wins."""
    by_key: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def plot(series: dict[str, list[tuple[int, float]]], out: str | Path, title: str = "") -> list[str]:
    """Draw every panel that has data into `out`; returns the titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(name, sorted(k for k in series if wanted(k))) for name, wanted in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        raise ValueError("no plottable metrics in the log")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=key.removeprefix("eval/"))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [name for name, _ in panels]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("--out", default="", help="PNG path (default: curves.png beside the log)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    out = args.out or str(Path(args.metrics).with_name("curves.png"))
    drawn = plot(load_series(args.metrics), out, args.title)
    print(f"wrote {out}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
