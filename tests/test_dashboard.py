"""The sweep dashboard, offline: a real tiny multirun logged to offline W&B runs, its report run, then the view's
spec. Every metric and config key the spec names must exist in that sweep's runs; the spec must read back through
wandb-workspaces' own models; with no login one line says what to do; the save call is intercepted, and saving
again updates the same view. No test talks to a W&B server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CONF_DIR, compose, exit_status_in_process
from test_sweep import output_of

from pneumo_exp import dashboard, wandb_offline
from pneumo_exp.config import job_config
from pneumo_exp.errors import UserError
from pneumo_exp.sweep import job_sweep, sweep_tag, varied_keys

SWEEP = ["-m", "experiment=demo", "debug=smoke", "clip_lora=tiny_vit", "clip_lora.lora.alpha=8,16", "seed=0,1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache) -> Path:
    """multirun/sweep_demo/<sweep>: alpha 8, 16 x seeds 0, 1 (offline W&B runs), then its report run."""
    folder = tmp_path_factory.mktemp("dashboard") / "multirun" / "sweep_demo" / "2026-01-05_10-00-00"
    with pytest.MonkeyPatch.context() as monkeypatch:  # in this process: W&B's service and the imports start once
        assert exit_status_in_process(monkeypatch, *SWEEP, f"hydra.sweep.dir={folder}",
                                      f"paths.cache_dir={model_cache}") == 0
        assert exit_status_in_process(monkeypatch, "report", f"report.input={folder}", "report.bootstrap_samples=20",
                                      f"hydra.run.dir={folder.parent / 'report_job'}") == 0
    return folder


def config_key(column: str) -> str:
    """`config:a.value.b` (W&B's wire name of config key a.b) -> `a.b`."""
    first, value, *rest = column.removeprefix("config:").split(".")
    assert value == "value", column
    return ".".join([first, *rest])


def missing_keys(spec: dict, runs: dict) -> list[str]:
    """What the view's spec names that the sweep's runs lack: read from the spec as saved (the wire format), checked
    against the offline run files (`runs`: the jobs and the report run)."""
    jobs, report = runs["jobs"], runs["report"]
    logged = set().union(*(run.history_keys for run in jobs))
    missing = []

    def need_config(key: str) -> None:
        missing.extend(f"config {key}" for run in jobs if not run.has_config(key))

    def need_summary(metric: str) -> None:
        missing.extend(f"summary {metric}" for run in jobs if metric not in run.summary)

    def need_column(accessor: str) -> None:
        section, name = accessor.split(":", 1)
        need_config(config_key(accessor)) if section == "config" else need_summary(name)

    section = spec["spec"]["section"]
    for panel in (p for s in section["panelBankConfig"]["sections"] for p in s["panels"]):
        kind, config = panel["viewType"], panel["config"]
        if kind == "Run History Line Plot":
            missing += [f"history {key}" for key in [config["xAxis"], *config["metrics"]] if key not in logged]
        elif kind == "Parallel Coordinates Plot":
            for column in config["columns"]:
                need_column(column["accessor"])
        elif kind == "Scatter Plot":
            need_column(config["xAxis"]), need_column(config["yAxis"])
        elif kind == "Media Browser":
            media = logged | (report.history_keys if report else set())
            missing += [f"media {key}" for key in config["mediaKeys"] if key not in media]
        elif kind == "Weave":
            tables = [key for key in dashboard.REPORT_TABLES if f'"{key}"' in json.dumps(config)]
            missing += [f"table {key}" for key in tables if report is None or key not in report.summary]
            missing += [] if tables else [f"a Weave panel naming no report table: {config}"]
        else:
            missing.append(f"a panel of unknown kind {kind}")
    (runset,) = section["runSets"]
    for key in runset["grouping"]:
        assert key["section"] == "config"
        need_config(config_key(f"config:{key['name']}"))
    for column in runset["runFeed"]["columnPinned"]:
        if column != "run:displayName":
            need_column(column)
    (tag_filter,) = runset["filters"]["filters"]
    assert tag_filter["key"] == {"section": "run", "name": "tags"} and tag_filter["op"] == "IN"
    missing += [f"tag {tag}" for tag in tag_filter["value"] for run in jobs if tag not in run.tags]
    return missing


def offline_runs(folder: Path) -> dict:
    runs = [wandb_offline.read_run(path) for path in wandb_offline.run_files(folder)]
    reports = [run for run in runs if run.job_type == "report"]
    return {"jobs": [run for run in runs if run.job_type != "report"], "report": reports[0] if reports else None}


def test_every_job_carries_the_sweep_identity_and_sweep_json_names_the_varied_keys(sweep):
    runs = offline_runs(sweep)
    assert len(runs["jobs"]) == 4 and runs["report"] is not None
    name = "sweep_demo/2026-01-05_10-00-00"
    assert json.loads((sweep / "sweep.json").read_text()) == {"name": name, "varied": ["clip_lora.lora.alpha", "seed"]}
    for run in runs["jobs"] + [runs["report"]]:
        assert sweep_tag(name) in run.tags and run.config["sweep"]["name"] == name
    for run in runs["jobs"]:
        assert run.config["sweep"]["group_by"] == ["clip_lora.lora.alpha"] and run.config["sweep"]["choices"] == {}
    assert runs["report"].group == runs["jobs"][0].group == "demo"


def test_dry_run_spec_names_only_what_the_runs_logged_and_reads_back(sweep, command_line):
    from wandb_workspaces.workspaces import Workspace, internal

    output = output_of(command_line("dashboard", f"report.input={sweep}", "dashboard.dry_run=true",
                                    f"hydra.run.dir={sweep.parent / 'dashboard_job'}"))
    spec = json.loads((sweep / dashboard.SPEC_FILE).read_text())
    assert missing_keys(spec, offline_runs(sweep)) == []
    view = Workspace._from_model(internal.View.model_validate(spec))  # the package's own models accept it
    assert [section.name for section in view.sections] == ["Results", "Training curves", "Paper table"]
    curves = {panel.y[0].name for panel in view.sections[1].panels}
    assert curves == {"train/acc", "train/recall_macro", "train/f1_macro", "val/acc", "val/recall_macro",
                      "val/f1_macro"}
    assert [group.name for group in view.runset_settings.groupby] == ["clip_lora.lora.alpha"]
    assert "section Training curves:" in output and "LinePlot val/f1_macro against epoch" in output
    tables = [panel.table_name for panel in view.sections[2].panels if hasattr(panel, "table_name")]
    assert tables == ["report/table", "report/references", "report/pairs"]


def test_the_check_fails_on_a_panel_naming_a_missing_metric_or_key(sweep):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    runs = offline_runs(sweep)
    built = dashboard.build_workspace(dashboard.read_sweep(sweep), "team", "pneumo_exp", "v")
    built.sections[1].panels.append(dashboard.curve_panel(wr, "val/auprc", "epoch"))
    built.sections[0].panels[0].columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.Config("optim.momentum")))
    built.runset_settings = ws.RunsetSettings(filters=built.runset_settings.filters,
                                              groupby=[ws.Config("clip_lora.lora.rank")])
    spec = built._to_model().model_dump(by_alias=True, exclude_none=True)
    assert set(missing_keys(spec, runs)) == {"history val/auprc", "config optim.momentum",
                                             "config clip_lora.lora.rank"}


