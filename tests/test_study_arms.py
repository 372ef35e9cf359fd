"""The arms of each augmentation study differ only in what is studied: their augmentation, their stages and the
generator they read. Class weights, the optimizer-step budget, the schedule, the classifier and the data are the
same in every arm (composed as the study's Makefile target composes them)."""

from __future__ import annotations

import pytest
from conftest import compose
from omegaconf import OmegaConf

from pneumo_exp.rundir import RESULT_NEUTRAL_KEYS, resolved_settings, shapes_result

STUDIES = {
    "augment_study": ("none", "duplicate_real", "mix", "filtered", "synthetic_then_real"),
    "augment_cpu": ("original_no_augmentation", "original_study", "ratio_half"),
}
STUDIED = ("augmentation.", "diffusion_lora.")  # what an arm may change besides its stages
FOLDERS = ["paths.output_dir=/study/run", "paths.cache_dir=/study/cache", "paths.study_dir=/study",
           "dataset.root=/data"]


def arm_settings(study: str, arm: str) -> dict:
    """The arm's resolved settings that can change a number (dotted keys)."""
    cfg = OmegaConf.to_container(compose([f"experiment={study}/{arm}", *FOLDERS]), resolve=True)
    cfg.pop("hydra", None)
    return {key: value for key, value in resolved_settings(cfg).items() if shapes_result(key, RESULT_NEUTRAL_KEYS)}


@pytest.mark.parametrize("study", STUDIES)
def test_the_arms_of_a_study_differ_only_in_what_is_studied(study):
    arms = {arm: arm_settings(study, arm) for arm in STUDIES[study]}
    keys = set().union(*arms.values())
    differing = sorted(key for key in keys if len({repr(settings.get(key)) for settings in arms.values()}) > 1)
    assert [key for key in differing if key != "stages" and not key.startswith(STUDIED)] == []
    for settings in arms.values():
        assert settings["trainer.max_steps"], "every arm trains the same step budget"
        assert settings["trainer.class_weights_from"] == "real"


def test_the_count_matched_control_gets_the_counts_of_the_plain_mix():
    control, mix = arm_settings("augment_study", "duplicate_real"), arm_settings("augment_study", "mix")
    for key in ("augmentation.strategy", "augmentation.ratio", "augmentation.per_class_ratio"):
        assert control[key] == mix[key]
    assert control["augmentation.source"] == "duplicate_real" and mix["augmentation.source"] == "synthetic"
