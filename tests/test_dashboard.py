"""The sweep dashboard, offline: a real tiny sweep (a capped job, then a grid in the same folder) logged to offline
W&B runs, its report run, then the view's spec. Every metric and config key the spec names must exist in the runs
the view shows, and it shows only the results; the spec must read back through wandb-workspaces' own models; with
no login one line says what to do; the save call is intercepted, and saving again updates the same view, in
`logger.entity`. Two sweeps whose folders share a name share no tag and no view. No test talks to a W&B server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CONF_DIR, compose, exit_status_in_process
from omegaconf import OmegaConf
from test_sweep import output_of

from pneumo_exp import dashboard, wandb_offline
from pneumo_exp.config import job_config
from pneumo_exp.errors import UserError
from pneumo_exp.sweep import SweepIdentity, job_sweep, sweep_tag, varied_keys
from pneumo_exp.tracking import RESULT_MARK, RunLogger

SWEEP = ["-m", "experiment=demo", "debug=smoke", "clip_lora=tiny_vit", "clip_lora.lora.alpha=8,16", "seed=0,1"]
CAPPED = ["-m", "experiment=demo", "debug=smoke", "clip_lora=tiny_vit", "trainer.eval_batch_size=8",
          "trainer.max_eval_batches=1", "trainer.cap_test=true"]  # a job whose test is capped: no result
NAME = "sweep_demo/2026-01-05_10-00-00"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache) -> Path:
    """multirun/sweep_demo/<sweep>: a capped job, then (a second multirun into the same folder, the same sweep) alpha
    8, 16 x seeds 0, 1 (offline W&B runs), then its report run."""
    folder = tmp_path_factory.mktemp("dashboard") / "multirun" / NAME
    with pytest.MonkeyPatch.context() as monkeypatch:  # in this process: W&B's service and the imports start once
        for multirun in (CAPPED, SWEEP):
            assert exit_status_in_process(monkeypatch, *multirun, f"hydra.sweep.dir={folder}",
                                          f"paths.cache_dir={model_cache}") == 0
        assert exit_status_in_process(monkeypatch, "report", f"report.input={folder}", "report.bootstrap_samples=20",
                                      f"hydra.run.dir={folder.parent / 'report_job'}") == 0
    return folder


def sweep_id(folder: Path) -> str:
    return json.loads((folder / "sweep.json").read_text())["id"]


def config_key(column: str) -> str:
    """`config:a.value.b` (W&B's wire name of config key a.b) -> `a.b`."""
    first, value, *rest = column.removeprefix("config:").split(".")
    assert value == "value", column
    return ".".join([first, *rest])


def passes(run: wandb_offline.RunFile, filters: list[dict]) -> bool:
    """Whether a run passes a view's runset filters as saved (the wire format; each joined by AND)."""
    def passes_one(item: dict) -> bool:
        section, name, op = item["key"]["section"], item["key"]["name"], item["op"]
        if (section, name, op) == ("run", "tags", "IN"):
            return bool(set(item["value"]) & set(run.tags))
        assert (section, op) == ("summary", "="), f"a filter this check cannot read: {item}"
        return name in run.summary and run.summary[name] == item["value"]

    assert all(item.get("connector", "AND") == "AND" and not item["disabled"] for item in filters)
    return all(map(passes_one, filters))


def shown(spec: dict, runs: list[wandb_offline.RunFile]) -> list[wandb_offline.RunFile]:
    """The runs a view's spec shows."""
    (runset,) = spec["spec"]["section"]["runSets"]
    return [run for run in runs if passes(run, runset["filters"]["filters"])]


def missing_keys(spec: dict, runs: dict) -> list[str]:
    """What the view's spec names that the runs it shows lack: read from the spec as saved (the wire format),
    checked against the offline run files (`runs`: the jobs and the report run)."""
    jobs, report = shown(spec, runs["jobs"]), runs["report"]
    logged = set().union(*(run.history_keys for run in jobs))
    missing = [] if jobs else ["no job passes the view's filters"]

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
            missing += missing_in_artifact(config, report)
        else:
            missing.append(f"a panel of unknown kind {kind}")
    (runset,) = section["runSets"]
    for key in runset["grouping"]:
        assert key["section"] == "config"
        need_config(config_key(f"config:{key['name']}"))
    for column in runset["runFeed"]["columnPinned"]:
        if column != "run:displayName":
            need_column(column)
    return missing


def missing_in_artifact(config: dict, report: wandb_offline.RunFile | None) -> list[str]:
    """What a Weave panel of the paper table names (the report's artifact, a file in it) that the report run's
    artifact lacks."""
    operation = config["panel2Config"]["exp"]["fromOp"]
    if operation["name"] == "artifactVersion-file":
        named = operation["inputs"]["artifactVersion"]["fromOp"]["inputs"]["artifactName"]["val"]
        files = [operation["inputs"]["path"]["val"]]
    else:
        assert operation["name"] == "project-artifact", operation["name"]
        named, files = operation["inputs"]["artifactName"]["val"], []
    logged = report_artifact(report) if report is not None else None
    if logged is None or logged.name != named:
        return [f"artifact {named}"]
    return [f"artifact file {file}" for file in files if file not in {item.path for item in logged.manifest.contents}]


def report_artifact(report: wandb_offline.RunFile):
    """The artifact of type `report` the report run logged (its name and manifest), if any."""
    artifacts = [record.artifact for record in wandb_offline._records(report.path)
                 if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "report"]
    return artifacts[-1] if artifacts else None


def offline_runs(folder: Path) -> dict:
    runs = [wandb_offline.read_run(path) for path in wandb_offline.run_files(folder)]
    reports = [run for run in runs if run.job_type == "report"]
    return {"jobs": [run for run in runs if run.job_type != "report"], "report": reports[0] if reports else None}


def test_every_job_carries_the_sweep_id_that_sweep_json_keeps_across_multiruns(sweep):
    runs = offline_runs(sweep)
    assert len(runs["jobs"]) == 5 and runs["report"] is not None
    identity = sweep_id(sweep)
    assert re.fullmatch(rf"{NAME}-[0-9a-f]{{8}}", identity)
    assert json.loads((sweep / "sweep.json").read_text()) == {"name": NAME, "id": identity,
                                                              "varied": ["clip_lora.lora.alpha", "seed"]}
    for run in runs["jobs"] + [runs["report"]]:  # the capped job's multirun drew the id, the grid's kept it
        assert sweep_tag(identity) in run.tags and run.config["sweep"]["name"] == NAME
        assert run.config["sweep"]["id"] == identity
    assert sorted(run.config["sweep"]["group_by"] for run in runs["jobs"]) == [[]] + [["clip_lora.lora.alpha"]] * 4
    assert all(run.config["sweep"]["choices"] == {} for run in runs["jobs"])
    assert runs["report"].group == runs["jobs"][0].group == "demo"


def test_the_view_shows_the_results_only_not_the_capped_job_nor_the_report(sweep):
    runs = offline_runs(sweep)
    view = dashboard.build_workspace(dashboard.read_sweep(sweep), "team", "pneumo_exp", "v")
    spec = view._to_model().model_dump(by_alias=True, exclude_none=True)
    (capped,) = [run for run in runs["jobs"] if "not_a_result" in run.summary]
    assert capped.summary[RESULT_MARK] is False
    assert shown(spec, [*runs["jobs"], runs["report"]]) == [run for run in runs["jobs"] if run is not capped]
    assert all(run.summary[RESULT_MARK] is True for run in shown(spec, runs["jobs"]))


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
    tables = [panel.file for panel in view.sections[2].panels if hasattr(panel, "file")]
    assert tables == ["table.table.json", "references.table.json", "pairs.table.json"]
    assert "section Paper table:" in output and "WeavePanelArtifact report-sweep_demo-" in output


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


def job_run(run_id: str, history: set[str], summary: dict) -> wandb_offline.RunFile:
    """A job's run of the sweep s/1 (id s/1-0123abcd) as its run file would hold it."""
    return wandb_offline.RunFile(Path(f"run-{run_id}.wandb"), run_id=run_id, tags=["sweep:s/1-0123abcd"],
                                 config={"sweep": {"name": "s/1", "id": "s/1-0123abcd", "varied": ["seed"],
                                                   "group_by": []}, "seed": 0},
                                 history_keys={"epoch", "train/acc", *history}, summary=summary)


def diffusion_sweep(history: set[str]) -> dashboard.SweepRuns:
    run = job_run("x", history, {"val/f1_macro": 0.5, RESULT_MARK: True})
    return dashboard.SweepRuns(Path("s/1"), "s/1", "s/1-0123abcd", ["seed"], [], [run], None)


def test_a_failed_run_is_not_shown_and_names_no_panel():
    result = job_run("done", set(), {"val/f1_macro": 0.5, RESULT_MARK: True})
    failed = job_run("crashed", {"val/auprc"}, {"val/f1_macro": 0.9, "val/auprc": 0.4, RESULT_MARK: False})
    view = dashboard.build_workspace(dashboard.SweepRuns(Path("s/1"), "s/1", "s/1-0123abcd", ["seed"], [],
                                                         [result, failed], None), "team", "p", "v")
    spec = view._to_model().model_dump(by_alias=True, exclude_none=True)
    assert shown(spec, [result, failed]) == [result]
    assert "val/auprc" not in json.dumps(spec)


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
    """A W&B server holding the runs `synced` (tagged `tag`) of `entity` and the views saved through the intercepted
    upsert call; its login's default entity is `default_entity`."""

    def __init__(self, synced: list[str], tag: str, entity: str = "team", default_entity: str = "team"):
        self.synced, self.saved, self.views, self.entity = synced, [], [], entity
        server = self

        class Api:
            def __init__(self):
                self.default_entity = default_entity
                self._service_api = SimpleNamespace(app_url="https://wandb.test", execute_graphql=server.graphql)

            def runs(self, path, filters):
                assert path == f"{entity}/pneumo_exp" and filters == {"tags": {"$in": [tag]}}
                return [SimpleNamespace(id=run_id) for run_id in server.synced]

        self.Api = Api

    def graphql(self, query, variables):
        assert "allViews" in query and variables == {"entityName": self.entity, "name": "pneumo_exp"}
        return {"project": {"allViews": {"edges": [{"node": view} for view in self.views]}}}

    def upsert(self, view):
        self.saved.append(view)
        name, view_id = view.name, view.id or f"VIEW{len(self.views)}"  # save() names a new view itself
        if not view.id:
            self.views.append({"id": view_id, "name": name, "displayName": view.display_name})
        return {"upsertView": {"view": {"id": view_id, "name": name}}}


def test_save_needs_the_runs_synced_then_updates_the_same_view(sweep, make_cfg, monkeypatch):
    import wandb
    from wandb_workspaces.workspaces import internal

    jobs = [run.run_id for run in offline_runs(sweep)["jobs"]]
    server = FakeServer(jobs[:2], sweep_tag(sweep_id(sweep)))
    monkeypatch.setattr(wandb, "Api", server.Api)
    monkeypatch.setattr(internal, "upsert_view2", server.upsert)
    cfg = job_config(make_cfg("task=dashboard", f"report.input={sweep}"))
    with pytest.raises(UserError, match=r"3 of the sweep's 5 runs are not on the W&B server yet.*make sync"):
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
    assert len(server.views) == 1 and server.saved[-1].display_name == f"pneumo_exp sweep {sweep_id(sweep)}"
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


def test_runs_and_views_are_looked_up_and_saved_in_logger_entity(sweep, make_cfg, monkeypatch):
    import wandb
    from wandb_workspaces.workspaces import internal

    jobs = [run.run_id for run in offline_runs(sweep)["jobs"]]
    server = FakeServer(jobs, sweep_tag(sweep_id(sweep)), entity="lab", default_entity="me")
    monkeypatch.setattr(wandb, "Api", server.Api)
    monkeypatch.setattr(internal, "upsert_view2", server.upsert)
    cfg = job_config(make_cfg("task=dashboard", f"report.input={sweep}", "logger.entity=lab"))
    try:
        printed = dashboard.main_dashboard(cfg)
    finally:
        (sweep / dashboard.VIEW_FILE).unlink(missing_ok=True)  # the other tests save into the entity team
    assert "dashboard: https://wandb.test/lab/pneumo_exp?nw=" in printed
    assert server.saved[-1].entity == "lab"


def start_multirun(folder: Path) -> str:
    """A multirun into `folder` as Hydra's callbacks see it, up to its first job: the sweep id sweep.json records."""
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}, "overrides": {"task": ["seed=0,1"]}}})
    callback = SweepIdentity()
    callback.on_multirun_start(config)
    folder.mkdir(parents=True, exist_ok=True)
    callback.on_job_start(config)
    return sweep_id(folder)


