"""Hub ids load at the configured revision, a wrong one fails naming the key, and the run records what it loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, compose

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def fake_hub_repo(hub: Path, repo_id: str, snapshots: dict[str, Path], main: str) -> None:
    """The hub cache's layout (models--org--name/snapshots/<commit>/, refs/main) around local folders."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)


@pytest.mark.slow
def test_revision_selects_the_snapshot_and_a_wrong_one_names_the_key(tmp_path, model_cache):
    import torch
    from transformers import CLIPModel

    from pneumo_exp.classify.model import backbone_source
    from pneumo_exp.diffusion.stable_diffusion import pipeline_source

    cfg = compose([f"paths.cache_dir={model_cache}", "clip_lora=tiny_vit", "diffusion_lora=tiny"])
    clip_a = Path(backbone_source(cfg.clip_lora, model_cache))
    clip_b = tmp_path / "clip_b"
    shutil.copytree(clip_a, clip_b)
    model = CLIPModel.from_pretrained(clip_a)
    with torch.no_grad():
        model.logit_scale.fill_(1.25)
    model.save_pretrained(clip_b)
    hub = tmp_path / "hub"
    fake_hub_repo(hub, "org/clip", {COMMIT_A: clip_a, COMMIT_B: clip_b}, main=COMMIT_B)
    fake_hub_repo(hub, "org/sd", {COMMIT_A: Path(pipeline_source(cfg.diffusion_lora, model_cache))}, main=COMMIT_A)

    check = textwrap.dedent(f"""
        import json
        from pneumo_exp.classify.model import load_backbone
        from pneumo_exp.diffusion.stable_diffusion import load_components
        from pneumo_exp.errors import UserError
        from pneumo_exp.hub import describe_source

        out = {{"at_a": load_backbone("org/clip", "{COMMIT_A}")[0].logit_scale.item(),
               "at_main": load_backbone("org/clip")[0].logit_scale.item(),
               "commit_a": describe_source("org/clip", "{COMMIT_A}", "config.json")["commit"],
               "commit_main": describe_source("org/clip", None, "config.json")["commit"],
               "sd_commit": describe_source("org/sd", None, "model_index.json")["commit"]}}
        load_components("org/sd", "{COMMIT_A}")
        for load, source in ((load_backbone, "org/clip"), (load_components, "org/sd")):
            try:
                load(source, "{'c' * 40}")
            except UserError as error:
                out.setdefault("errors", []).append(str(error))
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["at_main"] == pytest.approx(1.25) and out["at_a"] != pytest.approx(1.25)
    assert (out["commit_a"], out["commit_main"], out["sd_commit"]) == (COMMIT_A, COMMIT_B, COMMIT_A)
    assert len(out["errors"]) == 2
    assert "(clip_lora.pretrained)" in out["errors"][0] and "(diffusion_lora.pretrained)" in out["errors"][1]
    assert all("c" * 40 in error for error in out["errors"])


def test_local_folder_is_recorded_by_content(tmp_path):
    from pneumo_exp.hub import MODELS_FILE, record_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    first = record_model(tmp_path / "run", "classifier", str(folder), None, "config.json")["content_sha256"]
    (folder / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")
    second = record_model(tmp_path / "run", "classifier", str(folder), None, "config.json")["content_sha256"]
    assert first != second
    record_model(tmp_path / "run", "diffusion", str(folder), None, "model_index.json")
    assert set(json.loads((tmp_path / "run" / MODELS_FILE).read_text())) == {"classifier", "diffusion"}


def test_run_records_the_models_its_stages_loaded(make_cfg, tmp_path):
    from pneumo_exp.classify.model import backbone_source
    from pneumo_exp.hub import MODELS_FILE, folder_content_hash
    from pneumo_exp.pipeline import record_loaded_models

    cfg = make_cfg("experiment=demo")
    record_loaded_models(cfg, tmp_path)
    models = json.loads((tmp_path / MODELS_FILE).read_text())
    assert list(models) == ["classifier"]
    assert models["classifier"]["content_sha256"] == folder_content_hash(backbone_source(cfg.clip_lora,
                                                                                         cfg.paths.cache_dir))


@pytest.mark.parametrize("group,option", [("clip_lora", "vit_l14"), ("clip_lora", "vit_b16"),
                                          ("diffusion_lora", "sd15"), ("diffusion_lora", "sd21_base"),
                                          ("diffusion_lora", "sd2")])
def test_every_hub_preset_has_a_revision_setting(group, option):
    cfg = compose([f"{group}={option}"])
    assert "revision" in cfg[group] and cfg[group].pretrained
    assert compose([f"{group}={option}", f"{group}.revision={COMMIT_A}"])[group].revision == COMMIT_A


PINNED = {("clip_lora", "vit_l14"): "32bd64288804d66eefd0ccbe215aa642df71cc41",
          ("clip_lora", "vit_b16"): "57c216476eefef5ab752ec549e440a49ae4ae5f3",
          ("diffusion_lora", "sd15"): "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
          ("diffusion_lora", "sd21_base"): "4e63672c03103b6c636b8fb4119ba982469b2955",
          ("diffusion_lora", "sd2"): None}  # one unverified hash in public code: left for models.json to pin


@pytest.mark.parametrize("group,option", list(PINNED))
def test_hub_presets_carry_the_commits_public_code_pins(group, option):
    assert compose([f"{group}={option}"])[group].revision == PINNED[(group, option)]


def test_a_folder_is_hashed_once_until_one_of_its_files_changes(tmp_path, monkeypatch):
    import os

    from pneumo_exp import hub

    (tmp_path / "weights.bin").write_bytes(b"a")
    calls = []
    plain = hub.hash_files
    monkeypatch.setattr(hub, "hash_files", lambda *args: calls.append(1) or plain(*args))
    first = hub.folder_content_hash(tmp_path)
    assert hub.folder_content_hash(tmp_path) == first and len(calls) == 1
    (tmp_path / "weights.bin").write_bytes(b"b")
    os.utime(tmp_path / "weights.bin", ns=(1, 1))  # another time even on a coarse clock
    assert hub.folder_content_hash(tmp_path) != first and len(calls) == 2
