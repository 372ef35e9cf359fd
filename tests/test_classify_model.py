"""The prompt classifier: scaled-cosine logits, class/prompt order, what each mode trains, exact weight round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pneumo_exp.classify.checkpoint import load_weights, save_weights
from pneumo_exp.classify.model import build_classifier, trainable_parameters
from pneumo_exp.config import ClassifierMode
from pneumo_exp.core.checkpoint import CheckpointError
from pneumo_exp.labels import CLASSES


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 64, 64, generator=torch.Generator().manual_seed(seed))


def build(cfg):
    classifier, peft_model = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    return classifier.eval(), peft_model


@pytest.fixture
def make_cfg(make_cfg):
    """CLIP mechanics are tested on the ViT preset, the shape of the real checkpoints."""
    return lambda *overrides: make_cfg("clip_lora=tiny_vit", *overrides)


def test_logits_are_scaled_cosines_of_image_and_class_prompt_embeddings(make_cfg):
    classifier, _ = build(make_cfg("clip_lora.mode=zero_shot"))
    batch = images()
    with torch.no_grad():
        logits = classifier(batch)
        image = classifier.clip.get_image_features(pixel_values=classifier.pixel_values(batch)).pooler_output
        text = classifier.prompt_class_embeddings()
        expected = classifier.clip.logit_scale.exp() * F.normalize(image, dim=-1) @ text.t()
    assert logits.shape == (4, len(CLASSES))
    torch.testing.assert_close(logits, expected)


def test_prompt_dict_order_does_not_matter_and_swapped_prompts_swap_columns(make_cfg):
    base = make_cfg("clip_lora.mode=zero_shot")
    prompts = OmegaConf.to_container(base.clip_lora.prompts)
    reordered = make_cfg("clip_lora.mode=zero_shot")
    reordered.clip_lora.prompts = {label: prompts[label] for label in reversed(CLASSES)}
    swapped = make_cfg("clip_lora.mode=zero_shot")
    swapped.clip_lora.prompts = {**prompts, "BACTERIA": prompts["VIRUS"], "VIRUS": prompts["BACTERIA"]}
    with torch.no_grad():
        logits = build(base)[0](images())
        torch.testing.assert_close(build(reordered)[0](images()), logits)
        swapped_logits = build(swapped)[0](images())
    torch.testing.assert_close(swapped_logits[:, [0, 2, 1]], logits)
    assert not torch.allclose(swapped_logits, logits)


@pytest.mark.parametrize("prompts,message", [({"NORMAL": ["a"], "BACTERIA": ["b"]}, "missing ['VIRUS']"),
                                             ({"NORMAL": ["a"], "BACTERIA": ["b"], "VIRUS": ["c"], "COVID": ["d"]},
                                              "unknown ['COVID']"),
                                             ({"NORMAL": ["a", "x"], "BACTERIA": ["b"], "VIRUS": ["c"]},
                                              "same number")])
def test_bad_prompts_are_refused(make_cfg, prompts, message):
    cfg = make_cfg()
    cfg.clip_lora.prompts = prompts
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(cfg)


def trainable_names(classifier) -> list[str]:
    return [name for name, p in classifier.named_parameters() if p.requires_grad]


def test_each_mode_trains_what_it_says(make_cfg):
    zero = build(make_cfg("clip_lora.mode=zero_shot"))[0]
    probe = build(make_cfg("clip_lora.mode=linear_probe"))[0]
    lora = build(make_cfg("clip_lora.mode=lora"))[0]
    lora_text = build(make_cfg("clip_lora.mode=lora", "clip_lora.train_text_encoder=true"))[0]
    full = build(make_cfg("clip_lora.mode=full"))[0]
    full_text = build(make_cfg("clip_lora.mode=full", "clip_lora.train_text_encoder=true"))[0]
    assert trainable_names(zero) == []
    assert trainable_names(probe) == ["class_embeddings"]
    assert trainable_names(lora) and all("lora_" in n and "vision_model" in n for n in trainable_names(lora))
    assert any("text_model" in n for n in trainable_names(lora_text))
    assert all("lora_" in n for n in trainable_names(lora_text))
    everything = {n for n, _ in full.named_parameters()}
    assert set(trainable_names(full_text)) == everything - {"clip.logit_scale"}
    assert set(trainable_names(full)) == {n for n in everything if n.startswith("clip.vision_model")
                                          or n.startswith("clip.visual_projection")}


def test_lora_rank_alpha_dropout_and_targets_are_independent_settings(make_cfg):
    cfg = make_cfg("clip_lora.lora.r=2", "clip_lora.lora.alpha=7", "clip_lora.lora.dropout=0.2",
                   "clip_lora.lora.target_modules=[q_proj]")
    classifier, peft_model = build(cfg)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 7, 0.2)
    names = trainable_names(classifier)
    assert names and all(".q_proj." in n for n in names)


def test_linear_probe_starts_from_the_prompt_embeddings(make_cfg):
    classifier, _ = build(make_cfg("clip_lora.mode=linear_probe"))
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(classifier.class_embeddings, dim=-1),
                                   classifier.prompt_class_embeddings())


def test_frozen_text_side_is_encoded_once(make_cfg, monkeypatch):
    classifier, _ = build(make_cfg("clip_lora.mode=lora"))
    calls = []
    original = classifier.clip.get_text_features
    monkeypatch.setattr(classifier.clip, "get_text_features", lambda **kw: calls.append(1) or original(**kw))
    with torch.no_grad():
        classifier(images())
        classifier(images(seed=1))
    assert len(calls) == 1


def perturb_trainable(classifier) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainable_parameters(classifier):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("mode", ["lora", "full", "linear_probe"])
def test_saved_weights_reload_to_identical_logits(make_cfg, tmp_path, mode):
    cfg = make_cfg(f"clip_lora.mode={mode}")
    trained, trained_peft = build(cfg)
    perturb_trainable(trained)
    save_weights(trained, trained_peft, ClassifierMode(mode), tmp_path / "weights")
    fresh, fresh_peft = build(cfg)
    with torch.no_grad():
        expected = trained(images())
        assert not torch.allclose(fresh(images()), expected)  # the round trip below is not trivially true
        fresh._frozen_class_embeddings = None
        load_weights(fresh, fresh_peft, ClassifierMode(mode), tmp_path / "weights")
        torch.testing.assert_close(fresh(images()), expected, rtol=0, atol=0)


def test_adapter_is_saved_in_peft_format_with_alpha_and_rank(make_cfg, tmp_path):
    classifier, peft_model = build(make_cfg("clip_lora.lora.r=4", "clip_lora.lora.alpha=12"))
    save_weights(classifier, peft_model, ClassifierMode.lora, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 12)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_missing_or_corrupt_adapter_gives_a_clear_error(make_cfg, tmp_path):
    classifier, peft_model = build(make_cfg())
    with pytest.raises(CheckpointError, match=r"missing \(.*adapter_model.safetensors\): run again with resume=false"):
        load_weights(classifier, peft_model, ClassifierMode.lora, tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_weights(classifier, peft_model, ClassifierMode.lora, tmp_path)


def test_adapter_from_another_rank_is_refused_not_ignored(make_cfg, tmp_path):
    small, small_peft = build(make_cfg("clip_lora.lora.r=2"))
    save_weights(small, small_peft, ClassifierMode.lora, tmp_path)
    large, large_peft = build(make_cfg("clip_lora.lora.r=8"))
    with pytest.raises((CheckpointError, RuntimeError)):
        load_weights(large, large_peft, ClassifierMode.lora, tmp_path)


def test_conv_tower_preset_trains_fully_and_frozen_towers_keep_their_statistics(make_cfg):
    conv = make_cfg("clip_lora=tiny")
    classifier, _ = build(conv)
    assert {n for n, _ in classifier.named_parameters() if "vision_model" in n} <= set(trainable_names(classifier))
    assert not any("text_model" in n for n in trainable_names(classifier))
    frozen, _ = build(make_cfg("clip_lora=tiny", "clip_lora.mode=linear_probe"))
    frozen.train()
    assert not any(m.training for m in frozen.clip.vision_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = [b.clone() for b in frozen.clip.vision_model.buffers()]
    frozen(images())
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.clip.vision_model.buffers()))


def test_conv_lora_adapter_reproduces_the_model_after_training_mode_forwards(make_cfg, tmp_path):
    cfg = make_cfg("clip_lora=tiny", "clip_lora.mode=lora")
    trained, peft_model = build(cfg)
    perturb_trainable(trained)
    trained.train()
    trained(images(8))  # a training-mode forward must not change what the saved adapter cannot hold
    trained.eval()
    save_weights(trained, peft_model, ClassifierMode.lora, tmp_path)
    fresh, fresh_peft = build(cfg)
    load_weights(fresh, fresh_peft, ClassifierMode.lora, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), trained(images()), rtol=0, atol=0)


def test_seeds_start_from_different_conv_towers_and_a_seed_rebuilds_the_same(make_cfg):
    cfg = make_cfg("clip_lora=tiny")
    first = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=0)[0]
    again = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=0)[0]
    other = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=1)[0]
    weight = "clip.vision_model.stem.0.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_centred_class_embeddings_are_spread_apart(make_cfg):
    plain, _ = build(make_cfg("clip_lora=tiny", "clip_lora.center_class_embeddings=false"))
    centred, _ = build(make_cfg("clip_lora=tiny"))
    with torch.no_grad():
        off_diagonal = ~torch.eye(3, dtype=torch.bool)
        plain_cos = (plain.prompt_class_embeddings() @ plain.prompt_class_embeddings().t())[off_diagonal]
        centred_embeddings = centred.prompt_class_embeddings()
        centred_cos = (centred_embeddings @ centred_embeddings.t())[off_diagonal]
    assert plain_cos.min() > 0.9  # a random text tower maps all prompts close together
    assert centred_cos.max() < 0.0


def test_missing_pretrained_checkpoint_names_it(make_cfg, tmp_path):
    cfg = make_cfg(f"clip_lora.pretrained={tmp_path / 'no-such-model'}")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build(cfg)


def layer_forwards_and_gradients(cfg) -> tuple[int, list[torch.Tensor]]:
    """How often the first vision layer starts in one training forward + backward, and the LoRA gradients."""
    torch.manual_seed(0)  # the LoRA initialisation
    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    classifier.train()
    calls = [0]
    layer = classifier.clip.vision_model.encoder.layers[0].layer_norm1
    layer.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    F.cross_entropy(classifier(images()), torch.tensor([0, 1, 2, 0])).backward()
    return calls[0], [p.grad for p in trainable_parameters(classifier)]


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(make_cfg):
    plain_calls, plain_gradients = layer_forwards_and_gradients(make_cfg())
    checkpointed_calls, checkpointed_gradients = layer_forwards_and_gradients(
        make_cfg("clip_lora.gradient_checkpointing=true"))
    assert (plain_calls, checkpointed_calls) == (1, 2)
    for plain, checkpointed in zip(plain_gradients, checkpointed_gradients, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_conv_tower_says_it_ignores_gradient_checkpointing(make_cfg, caplog):
    with caplog.at_level("INFO"):
        build_classifier(make_cfg("clip_lora=tiny", "clip_lora.gradient_checkpointing=true").clip_lora,
                         make_cfg().paths.cache_dir)
    assert "gradient checkpointing" in caplog.text and "conv" in caplog.text


def test_a_run_config_from_before_gradient_checkpointing_still_builds(model_cache):
    """`predict` loads a run's stored config.yaml without the schema: a key added later must not be required."""
    from conftest import compose
    from omegaconf import OmegaConf

    from pneumo_exp.classify.model import build_classifier
    from pneumo_exp.config import clip_config

    clip_cfg = OmegaConf.to_container(compose(["clip_lora=tiny"]).clip_lora, resolve=True)
    del clip_cfg["gradient_checkpointing"]
    classifier, _ = build_classifier(clip_config(clip_cfg), model_cache)
    assert classifier is not None
