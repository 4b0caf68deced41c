"""Weights in and out: open_clip and Hugging Face CLIP -> ours (warm start), ours -> Hugging Face (export), all
offline, with random weights saved locally. The open_clip and transformers models are their own classes
(`open_clip.model.CLIP`, `transformers.CLIPModel`) built at a tiny size of the same architecture family as
ViT-B/32 (pre-LN ViT + causal text transformer): ViT-B/32 itself would cost ~150 M parameters per copy."""
import dataclasses

import pytest
import torch
from PIL import Image

from model.clip import CLIP
from model.interop import Source, hf_clip_config, open_clip_config, plan_warm_start
from model.pretrained import save_pretrained
from recipes.warm_start import load_warm_start
from tests.unit.test_pyramid_model import EOT, SOT, small_config, tokens

ATOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value (LayerNorm gains off 1, biases off 0): a swapped or dropped
    tensor then changes the embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _warm(cfg, path, fmt="auto", priors="random", seed=123):
    torch.manual_seed(seed)  # other initial weights than the source's, so loading has to overwrite them
    cfg = dataclasses.replace(cfg, init_from=str(path), init_format=fmt, init_priors=priors)
    model = CLIP(cfg).eval()
    plan = load_warm_start(model, cfg)
    return model, plan


def _inputs(cfg, n=3):
    gen = torch.Generator().manual_seed(7)
    size = cfg.vision.image_size
    return torch.randn(n, 3, size, size, generator=gen), tokens(n, gen, cfg.text.context_length)


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_open_clip_to_ours(tmp_path, suffix):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = small_config()
    theirs = open_clip.model.CLIP(**open_clip_config(cfg)).eval()
    _perturb(theirs, 0)
    path = tmp_path / f"open_clip.{suffix}"
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(state, path) if suffix == "safetensors" else torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    ours, plan = _warm(cfg, path)
    assert plan.source.format == "open_clip" and not plan.ignored
    assert all(n.startswith("visual.regions.") for n in plan.fresh)  # PyramidCLIP's region tokens: fresh
    images, text = _inputs(cfg)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images, normalize=True), atol=ATOL)
        assert torch.allclose(ours.encode_text(text), theirs.encode_text(text, normalize=True), atol=ATOL)
    assert torch.equal(ours.logit_scale.exp().reshape(()), theirs.logit_scale.exp())


def _hf_model(cfg, seed=1):
    from transformers import CLIPConfig, CLIPModel

    theirs = CLIPModel(CLIPConfig(**hf_clip_config(cfg))).eval()
    _perturb(theirs, seed)
    return theirs


def _hf_embed(theirs, images, text):
    norm = torch.nn.functional.normalize
    return (norm(theirs.get_image_features(pixel_values=images).pooler_output, dim=-1),
            norm(theirs.get_text_features(input_ids=text).pooler_output, dim=-1))


def test_hf_clip_to_ours(tmp_path):
    cfg = small_config()
    theirs = _hf_model(cfg)
    theirs.save_pretrained(tmp_path / "hf")
    ours, plan = _warm(cfg, tmp_path / "hf")
    assert plan.source.format == "hf"
    images, text = _inputs(cfg)
    with torch.no_grad():
        hf_image, hf_text = _hf_embed(theirs, images, text)
        assert torch.allclose(ours.encode_image(images), hf_image, atol=ATOL)
        assert torch.allclose(ours.encode_text(text), hf_text, atol=ATOL)
    assert torch.allclose(ours.logit_scale.reshape(()), theirs.logit_scale)


def test_shape_mismatch_is_refused_naming_the_key(tmp_path):
    cfg = small_config()
    save_pretrained(tmp_path / "src", CLIP(cfg).state_dict(), cfg)
    wider = dataclasses.replace(cfg, embed_dim=24)
    with pytest.raises(ValueError, match=r"visual\.proj\.weight has shape \[24, 32\] here but \[16, 32\]"):
        _warm(wider, tmp_path / "src")


def test_table_names_loaded_fresh_and_ignored(tmp_path):
    hier = small_config("hier")
    save_pretrained(tmp_path / "hier", CLIP(hier).state_dict(), hier)
    clip = small_config()
    save_pretrained(tmp_path / "clip", CLIP(clip).state_dict(), clip)
    # HiCLIP from a CLIP: the priors are fresh. A CLIP from a HiCLIP: the priors are ignored.
    _, plan = _warm(hier, tmp_path / "clip", priors="uniform")
    assert plan.uniform and all(".prior." in n for n in plan.uniform)
    assert {n for n in plan.fresh if ".prior." in n} == {n for n, _ in CLIP(hier).named_parameters()
                                                       if ".prior." in n} - set(plan.uniform)
    _, back = _warm(clip, tmp_path / "hier")
    assert back.ignored and all(".prior." in k for k in back.ignored) and not back.fresh
    table = plan.table(lambda n: 1)
    for status in ("loaded", "fresh: uniform links", "fresh: initialised"):
        assert status in table
    assert "visual.transformer.blocks.*.prior.w_q" in table


