"""Options do what their names say: label smoothing stays uniform under class weights, a selection metric that no
epoch can maximise is refused before training, and models.json holds the commit each load actually read."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose, write_image

from pneumo_exp.labels import CLASSES, class_index

# ------------------------------------------------------------------------------------ label smoothing and weights


def test_smoothed_weighted_loss_equals_the_hand_computed_value():
    from pneumo_exp.classify.train import training_objective

    # softmax of [0, ln 2, 0] is [1/4, 1/2, 1/4]; smoothing 0.3 over 3 classes: the target is 0.8 / 0.1 / 0.1
    logits = torch.tensor([[0.0, math.log(2), 0.0]] * 2)
    labels = torch.tensor([class_index("NORMAL"), class_index("BACTERIA")])
    weights = torch.ones(len(CLASSES))
    weights[class_index("BACTERIA")] = 3.0
    normal_loss = 0.8 * math.log(4) + 0.1 * math.log(2) + 0.1 * math.log(4)  # 1.9 ln 2
    bacteria_loss = 0.1 * math.log(4) + 0.8 * math.log(2) + 0.1 * math.log(4)  # 1.2 ln 2
    expected = (1 * normal_loss + 3 * bacteria_loss) / (1 + 3)  # the weighted mean over images
    assert training_objective(logits, labels, weights, 0.3).item() == pytest.approx(expected, rel=1e-6)


def test_the_smoothed_target_is_uniform_whatever_the_class_weights():
    from pneumo_exp.classify.train import training_objective

    logits = torch.tensor([[0.3, -0.2, 0.5]], requires_grad=True)
    bacteria = torch.tensor([class_index("BACTERIA")])
    weights = torch.tensor([0.5, 4.0, 2.0])
    training_objective(logits, bacteria, weights, 0.1).backward()
    target = logits.softmax(-1).detach() - logits.grad  # the gradient of a cross-entropy is p - target
    expected = torch.full((1, 3), 0.1 / 3)
    expected[0, class_index("BACTERIA")] = 0.9 + 0.1 / 3
    assert torch.allclose(target, expected, atol=1e-6)


def test_the_epoch_objective_is_the_weighted_mean_of_uniformly_smoothed_losses(make_cfg):
    from test_train_loop import frozen_training, phantom_split

    from pneumo_exp.classify.train import class_weights, train_one_epoch
    from pneumo_exp.data.augment import to_unit_float

    train = phantom_split({"NORMAL": 12, "BACTERIA": 4, "VIRUS": 2})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=weighted_loss", "trainer.label_smoothing=0.2", "trainer.batch_size=32")
    weights = class_weights(train.labels)
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, weights, None)
    with torch.no_grad():
        log_probabilities = classifier.eval()(to_unit_float(train.pixels)).float().log_softmax(-1)
    targets = 0.8 * F.one_hot(train.labels, len(CLASSES)) + 0.2 / len(CLASSES)
    per_image = -(targets * log_probabilities).sum(-1)
    image_weights = weights[train.labels]
    expected = (image_weights * per_image).sum() / image_weights.sum()
    assert metrics["objective"] == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- selection metric


def folder_tree(root: Path, validation_classes: tuple[str, ...]) -> Path:
    shade = iter(range(0, 250, 5))  # every image distinct: no byte-identical copies across splits
    for split, classes in (("train", CLASSES), ("val", validation_classes), ("test", CLASSES)):
        for label in classes:
            for index in range(2):
                write_image(root / split / label / f"{index}.png", next(shade))
    return root


def refused_auroc_selection(make_cfg, root: Path, *overrides: str) -> str:
    from pneumo_exp.pipeline import run
    from pneumo_exp.validate import SettingError

    cfg = make_cfg("dataset=folder", f"dataset.root={root}", "dataset.resolution=64", "clip_lora=tiny_vit",
                   "clip_lora.image_size=64", "stages=[data,classify]", "trainer.cpu=true",
                   "trainer.selection_metric=val/auroc_macro", *overrides)
    with pytest.raises(SettingError) as refused:
        run(cfg)
    return str(refused.value)


@pytest.mark.parametrize("validation_classes,overrides,missing", [
    (("NORMAL", "BACTERIA"), (), "VIRUS"),
    (CLASSES, ("trainer.eval_batch_size=1", "trainer.max_eval_batches=1"), "or"),  # capped to one image
])
def test_auroc_selection_without_a_validation_class_is_refused_before_training(make_cfg, tmp_path,
                                                                               validation_classes, overrides,
                                                                               missing):
    message = refused_auroc_selection(make_cfg, folder_tree(tmp_path / "data", validation_classes), *overrides)
    assert "trainer.selection_metric" in message and missing in message and "val/f1_macro" in message
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_selection_check_refuses_only_a_validation_split_missing_a_class():
    from pneumo_exp.validate import check_selection_split

    cfg = compose(["clip_lora=tiny_vit", "trainer.selection_metric=val/auroc_macro"])
    check_selection_split(cfg, list(CLASSES))  # every class: fine
    check_selection_split(cfg, [])  # no validation split (the final fit): nothing is selected
    with pytest.raises(Exception, match="BACTERIA"):
        check_selection_split(cfg, ["NORMAL", "VIRUS"])
    for fine in (["trainer.selection_metric=val/f1_macro"], ["clip_lora.mode=zero_shot",
                                                              "trainer.selection_metric=val/auroc_macro"]):
        check_selection_split(compose(["clip_lora=tiny_vit", *fine]), ["NORMAL"])


def test_the_refusal_comes_before_any_stage_runs(make_cfg, tmp_path, monkeypatch):
    import pneumo_exp.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_training_stages", lambda *args: pytest.fail("a stage ran"))
    message = refused_auroc_selection(make_cfg, folder_tree(tmp_path / "data", ("NORMAL", "BACTERIA")))
    assert "VIRUS" in message


# ------------------------------------------------------------------------------------------------- models.json

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def fake_hub(hub: Path, model_cache: Path) -> None:
    """org/clip and org/sd in the hub cache's layout, each with snapshots A and B (same files), main at A."""
    from pneumo_exp.classify.model import backbone_source
    from pneumo_exp.diffusion.stable_diffusion import pipeline_source

    cfg = compose([f"paths.cache_dir={model_cache}", "clip_lora=tiny_vit", "diffusion_lora=tiny"])
    folders = {"clip": Path(backbone_source(cfg.clip_lora, model_cache)),
               "sd": Path(pipeline_source(cfg.diffusion_lora, model_cache))}
    for name, folder in folders.items():
        repo = hub / f"models--org--{name}"
        for commit in (COMMIT_A, COMMIT_B):
            shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT_A)