def test_config_columns_are_the_wire_names_wandb_workspaces_gives_config_keys():
    import wandb_workspaces.reports.v2 as wr

    for key in ("seed", "optim.lr", "clip_lora.lora.alpha", "sweep.choices.experiment"):
        column = wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key))._to_model().accessor
        assert dashboard.config_column(key) == column and config_key(column) == key


def diffusion_sweep(history: set[str]) -> dashboard.SweepRuns:
    run = wandb_offline.RunFile(Path("run-x.wandb"), run_id="x", tags=["sweep:s/1"],
                                config={"sweep": {"name": "s/1", "varied": ["seed"], "group_by": []}, "seed": 0},
                                history_keys={"epoch", "train/acc", *history}, summary={"val/f1_macro": 0.5})
    return dashboard.SweepRuns(Path("s/1"), "s/1", ["seed"], [], [run], None)


def test_a_diffusion_section_only_when_the_sweep_trained_loras():
    plain = dashboard.build_workspace(diffusion_sweep(set()), "team", "p", "v")
    assert [section.name for section in plain.sections] == ["Results", "Training curves"]
    lora = dashboard.build_workspace(diffusion_sweep({"diffusion/step", "diffusion/loss", "diffusion/epoch_loss",
                                                      "diffusion/images_per_second", "diffusion/samples"}),
                                     "team", "p", "v")
    (section,) = [section for section in lora.sections if section.name == "Diffusion LoRA"]
    assert [panel_y(panel) for panel in section.panels] == [["diffusion/loss", "diffusion/epoch_loss"],
                                                           ["diffusion/images_per_second"], ["diffusion/samples"]]
    assert all(panel.x == "diffusion/step" for panel in section.panels[:2])


