"""Weights in other layouts: open_clip state dicts and Hugging Face transformers `CLIPModel` folders, both ways.

One table of counterparts (`counterpart`) serves import (warm start: theirs -> ours) and export (ours ->
theirs). Sources are read lazily, one tensor at a time (safetensors' safe_open, or torch.load with mmap and
weights_only=True), so whoever calls `WarmStart.tensor` holds one source tensor at a time, never the whole
model. What the source lacks (HiCLIP priors, PyramidCLIP's region tokens) stays as initialised, or with
`init_priors: uniform` gets the uniform-link prior of docs/method.md §1.5.

Nothing here imports transformers: the Hugging Face side is key names and a config dict (model/hf.py holds the
transformers classes).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from model.config import ModelConfig

FORMATS = ("ours", "open_clip", "hf")

# Our top-level names -> (open_clip, Hugging Face) names, by prefix; `None` = no counterpart.
_TOP = {
    "visual.cls_token": ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    "visual.pos_embed": ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    "visual.patch_embed.weight": ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    "visual.ln_pre": ("visual.ln_pre", "vision_model.pre_layrnorm"),
    "visual.ln_post": ("visual.ln_post", "vision_model.post_layernorm"),
    "visual.proj.weight": ("visual.proj", "visual_projection.weight"),
    "text.token_embed.weight": ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    "text.pos_embed": ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    "text.ln_final": ("ln_final", "text_model.final_layer_norm"),
    "text.proj.weight": ("text_projection", "text_projection.weight"),
    "logit_scale": ("logit_scale", "logit_scale"),
}
# Inside block i: our leaf -> (open_clip leaf, Hugging Face leaf); HF splits our fused qkv into q/k/v_proj.
_BLOCK_LEAF = {
    "ln_1": ("ln_1", "layer_norm1"), "ln_2": ("ln_2", "layer_norm2"),
    "attn.qkv.weight": ("attn.in_proj_weight", "self_attn.{}_proj.weight"),
    "attn.qkv.bias": ("attn.in_proj_bias", "self_attn.{}_proj.bias"),
    "attn.out": ("attn.out_proj", "self_attn.out_proj"), "mlp.fc": ("mlp.c_fc", "mlp.fc1"),
    "mlp.proj": ("mlp.c_proj", "mlp.fc2"),
}
_BLOCK_PREFIX = {"visual": ("visual.transformer.resblocks", "vision_model.encoder.layers"),
                 "text": ("transformer.resblocks", "text_model.encoder.layers")}
_BLOCK = re.compile(r"^(visual|text)\.transformer\.blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Counterpart:
    """Where one of our tensors lives in another layout, and how the layouts differ.

    kind: same | transpose (nn.Linear [out, in] here, x @ P [in, out] in open_clip) | scalar ([1] here: ZeRO
    cannot hold 0-d parameters) | split3 (our fused qkv = the concatenation of HF's q, k, v).
    """

    keys: tuple[str, ...]
    kind: str = "same"

    def to_ours(self, tensors: list[Tensor]) -> Tensor:
        if self.kind == "split3":
            return torch.cat(tensors, dim=0)
        (t,) = tensors
        return t.t() if self.kind == "transpose" else t.reshape(1) if self.kind == "scalar" else t

    def from_ours(self, t: Tensor) -> list[Tensor]:
        if self.kind == "split3":
            return list(t.chunk(3, dim=0))
        return [t.t().contiguous() if self.kind == "transpose" else t.reshape(()) if self.kind == "scalar" else t]

    def our_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if self.kind == "split3":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        (s,) = shapes
        return tuple(reversed(s)) if self.kind == "transpose" else (1,) if self.kind == "scalar" else tuple(s)


def counterpart(fmt: str, name: str) -> Counterpart | None:
    """Our parameter `name` in layout `fmt`, or None where that layout has no such part (priors, regions)."""
    if fmt == "ours":
        return Counterpart((name,))
    col = FORMATS.index(fmt) - 1
    block = _BLOCK.match(name)
    if block:
        tower, index, leaf = block.groups()
        key = next((k for k in _BLOCK_LEAF if leaf == k or leaf.startswith(k + ".")), None)
        if key is None:  # the block's HiCLIP prior
            return None
        theirs = f"{_BLOCK_PREFIX[tower][col]}.{index}.{_BLOCK_LEAF[key][col]}{leaf.removeprefix(key)}"
        if "{}" in theirs:
            return Counterpart(tuple(theirs.format(p) for p in "qkv"), "split3")
        return Counterpart((theirs,))
    key = next((k for k in _TOP if name == k or name.startswith(k + ".")), None)
    if key is None:
        return None
    theirs = _TOP[key][col] + name.removeprefix(key)
    kind = "scalar" if name == "logit_scale" else "transpose" if fmt == "open_clip" and name.endswith("proj.weight") else "same"
    return Counterpart((theirs,), kind)


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
    if cfg.vision.attention != "vanilla" or cfg.text.attention != "vanilla" or not cfg.text.causal:
        raise ValueError(f"only the vanilla CLIP (vanilla attention in both towers, causal text) has a {fmt} "
                         f"equivalent; this model has vision.attention={cfg.vision.attention!r}, "
                         f"text.attention={cfg.text.attention!r}, text.causal={cfg.text.causal}")


def export_state(state: Mapping[str, Tensor], cfg: ModelConfig, fmt: str) -> dict[str, Tensor]:
    """Our vanilla CLIP state dict in layout `fmt`. PyramidCLIP's region branch has no counterpart: left out."""
    check_exportable(cfg, fmt)
    out = {}
    for name, tensor in state.items():
        where = counterpart(fmt, name)
        if where is None:
            if name.startswith("visual.regions."):
                continue
            raise ValueError(f"no {fmt} counterpart for parameter {name!r}")
        out.update(zip(where.keys, where.from_ours(tensor)))
    return out


# ------------------------------------------------------------------------------------------------- configs

def open_clip_config(cfg: ModelConfig) -> dict:
    """The open_clip `CLIP(**config)` arguments of the same architecture (GELU, pre-LN, CLS and argmax pooling)."""
    v, t = cfg.vision, cfg.text
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
    }


