"""Every config option and experiment composes; typos fail at composition."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, REPO, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

GROUPS = ["dataset", "clip_lora", "diffusion_lora", "augmentation", "optim", "trainer", "logger", "hparams_search",
          "debug", "hydra/launcher"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
EXPERIMENTS = sorted(str(path.relative_to(REPO / "experiments").with_suffix(""))
                     for path in (REPO / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}", "dataset.root=/data" if option in ("kermany",) else "seed=0"])
    if group == "hparams_search":
        assert cfg.sweep_objective == "val/f1_macro"
    elif group == "debug":  # a preset of values in other groups, no node of its own
        assert "debug" not in cfg
    elif "/" not in group:  # hydra/* options live in the hydra node, which composition checks
        assert cfg[group] is not None
    OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    from pneumo_exp.validate import check_plan

    cfg = compose([f"experiment={experiment}"])
    assert cfg.experiment_name
    check_plan(cfg)  # every recipe passes the start-of-job checks
    if cfg.dataset.kind != "phantom":
        assert OmegaConf.is_missing(cfg.dataset, "root") or cfg.dataset.root


def test_experiments_folder_is_the_experiment_group():
    assert EXPERIMENTS, "experiments/ holds no recipes"
    assert (CONF_DIR / "experiment").resolve() == (REPO / "experiments").resolve()


@pytest.mark.parametrize("override", ["dataset.resolutin=64", "clip_lora.mode=lorra", "clip_lora.lora.r=two",
                                      "trainer.class_balance=oversample", "augmentation.strategy=double",
                                      "logger.mode=ofline", "clip_lora.image_tower=resnet",
                                      "optim.lr=fast"])
def test_typos_and_bad_values_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException) as error:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(error.value) or override in str(error.value)


def test_the_smoke_preset_wins_over_the_experiment_and_names_its_job_folder():
    from pneumo_exp.rundir import job_folder_name

    demo = compose(["experiment=demo"])
    smoke = compose(["experiment=demo", "debug=smoke"])
    assert (demo.trainer.epochs, demo.dataset.patients_per_class) == (15, 24)
    assert (smoke.trainer.epochs, smoke.dataset.patients_per_class) == (2, 8)
    assert compose(["experiment=demo", "debug=smoke", "trainer.epochs=3"]).trainer.epochs == 3
    assert job_folder_name(["experiment=demo", "debug=smoke"]) == "debug=smoke,experiment=demo"


def test_alpha_is_independent_of_rank():
    cfg = compose(["clip_lora.lora.r=4", "clip_lora.lora.alpha=32"])
    assert (cfg.clip_lora.lora.r, cfg.clip_lora.lora.alpha) == (4, 32)


WITHDRAWN_HUB_NAMESPACES = ("stabilityai/stable-diffusion-2",)  # removed from the hub in November 2025


@pytest.mark.parametrize("option", ["sd2", "sd21_base"])
def test_sd2_presets_name_maintained_mirrors(option):
    cfg = compose([f"diffusion_lora={option}"])
    assert cfg.diffusion_lora.pretrained.startswith("sd2-community/")
    assert not cfg.diffusion_lora.pretrained.startswith(WITHDRAWN_HUB_NAMESPACES)


def test_no_config_names_a_withdrawn_hub_id():
    for path in [*CONF_DIR.rglob("*.yaml"), *(REPO / "experiments").rglob("*.yaml")]:
        assert "stabilityai/stable-diffusion-2" not in path.read_text(), path


def test_config_module_imports_no_stage():
    import ast

    tree = ast.parse((REPO / "pneumo_exp" / "config.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.startswith("pneumo_exp")} == {"pneumo_exp.labels"}