def panel_y(panel) -> list[str]:
    return list(panel.media_keys) if hasattr(panel, "media_keys") else [str(y) for y in panel.y]


def test_without_login_one_line_says_what_to_do(sweep, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no_netrc"), WANDB_CONFIG_DIR=str(tmp_path), HOME=str(tmp_path),
               WANDB_SILENT="true")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pneumo_exp.cli", "dashboard", f"report.input={sweep}",
                           f"hydra.run.dir={tmp_path / 'job'}"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("pneumo-exp: error: ") and "wandb login" in line and "make sync" in line


class FakeServer:
    """A W&B server holding the runs `synced` and the views saved through the intercepted upsert call."""

    def __init__(self, synced: list[str]):
        self.synced, self.saved, self.views = synced, [], []
        server = self

        class Api:
            default_entity = "team"

            def __init__(self):
                self._service_api = SimpleNamespace(app_url="https://wandb.test", execute_graphql=server.graphql)

            def runs(self, path, filters):
                assert path == "team/pneumo_exp" and filters == {"tags": {"$in": [sweep_tag(NAME)]}}
                return [SimpleNamespace(id=run_id) for run_id in server.synced]

        self.Api = Api

    def graphql(self, query, variables):
        assert "allViews" in query and variables == {"entityName": "team", "name": "pneumo_exp"}
        return {"project": {"allViews": {"edges": [{"node": view} for view in self.views]}}}

    def upsert(self, view):
        self.saved.append(view)
        name, view_id = view.name, view.id or f"VIEW{len(self.views)}"  # save() names a new view itself
        if not view.id:
            self.views.append({"id": view_id, "name": name, "displayName": view.display_name})
        return {"upsertView": {"view": {"id": view_id, "name": name}}}


NAME = "sweep_demo/2026-01-05_10-00-00"


def test_save_needs_the_runs_synced_then_updates_the_same_view(sweep, make_cfg, monkeypatch):
    import wandb
    from wandb_workspaces.workspaces import internal

    jobs = [run.run_id for run in offline_runs(sweep)["jobs"]]
    server = FakeServer(jobs[:2])
    monkeypatch.setattr(wandb, "Api", server.Api)
    monkeypatch.setattr(internal, "upsert_view2", server.upsert)
    cfg = job_config(make_cfg("task=dashboard", f"report.input={sweep}"))
    with pytest.raises(UserError, match=r"2 of the sweep's 4 runs are not on the W&B server yet.*make sync"):
        dashboard.main_dashboard(cfg)
    assert server.saved == []

    server.synced = jobs
    first = dashboard.main_dashboard(cfg)
    name = server.views[0]["name"]
    url = f"https://wandb.test/team/pneumo_exp?nw={name.removeprefix('nw-').removesuffix('-v')}"
    assert first.endswith(f"dashboard: {url}") and server.saved[0].id == ""
    assert json.loads((sweep / dashboard.VIEW_FILE).read_text())["url"] == url
    assert dashboard.main_dashboard(cfg).endswith(url)  # the view recorded in the sweep folder, updated
    (sweep / dashboard.VIEW_FILE).unlink()
    assert dashboard.main_dashboard(cfg).endswith(url)  # the view of the same name on the server, updated
    assert [(view.id, view.name) for view in server.saved[1:]] == [("VIEW0", name)] * 2
    assert len(server.views) == 1 and server.saved[-1].display_name == f"pneumo_exp sweep {NAME}"
    saved = server.saved[-1].model_dump(by_alias=True, exclude_none=True)
    assert missing_keys(saved, offline_runs(sweep)) == []


def test_sweep_keys_come_from_the_command_line_and_the_sweeper_and_single_runs_have_none():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = hydra_compose("config", overrides=["experiment=sweep/alpha_lr"], return_hydra_config=True)
    assert varied_keys(config) == ["clip_lora.lora.alpha", "optim.lr", "seed"]
    config.hydra.overrides.task = ["optim.weight_decay=0,0.1", "trainer.epochs=range(1,3)", "seed=4"]
    assert varied_keys(config) == ["optim.weight_decay", "trainer.epochs", "clip_lora.lora.alpha", "optim.lr",
                                   "seed"]
    compose([])  # a single run: no sweep in its W&B config or tags
    assert job_sweep() is None