def hf_clip_config(cfg: ModelConfig) -> dict:
    """transformers `CLIPConfig(**config)` of the same architecture: exact GELU (HF's default is quick_gelu),
    LayerNorm eps 1e-5, pooling at the first <end_of_text>: the vocabulary's last id (49407 in CLIP's), so
    the same position as our argmax."""
    v, t = cfg.vision, cfg.text
    return {
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": math.log(1 / cfg.init_temperature),
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                        "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1,
                        "pad_token_id": t.vocab_size - 1,
                        "projection_dim": cfg.embed_dim},
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                          "projection_dim": cfg.embed_dim},
    }


# ------------------------------------------------------------------------------------------- lazy sources

class Source:
    """Tensors by name, read one at a time: a folder or file of safetensors, or a torch-saved state dict."""

    def __init__(self, path: str | Path, fmt: str = "auto"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"model.init_from: {self.path} does not exist")
        self.format = detect_format(self.path) if fmt == "auto" else fmt
        if self.format not in FORMATS:
            raise ValueError(f"model.init_format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
        self._files: dict[str, Path] = {}  # key -> safetensors file
        self._state: dict[str, Tensor] | None = None  # a torch-saved state dict (memory-mapped)
        self._shapes: dict[str, tuple[int, ...]] = {}
        if self.path.is_dir():
            for file in sorted(self.path.glob("*.safetensors")):
                self._index_safetensors(file)
            if not self._files:
                raise FileNotFoundError(f"model.init_from: {self.path} holds no .safetensors weights")
        elif self.path.suffix == ".safetensors":
            self._index_safetensors(self.path)
        else:
            try:  # weights_only: a checkpoint file is data, never code
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is one line naming it
                raise ValueError(f"model.init_from: cannot read {self.path} as a weights-only state dict: "
                                 f"{str(e).splitlines()[0]}") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
                raise ValueError(f"model.init_from: {self.path} is not a state dict of tensors")
            # open_clip's training checkpoints wrap the model in DDP: its keys start with "module.".
            self._state = {k.removeprefix("module."): v for k, v in state.items()}
            self._shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def _index_safetensors(self, file: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                self._files[key] = file
                self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """key[start:stop] along the first dimension, reading only those rows."""
        if self._state is not None:
            return self._state[key][start:stop]
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def get(self, key: str) -> Tensor:
        if self._state is not None:
            return self._state[key].clone()  # out of the memory map: the caller owns it
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)


def detect_format(path: Path) -> str:
    """A folder with a transformers CLIP config.json -> hf; a folder with our config.json -> ours; a file -> open_clip."""
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model.init_from: {path} has no config.json (neither our folder nor a "
                                    "Hugging Face CLIP folder)")
        data = json.loads(config.read_text())
        if data.get("model_type") == "clip":
            return "hf"
        if "vision" in data and "text" in data:
            return "ours"
        raise ValueError(f"model.init_from: {config} is neither our model config nor a transformers CLIP config "
                         f"(model_type {data.get('model_type')!r}); set model.init_format")
    return "open_clip"


# --------------------------------------------------------------------------------------------- the plan

@dataclass
class WarmStart:
    """Which of our parameters come from the source (and how), which are initialised here, which source keys
    go unused. `tensor(name)` reads one target value (from the source, or the uniform-link zeros)."""

    source: Source
    loaded: dict[str, Counterpart] = field(default_factory=dict)
    uniform: dict[str, tuple[int, ...]] = field(default_factory=dict)  # prior projections set to 0
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def targets(self) -> set[str]:
        return set(self.loaded) | set(self.uniform)

    def tensor(self, name: str) -> Tensor:
        if name in self.uniform:
            return torch.zeros(self.uniform[name])
        where = self.loaded[name]
        return where.to_ours([self.source.get(k) for k in where.keys])

    @torch.no_grad()
    def copy_into(self, name: str, dst: Tensor, chunk_elements: int = 2**22) -> None:
        """dst ← the target value of `name`, read in row chunks where the layouts agree row for row (all but
        the small transposed projections): the caller then holds `dst` plus one chunk, not two copies."""
        where = self.loaded.get(name)
        if where is None or where.kind not in ("same", "split3") or dst.dim() == 0:
            dst.copy_(self.tensor(name).reshape(dst.shape))
            return
        offset = 0
        for key in where.keys:
            shape = self.source.shape(key)
            step = max(1, chunk_elements // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], step):
                part = self.source.rows(key, start, min(start + step, shape[0]))
                dst[offset + start: offset + start + len(part)].copy_(part)
            offset += shape[0]

    def table(self, numel: Callable[[str], int]) -> str:
        """One table: status, tensors, parameters, key patterns (block indices folded into `*`)."""
        numel_src = lambda k: math.prod(self.source.shape(k))  # noqa: E731
        rows = [("status", "tensors", "params", "keys")]
        for status, names, count in (("loaded", list(self.loaded), numel),
                                     ("fresh: uniform links", list(self.uniform), numel),
                                     ("fresh: initialised", self.fresh, numel),
                                     ("ignored (source only)", self.ignored, numel_src)):
            if names:
                rows.append((status, str(len(names)), f"{sum(count(n) for n in names):,}", _patterns(names)))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        head = f"warm start from {self.source.path} ({self.source.format})"
        return "\n".join([head] + ["  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]).rstrip()
                                   for r in rows])


def _patterns(names: list[str], limit: int = 6) -> str:
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    return ", ".join(folded[:limit]) + (f", ... ({len(folded) - limit} more)" if len(folded) > limit else "")


_UNIFORM_LEAVES = ("prior.w_q", "prior.b_q", "prior.w_k")


def plan_warm_start(targets: Mapping[str, tuple[int, ...]], source: Source, init_priors: str = "random") -> WarmStart:
    """Match our parameters (name -> shape) against the source. A counterpart of the wrong shape is refused,
    naming both keys; one the source lacks is initialised here (and reported)."""
    plan = WarmStart(source)
    available, used = set(source.keys()), set()
    for name, shape in targets.items():
        where = counterpart(source.format, name)
        if where is not None and all(k in available for k in where.keys):
            theirs = where.our_shape([source.shape(k) for k in where.keys])
            if tuple(theirs) != tuple(shape):
                raise ValueError(f"model.init_from: {name} has shape {list(shape)} here but {list(theirs)} from "
                                 f"{' + '.join(where.keys)} in {source.path}")
            plan.loaded[name] = where
            used.update(where.keys)
        elif init_priors == "uniform" and name.endswith(_UNIFORM_LEAVES):
            plan.uniform[name] = tuple(shape)
        else:
            plan.fresh.append(name)
    plan.ignored = [k for k in source.keys() if k not in used]
    if not plan.loaded:
        raise ValueError(f"model.init_from: no parameter of this model has a counterpart in {source.path} "
                         f"(read as {source.format}; set model.init_format if that is wrong)")
    return plan
