import dataclasses

import pytest
import torch

from model.clip import CLIP
from model.config import PRESETS, model_config_from_dict
from model.pretrained import load_pretrained, save_pretrained
from model.text import padding_mask

SOT, EOT = 49406, 49407


def tokens(lengths, context=77):
    out = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = SOT
        out[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,))
        out[i, n - 1] = EOT
    return out


def test_forward_shapes_and_normalisation():
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny"])
    out = model({"image": torch.randn(3, 3, 64, 64), "text": tokens([5, 9, 77])})
    assert out["global"].shape == out["caption"].shape == (3, 64)
    torch.testing.assert_close(out["global"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].shape == (1,)
    assert torch.allclose(out["logit_scale"], torch.tensor([1 / 0.07]))


def test_text_pools_at_eot_and_ignores_padding():
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny"]).eval()
    t = tokens([6])
    garbage = t.clone()
    garbage[0, 6:] = 123  # whatever follows EOT must not change the embedding (causal mask, EOT pooling)
    torch.testing.assert_close(model.encode_text(t), model.encode_text(garbage))
    assert not padding_mask(t)[0, :6].any() and padding_mask(t)[0, 6:].all()


def test_config_round_trip():
    for cfg in PRESETS.values():
        assert model_config_from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("max_shard_bytes", [0, 4 * 2**20])
def test_pretrained_folder_round_trip(tmp_path, max_shard_bytes):
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny"])
    files = save_pretrained(tmp_path, model.state_dict(), model.cfg, max_shard_bytes=max_shard_bytes)
    assert (len(files) > 1) == (max_shard_bytes > 0)
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a consolidated model folder"):
        load_pretrained(tmp_path)


def test_bf16_weights_take_fp32_inputs():
    # DeepSpeed's bf16 mode casts the module, not the batch: the towers must accept fp32 images.
    model = CLIP(PRESETS["tiny"]).to(torch.bfloat16)
    out = model({"image": torch.randn(2, 3, 64, 64), "text": tokens([5, 9])})
    assert out["global"].dtype == torch.bfloat16 and torch.isfinite(out["global"].float()).all()
