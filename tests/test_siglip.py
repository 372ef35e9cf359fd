"""The SigLIP family beside CLIP: its own scores, prompts and preprocessing, LoRA where its layers are, presets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import compose

from pneumo_exp.classify.backbone import backbone_source
from pneumo_exp.classify.checkpoint import save_weights
from pneumo_exp.classify.model import build_classifier
from pneumo_exp.config import ClassifierMode, job_config
from pneumo_exp.validate import SettingError

ONE_TEMPLATE = "clip_lora.prompts={NORMAL:[a normal chest],BACTERIA:[a bacterial chest],VIRUS:[a viral chest]}"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def build(cfg):
    cfg = job_config(cfg)
    classifier, peft_model = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    return classifier.eval(), peft_model


def siglip(make_cfg, *overrides):
    return make_cfg("clip_lora=tiny_siglip", *overrides)


def test_logits_are_the_checkpoints_own_sigmoid_scores(make_cfg):
    """exp(logit_scale) x cosine + logit_bias, with the prompts padded to 64 and no text mask, is what SiglipModel's
    own forward gives for the same prompts and pixels: a wrong scale, bias, padding or mask changes the numbers."""
    classifier, _ = build(siglip(make_cfg, "clip_lora.mode=zero_shot", "clip_lora.center_class_embeddings=false",
                                 ONE_TEMPLATE))
    assert classifier.prompt_ids.shape == (3, 64) and classifier.prompt_mask is None
    assert classifier.clip.logit_bias.item() == pytest.approx(-10.0)
    images = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        own = classifier.clip(input_ids=classifier.prompt_ids, pixel_values=classifier.pixel_values(images))
        ours = classifier(images)
    torch.testing.assert_close(ours, own.logits_per_image, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, ours - classifier.clip.logit_bias)  # the bias is in the logits


def test_a_text_mask_or_unpadded_prompts_would_change_siglip_embeddings(make_cfg):
    """Guards the reason the SigLIP path passes no mask: on this tower the mask and the padding length matter."""
    classifier, _ = build(siglip(make_cfg, "clip_lora.mode=zero_shot", ONE_TEMPLATE))
    ids = classifier.prompt_ids
    mask = (ids != classifier.clip.config.text_config.pad_token_id).long()
    with torch.no_grad():
        plain = classifier.clip.get_text_features(input_ids=ids).pooler_output
        masked = classifier.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert not torch.allclose(plain, masked, atol=1e-3)


def test_clip_keeps_its_mask_and_capped_scale(make_cfg):
    classifier, _ = build(make_cfg("clip_lora=tiny_vit", "clip_lora.mode=zero_shot"))
    assert classifier.prompt_mask is not None and classifier.prompt_ids.shape[1] == 77
    with torch.no_grad():
        classifier.clip.logit_scale.fill_(10.0)
        cosines = torch.tensor([[0.5, -0.5, 0.0]])
        torch.testing.assert_close(classifier.scores(cosines), 100.0 * cosines)


def test_lowercase_prompts_is_what_the_tokenizer_reads(make_cfg):
    upper, _ = build(siglip(make_cfg, "clip_lora.mode=zero_shot",
                            "clip_lora.prompts={NORMAL:[A Normal],BACTERIA:[A Bacterial],VIRUS:[A Viral]}",
                            "clip_lora.lowercase_prompts=true"))
    lower, _ = build(siglip(make_cfg, "clip_lora.mode=zero_shot",
                            "clip_lora.prompts={NORMAL:[a normal],BACTERIA:[a bacterial],VIRUS:[a viral]}"))
    assert torch.equal(upper.prompt_ids, lower.prompt_ids)


@pytest.mark.parametrize("mode,trains", [("zero_shot", set()), ("linear_probe", {"class_embeddings"}),
                                         ("lora", {"lora_"}), ("full", {"vision_model", "text_model"})])
def test_every_mode_trains_what_it_says_and_the_logit_scale_and_bias_stay(make_cfg, mode, trains):
    classifier, _ = build(siglip(make_cfg, f"clip_lora.mode={mode}"))
    names = [name for name, p in classifier.named_parameters() if p.requires_grad]
    assert all(any(part in name for part in trains) for name in names) and bool(names) == bool(trains)
    assert not any("logit_scale" in name or "logit_bias" in name for name in names)
    images = torch.rand(2, 1, 64, 64)
    if names:
        classifier(images).sum().backward()
        assert all(p.grad is not None for p in classifier.parameters() if p.requires_grad)


def test_lora_adapts_attention_and_mlp_of_both_towers_but_not_the_pooling_attention(make_cfg):
    _, peft_model = build(siglip(make_cfg))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    for tower in ("vision_model", "text_model"):
        for layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2"):
            assert any(f"{tower}.encoder.layers.0.{layer}" in name for name in adapted), (tower, layer)
    assert any("vision_model.head.mlp.fc1" in name for name in adapted)
    assert not any("head.attention" in name for name in adapted)  # nn.MultiheadAttention never calls out_proj


@pytest.mark.parametrize("preset,targets,missing", [("tiny_siglip", "[q_proj,c_fc]", "c_fc"),
                                                    ("tiny_vit", "[query,value]", "query")])
def test_a_target_that_matches_no_layer_is_refused_in_one_line(make_cfg, preset, targets, missing):
    with pytest.raises(SettingError) as error:
        build(make_cfg(f"clip_lora={preset}", "clip_lora.mode=lora", f"clip_lora.lora.target_modules={targets}"))
    message = str(error.value)
    assert "\n" not in message and "(clip_lora.lora.target_modules)" in message and missing in message
    assert "q_proj" in message.split("choose among")[1]  # names what would match


@pytest.mark.parametrize("preset", ["tiny_vit", "tiny_siglip"])
def test_saved_adapter_loads_in_plain_peft_into_the_plain_transformers_model(make_cfg, tmp_path, preset):
    from peft import PeftModel
    from transformers import AutoModel

    cfg = make_cfg(f"clip_lora={preset}", "clip_lora.mode=lora")
    classifier, peft_model = build(cfg)
    with torch.no_grad():  # a trained adapter: lora_B away from its zero start
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    save_weights(classifier, peft_model, ClassifierMode.lora, tmp_path)
    plain = AutoModel.from_pretrained(backbone_source(job_config(cfg).clip_lora, cfg.paths.cache_dir))
    loaded = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
    pixels = classifier.pixel_values(torch.rand(2, 1, 64, 64))
    with torch.no_grad():
        ours = classifier.image_features(pixels)
        theirs = loaded.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs)
    with loaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(ours, loaded.get_image_features(pixel_values=pixels).pooler_output, atol=1e-4)


def test_a_checkpoint_of_the_other_family_names_the_family_key(make_cfg, model_cache):
    folder = backbone_source(job_config(make_cfg("clip_lora=tiny_vit")).clip_lora, model_cache)
    with pytest.raises(SettingError, match=r"holds a CLIPModel, not a SiglipModel \(clip_lora.family\)"):
        build(make_cfg("clip_lora=tiny_siglip", f"clip_lora.pretrained={folder}"))


def test_conv_tower_is_refused_for_siglip(make_cfg):
    with pytest.raises(SettingError, match=r"\(clip_lora.image_tower\)"):
        build(make_cfg("clip_lora=tiny_siglip", "clip_lora.image_tower=conv"))


def checkpoint_copy(make_cfg, model_cache, tmp_path, **processor):
    source = backbone_source(job_config(make_cfg("clip_lora=tiny_siglip")).clip_lora, model_cache)
    folder = tmp_path / "checkpoint"
    shutil.copytree(source, folder)
    config_file = folder / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **processor}))
    return folder


def test_image_preprocessing_comes_from_the_checkpoint_and_matches_its_processor(make_cfg, model_cache, tmp_path):
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    folder = checkpoint_copy(make_cfg, model_cache, tmp_path, image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2],
                             resample=2)
    classifier, _ = build(siglip(make_cfg, f"clip_lora.pretrained={folder}", "clip_lora.mode=zero_shot"))
    assert (classifier.preprocessing.mean, classifier.preprocessing.resample) == ((0.4,) * 3, "bilinear")
    assert classifier.preprocessing.source == "preprocessor_config.json"
    gray = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    processor = SiglipImageProcessorPil.from_pretrained(folder)
    theirs = processor(images=Image.fromarray(gray).convert("RGB"), return_tensors="pt").pixel_values
    ours = classifier.pixel_values(torch.from_numpy(gray).float().div(255).view(1, 1, 64, 64))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_resize_then_crop_processor_is_followed(make_cfg, model_cache, tmp_path):
    folder = checkpoint_copy(make_cfg, model_cache, tmp_path, size={"shortest_edge": 80}, do_center_crop=True,
                             crop_size={"height": 64, "width": 64})
    classifier, _ = build(siglip(make_cfg, f"clip_lora.pretrained={folder}", "clip_lora.mode=zero_shot"))
    assert (classifier.preprocessing.resize, classifier.preprocessing.crop) == (80, 64)
    assert classifier.pixel_values(torch.rand(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_an_image_size_other_than_the_checkpoints_is_refused(make_cfg, model_cache, tmp_path):
    folder = checkpoint_copy(make_cfg, model_cache, tmp_path)
    with pytest.raises(SettingError, match=r"trained on \[64\] px images .*\(clip_lora.image_size\)"):
        build(siglip(make_cfg, f"clip_lora.pretrained={folder}", "clip_lora.image_size=96",
                     "dataset.resolution=96"))


@pytest.mark.parametrize("preset,hub_id,size", [("siglip_b16", "google/siglip-base-patch16-224", 224),
                                                ("siglip2_b16", "google/siglip2-base-patch16-224", 224),
                                                ("medsiglip_448", "google/medsiglip-448", 448)])
def test_hub_presets_compose_with_a_revision(preset, hub_id, size):
    cfg = job_config(compose([f"clip_lora={preset}", f"clip_lora.revision={'a' * 40}", "paths.output_dir=/tmp/x"]))
    clip = cfg.clip_lora
    assert (clip.family.value, clip.pretrained, clip.revision, clip.image_size) == ("siglip", hub_id, "a" * 40, size)
    assert set(clip.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert clip.train_text_encoder and clip.mode.value == "lora"
    assert compose([f"clip_lora={preset}"]).clip_lora.revision is None  # no commit vouched for: the preset says so