def test_uniform_priors_give_uniform_links(tmp_path):
    """W_Q = W_K = 0, b_Q = 0: every token splits its neighbour probability evenly (docs/method.md §1.5)."""
    clip, hier = small_config(), small_config("hier")
    save_pretrained(tmp_path / "clip", CLIP(clip).state_dict(), clip)
    model, _ = _warm(hier, tmp_path / "clip", priors="uniform")
    _, text = _inputs(hier)
    with torch.no_grad():
        _, links = model.text(text, return_links=True)
    n = int((text[0] == EOT).nonzero()[0]) + 1  # real tokens of sample 0
    first = links[0][0, : n - 1]
    expected = torch.full_like(first, 0.5)
    expected[0] = expected[-1] = 0.5**0.5  # the two end tokens have a single neighbour
    assert torch.allclose(first, expected)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _export(tmp_path, attention, model_class="auto"):
    from recipes.convert import export_hf

    cfg = dataclasses.replace(small_config(attention), text=dataclasses.replace(
        small_config().text, vocab_size=49408, context_length=16, attention=attention))
    ours = CLIP(cfg).eval()
    _perturb(ours, 3)
    save_pretrained(tmp_path / "ours", ours.state_dict(), cfg)
    return ours, cfg, export_hf(tmp_path / "ours", tmp_path / "hf", model_class)


def _zero_shot_both(ours, cfg, folder):
    """The pipeline's scores and ours (our tokenizer and eval transform) on the same images and labels."""
    from transformers import pipeline
    from torchvision.transforms.v2.functional import pil_to_tensor

    from data_pipeline.tokenizer import Tokenizer
    from data_pipeline.transforms import SampleTransform, ViewConfig

    size = cfg.vision.image_size
    gen = torch.Generator().manual_seed(5)
    images = [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy())
              for _ in range(2)]
    labels = ["cat", "red car", "tree"]
    template = "This is a photo of {}."
    classify = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    theirs = [{r["label"]: r["score"] for r in out}
              for out in classify(images, candidate_labels=labels, hypothesis_template=template)]
    view = SampleTransform(ViewConfig(size, train=False)).global_view
    pixels = torch.stack([view(pil_to_tensor(im)) for im in images])
    text = Tokenizer(cfg.text.context_length)([template.format(c) for c in labels])
    with torch.no_grad():
        logits = ours.logit_scale.exp() * ours.encode_image(pixels) @ ours.encode_text(text).t()
    mine = [dict(zip(labels, row.tolist())) for row in logits.softmax(-1)]
    return theirs, mine


def test_ours_to_hf_clip_and_pipeline(tmp_path, offline):
    from transformers import CLIPModel

    ours, cfg, folder = _export(tmp_path, "vanilla")
    theirs = CLIPModel.from_pretrained(folder).eval()
    images, text = _inputs(cfg)
    text[text == EOT], text[text == SOT] = 49407, 49406  # CLIP's ids in a full vocabulary
    with torch.no_grad():
        hf_image, hf_text = _hf_embed(theirs, images, text)
        assert torch.allclose(ours.encode_image(images), hf_image, atol=ATOL)
        assert torch.allclose(ours.encode_text(text), hf_text, atol=ATOL)
    pipe, mine = _zero_shot_both(ours, cfg, folder)
    for p, m in zip(pipe, mine):
        assert p.keys() == m.keys() and all(abs(p[k] - m[k]) < ATOL for k in p), (p, m)


def test_hiclip_through_automodel_and_pipeline(tmp_path, offline):
    from transformers import AutoModel

    import model.hf  # noqa: F401 - registers model_type "hiclip"

    ours, cfg, folder = _export(tmp_path, "hier")
    theirs = AutoModel.from_pretrained(folder).eval()
    assert type(theirs).__name__ == "HiCLIPModel"
    images, text = _inputs(cfg)
    text[text == EOT], text[text == SOT] = 49407, 49406
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.get_image_features(images), atol=ATOL)
        assert torch.allclose(ours.encode_text(text), theirs.get_text_features(text), atol=ATOL)
    pipe, mine = _zero_shot_both(ours, cfg, folder)
    for p, m in zip(pipe, mine):
        assert all(abs(p[k] - m[k]) < ATOL for k in p), (p, m)


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Source(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        Source(tmp_path / "junk.pt")
    cfg = small_config()
    with pytest.raises(ValueError, match="no parameter of this model"):
        torch.save({"unrelated": torch.zeros(1)}, tmp_path / "other.pt")
        plan_warm_start({n: tuple(p.shape) for n, p in CLIP(cfg).named_parameters()}, Source(tmp_path / "other.pt"))


def test_chunked_copy_equals_whole_read(tmp_path):
    """The warm start copies in row chunks (bounded memory); the result is the whole tensor, exactly."""
    cfg = small_config()
    _hf_model(cfg).save_pretrained(tmp_path / "hf")
    plan = plan_warm_start({n: tuple(p.shape) for n, p in CLIP(cfg).named_parameters()}, Source(tmp_path / "hf"))
    for name in plan.loaded:
        whole = plan.tensor(name)
        dst = torch.empty_like(whole)
        plan.copy_into(name, dst, chunk_elements=7)  # many chunks per tensor, one row at a time for wide ones
        assert torch.equal(dst, whole), name