@pytest.mark.slow
def test_models_json_holds_the_commit_each_load_read_not_the_ref_at_the_end(tmp_path, model_cache):
    fake_hub(tmp_path / "hub", model_cache)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import compose
        from pneumo_exp.classify.model import load_backbone
        from pneumo_exp.diffusion.stable_diffusion import load_components, load_pipeline
        from pneumo_exp.pipeline import record_loaded_models

        cfg = compose(["clip_lora=tiny_vit", "diffusion_lora=tiny", "clip_lora.pretrained=org/clip",
                       "diffusion_lora.pretrained=org/sd", "stages=[data,diffusion,synthesize,classify]"])
        out, hub = Path({str(out)!r}), Path({str(tmp_path / "hub")!r})
        refs = {{name: hub / f"models--org--{{name}}" / "refs" / "main" for name in ("clip", "sd")}}

        def recorded():
            record_loaded_models(cfg, out)
            return {{role: entry["commit"] for role, entry in json.loads((out / "models.json").read_text()).items()}}

        load_backbone("org/clip")
        load_components("org/sd")  # the diffusion stage's load
        for ref in refs.values():
            ref.write_text({COMMIT_B!r})  # the hub cache moves on after the loads
        after_training = recorded()
        load_pipeline("org/sd", device="cpu")  # the synthesize stage's load, at B
        refs["sd"].write_text({COMMIT_A!r})
        print(json.dumps({{"after_training": after_training, "after_synthesis": recorded()["diffusion"]}}))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads(done.stdout.strip().splitlines()[-1])
    assert recorded["after_training"] == {"classifier": COMMIT_A, "diffusion": COMMIT_A}
    assert recorded["after_synthesis"] == COMMIT_B