def test_a_rerun_keeps_the_sweep_id_and_a_new_sweep_in_a_same_named_folder_gets_its_own(tmp_path, make_cfg):
    folder = tmp_path / "multirun" / "augment_cpu" / "main"
    first = start_multirun(folder)
    assert re.fullmatch(r"augment_cpu/main-[0-9a-f]{8}", first)
    assert start_multirun(folder) == first  # the same sweep resumed or extended
    elsewhere = start_multirun(tmp_path / "other_machine" / "multirun" / "augment_cpu" / "main")
    shutil.rmtree(folder)  # make clean
    again = start_multirun(folder)
    ids = {first, elsewhere, again}
    assert len(ids) == 3 and len(set(map(sweep_tag, ids))) == 3
    cfg = job_config(make_cfg("task=dashboard"))
    views = {dashboard.view_name(cfg, dashboard.SweepRuns(folder, "augment_cpu/main", identity, [], [], [], None))
             for identity in ids}
    assert len(views) == 3
    long_name = tmp_path / "multirun" / "augment_cpu" / ("a" * 70)
    long_ids = [start_multirun(long_name)]
    shutil.rmtree(long_name)
    long_ids.append(start_multirun(long_name))
    tags = [sweep_tag(identity) for identity in long_ids]
    assert tags[0] != tags[1] and all(len(tag) <= 64 for tag in tags)


def test_a_sweep_folder_from_before_sweep_ids_keeps_its_name_as_id(tmp_path):
    folder = tmp_path / "multirun" / "augment_cpu" / "main"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"name": "augment_cpu/main", "varied": ["seed"]}))
    assert start_multirun(folder) == "augment_cpu/main"  # its runs' tag stays sweep:augment_cpu/main


@pytest.mark.parametrize("ending", ["finished", "failed", "not a result"])
def test_a_run_says_as_it_ends_whether_its_numbers_count(make_cfg, tmp_path, ending):
    cfg = job_config(make_cfg("debug=smoke", logger="wandb"))
    folder = tmp_path / ending.replace(" ", "_")
    folder.mkdir()
    with contextlib.suppress(RuntimeError), RunLogger(cfg, folder, job_type="classify", run_name="r") as logger:
        logger.set_summary({"test/f1_macro": 0.5})
        if ending == "not a result":
            logger.mark_not_a_result(["test split capped to 8 of 36 images"])
        if ending == "failed":
            raise RuntimeError("the job crashed")
    (run_file,) = wandb_offline.run_files(folder)
    assert wandb_offline.read_run(run_file).summary[RESULT_MARK] is (ending == "finished")
