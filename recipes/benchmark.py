r"""CLIP_benchmark (`clip-benchmark`, pinned in requirements.txt) on our consolidated model folders, offline.

    python -m recipes.benchmark eval --pretrained runs/demo/model --dataset wds/demo --dataset_root data/demo_wds \
        --task zeroshot_classification --no_amp --num_workers 0 --output "runs/demo/{dataset}_{task}.json"
    python -m recipes.benchmark eval --pretrained runs/X/model --dataset imagenet-r --dataset_root /data/imagenet-r

Everything after the program name is `clip_benchmark`'s own command line (`eval`, `build`; see its --help).
This module only registers the model type `hiclip` in CLIP_benchmark's loader table
(`clip_benchmark.models.TYPE2FUNC`, the extension point it documents) and makes it the default: `--pretrained`
is a consolidated folder (`recipes.convert` output) of any variant, CLIP, HiCLIP, PyramidCLIP or both, rebuilt
by model/pretrained.py from its config.json; `--model` only names the run in the output file. The images go
through the same resize + centre crop + normalisation as `recipes.evaluate`, so both report the same numbers
on the same data (tests/unit/test_benchmark.py). Pass `--no_amp` on CPU: CLIP_benchmark's default autocast
runs the towers in bf16 there.

One fix inside CLIP_benchmark 1.6.2, made only where it is needed and checked (`fix_accuracy`): its top-k
`accuracy` converts a one-element 1-d array with float(), which NumPy ≥ 2.4 refuses (TypeError), so every
zero-shot classification and linear probe fails; the same function on 0-d values replaces it.

Datasets on disk: its webdataset layout (`--dataset wds/<name>`; `python -m data_pipeline.benchmark_layout`
writes one from our shards) and its image-folder datasets (imagenet-r, imagenet-a, imagenet_sketch, ...),
which read `--dataset_root` as it is and download only when that folder does not exist.
"""
from __future__ import annotations

import sys

import torch
from torchvision.transforms import v2

from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import SampleTransform, ViewConfig
from model.pretrained import load_pretrained

MODEL_TYPE = "hiclip"


class ImageTransform:
    """PIL image (what CLIP_benchmark's datasets yield) -> the normalised tensor `recipes.evaluate` would make."""

    def __init__(self, image_size: int):
        self.view = SampleTransform(ViewConfig(image_size=image_size, train=False)).global_view

    def __call__(self, image) -> torch.Tensor:
        return self.view(v2.functional.pil_to_tensor(image.convert("RGB")))


def load_hiclip(model_name: str = "", pretrained: str = "", cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark's loader contract: (model with encode_image / encode_text, image transform, tokenizer)."""
    model, cfg = load_pretrained(pretrained, device=device)
    return model, ImageTransform(cfg.vision.image_size), Tokenizer.from_folder(pretrained)


def register() -> None:
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_hiclip
    if MODEL_TYPE not in models.MODEL_TYPES:  # the CLI's --model_type choices are this very list
        models.MODEL_TYPES.append(MODEL_TYPE)
    fix_accuracy()


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's `accuracy` contract: the fraction of rows whose target is among the k best logits."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def fix_accuracy() -> bool:
    """Replace CLIP_benchmark's top-k accuracy where it fails on this NumPy; True when replaced."""
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    probe = (torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    try:
        zeroshot_classification.accuracy(*probe)
        return False  # works as shipped
    except TypeError:
        pass
    for module in (zeroshot_classification, linear_probe):  # linear_probe imported the name itself
        if getattr(module, "accuracy", None) is None:
            raise RuntimeError(f"{module.__name__}.accuracy not found: clip-benchmark changed, see recipes/benchmark.py")
        module.accuracy = topk_accuracy
    if zeroshot_classification.accuracy(*probe) != [1.0]:
        raise RuntimeError("CLIP_benchmark accuracy fix did not take effect (recipes/benchmark.py)")
    return True


def with_defaults(argv: list[str]) -> list[str]:
    """Our model type and a flat output name unless given (the default name embeds --pretrained, a path)."""
    if not argv or argv[0] != "eval":
        return argv
    flags = {a.split("=", 1)[0] for a in argv}
    extra = [] if "--model_type" in flags else ["--model_type", MODEL_TYPE]
    extra += [] if "--model" in flags else ["--model", MODEL_TYPE]
    extra += [] if "--output" in flags else ["--output", "{dataset}_{model}_{language}_{task}.json"]
    return argv[:1] + extra + argv[1:]


def main(argv: list[str] | None = None) -> None:
    try:
        register()
        from clip_benchmark import cli
    except ImportError as e:
        sys.exit(f"error: recipes.benchmark needs clip-benchmark (pip install -r requirements.txt): {e}")
    argv = with_defaults(list(sys.argv[1:] if argv is None else argv))
    saved, sys.argv = sys.argv, ["clip_benchmark", *argv]  # its CLI parses sys.argv itself
    try:
        cli.main()
    except (FileNotFoundError, ValueError) as e:  # a missing folder / shard file, a bad config.json
        sys.exit(f"error: {e}")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
