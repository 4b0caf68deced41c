"""HiCLIP and PyramidCLIP as Hugging Face transformers models: `AutoModel.from_pretrained(folder)` with no hub and
no trust_remote_code, once this module is imported.

    import model.hf  # registers model_type "hiclip" with AutoConfig, AutoModel and the zero-shot pipeline
    m = transformers.AutoModel.from_pretrained("runs/X/hf")

Vanilla CLIPs export to transformers' own `CLIPModel` (recipes/convert.py --hf) and need none of this.

Why importing this module, not `import model`, registers: transformers has no plugin discovery for Auto
classes, so registration means importing `PreTrainedModel`, which costs ~2 s on top of torch (measured on our
CPU machines: 1.96 s for transformers.modeling_utils). `model/` is imported by every rank, test and command
line tool, nearly all of which never touch transformers' model classes; the one line above is paid only by
whoever loads an exported folder through transformers.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor
from transformers import (AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import ModelOutput

from model.clip import CLIP
from model.config import ModelConfig, model_config_from_dict

MODEL_TYPE = "hiclip"


class HiCLIPConfig(PretrainedConfig):
    """Our `ModelConfig` as a transformers config: `model` holds its `dataclasses.asdict` form."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = model if model is not None else dataclasses.asdict(ModelConfig())
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_dict(self.model)


@dataclasses.dataclass
class HiCLIPOutput(ModelOutput):
    """The names transformers' CLIPModel uses, so the zero-shot pipeline reads `logits_per_image`."""

    logits_per_image: Tensor | None = None
    logits_per_text: Tensor | None = None
    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None


class HiCLIPModel(PreTrainedModel):
    """Our CLIP (any attention, any loss) behind transformers' interface; weights are ours under `model.`."""

    config_class = HiCLIPConfig
    base_model_prefix = "hiclip"
    main_input_name = "pixel_values"

    def __init__(self, config: HiCLIPConfig):
        super().__init__(config)
        self.model = CLIP(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        pass  # CLIP initialises itself; from_pretrained then overwrites every weight

    def get_image_features(self, pixel_values: Tensor, **_) -> Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Tensor, **_) -> Tensor:
        # transformers' CLIP tokenizer pads with <end_of_text>; our pooling takes the first one, as CLIPModel does.
        return self.model.encode_text(input_ids)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None, **_) -> HiCLIPOutput:
        image = self.get_image_features(pixel_values) if pixel_values is not None else None
        text = self.get_text_features(input_ids) if input_ids is not None else None
        out = HiCLIPOutput(image_embeds=image, text_embeds=text)
        if image is not None and text is not None:
            scale = self.model.logit_scale.exp().clamp(max=self.model.cfg.max_logit_scale)
            out.logits_per_image = scale * image @ text.t()
            out.logits_per_text = out.logits_per_image.t()
        return out


AutoConfig.register(MODEL_TYPE, HiCLIPConfig, exist_ok=True)
AutoModel.register(HiCLIPConfig, HiCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(HiCLIPConfig, HiCLIPModel, exist_ok=True)
