"""`pneumo-exp dashboard report.input=<sweep folder>`: one saved W&B workspace view per sweep, built with the
`wandb-workspaces` package (a public preview API, pinned exactly).

The view is built offline from the sweep folder: its W&B run files (offline, or the local copies of online runs)
say which runs belong to the sweep (config key `sweep`, written by `pneumo_exp.sweep`), which keys it varied and
which metrics the runs logged, so no panel names a metric or config key the runs lack. The spec is written to
`<sweep>/dashboard_spec.json` (and only that with `dashboard.dry_run=true`); saving needs the runs on a W&B server
(`wandb login`, then `make sync`), in `logger.project` of `logger.entity` (else the login's default entity). Where
the view was saved is kept in `<sweep>/dashboard_view.json`, so running again updates the same view (found by name,
which holds the sweep's id, on the server when that file is gone).

The view (sections top to bottom):
- runs: the sweep's runs only (tag `sweep:<id>`) whose numbers count (summary `result`, set by
  `pneumo_exp.tracking`: no failed run, no capped or subset test, no report run), grouped by the keys its
  configurations differ in (the varied keys but seed; lines show the mean over seeds and their range), sorted by
  best validation macro F1, the varied keys and the three result metrics pinned as columns of the runs table;
- **Results**: parallel coordinates from the varied keys to best `val/f1_macro`, `test/f1_macro` and `test/acc`; a
  scatter of best validation against test macro F1 (one point per run);
- **Training curves**: `train/acc`, `train/recall_macro`, `train/f1_macro` and their `val/` counterparts against
  `epoch`, one panel each;
- **Diffusion LoRA** (when the sweep trained LoRAs): `diffusion/loss` (and the epoch mean), images per second against
  `diffusion/step`, the validation grids;
- **Paper table** (when `pneumo-exp report` logged its run): the report's tables (configurations, reference rows,
  paired comparisons) and its files with the plots, read from the report's artifact (`report-<sweep id>`, latest
  version), as the report run is not among the runs shown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_exp.config import JobConfig
from pneumo_exp.core.files import write_atomic, write_json_atomic
from pneumo_exp.errors import UserError
from pneumo_exp.report.wandb_run import TABLES as REPORT_TABLES
from pneumo_exp.report.wandb_run import artifact_table
from pneumo_exp.sweep import sweep_tag
from pneumo_exp.tracking import RESULT_MARK
from pneumo_exp.validate import SettingError
from pneumo_exp.wandb_offline import RunFile, read_run, run_files

RESULT_METRICS = ("val/f1_macro", "test/f1_macro", "test/acc")  # summaries: the best epoch's, then the test's
CURVE_METRICS = ("train/acc", "train/recall_macro", "train/f1_macro", "val/acc", "val/recall_macro", "val/f1_macro")
DIFFUSION_PANELS = {"diffusion loss": ("diffusion/loss", "diffusion/epoch_loss"),
                    "diffusion images per second": ("diffusion/images_per_second",)}
DIFFUSION_STEP, DIFFUSION_GRIDS = "diffusion/step", "diffusion/samples"
SPEC_FILE, VIEW_FILE = "dashboard_spec.json", "dashboard_view.json"
NOT_SYNCED_FIX = "upload them with make sync (wandb sync <folder>/**/offline-run-*), then run this again"


@dataclass
class SweepRuns:
    """What the sweep folder's W&B run files say about the sweep."""
    folder: Path
    name: str
    id: str  # `pneumo_exp.sweep.sweep_id`
    varied: list[str]  # as the sweep's command line and sweeper named them
    group_by: list[str]  # W&B config keys the configurations differ in, held by every run
    jobs: list[RunFile]
    report: RunFile | None  # the run `pneumo-exp report` logged, if any

    @property
    def tag(self) -> str:
        return sweep_tag(self.id)

    @property
    def marks_results(self) -> bool:
        """Whether the runs say if their numbers count (`RESULT_MARK`): runs logged before sweeps had ids do not."""
        return all(run.has_config("sweep.id") for run in self.jobs)

    @property
    def shown_runs(self) -> list[RunFile]:
        """The runs the view shows: those whose numbers count (every job, when the runs do not say)."""
        if not self.marks_results:
            return list(self.jobs)
        return [run for run in self.jobs if run.summary.get(RESULT_MARK) is True]

    @property
    def history_keys(self) -> set[str]:
        return set().union(*(run.history_keys for run in self.shown_runs))

    @property
    def summary_keys(self) -> set[str]:
        return set().union(*(run.summary for run in self.shown_runs))

    @property
    def columns(self) -> list[str]:
        """The varied keys as W&B config keys (seed included), in the sweep's order."""
        return [*self.group_by, "seed"] if "seed" in self.varied else list(self.group_by)


def read_sweep(folder: Path) -> SweepRuns:
    """The sweep's runs from the run files under `folder` (a rerun's later file of the same run wins)."""
    where = "report.input"
    by_id = {run.run_id: run for run in map(read_run, run_files(folder))}
    if not by_id:
        raise SettingError(f"no W&B runs under {folder}", where=where,
                           fix="give the folder of a sweep run with W&B on (logger=wandb, the default)")
    jobs = [run for run in by_id.values() if run.job_type != "report"]
    reports = [run for run in by_id.values() if run.job_type == "report"]
    if not jobs or any(run.config_value("sweep.name") is None for run in jobs):
        raise SettingError(f"the W&B runs under {folder} carry no sweep identity", where=where,
                           fix="give the folder of one multirun (pneumo-exp -m ...), multirun/<experiment>/<sweep>")
    ids = sorted(set(map(run_sweep_id, jobs)))
    if len(ids) > 1:
        raise SettingError(f"{folder} holds the runs of {len(ids)} sweeps", where=where,
                           fix=f"give the folder of one of them: {', '.join(ids)}")
    varied = list(dict.fromkeys(key for run in jobs for key in run.config_value("sweep.varied") or []))
    group_by = [key for key in dict.fromkeys(key for run in jobs for key in run.config_value("sweep.group_by") or [])
                if all(run.has_config(key) for run in jobs)]
    return SweepRuns(folder, str(jobs[0].config_value("sweep.name")), ids[0], varied, group_by, jobs,
                     reports[-1] if reports else None)


def run_sweep_id(run: RunFile) -> str:
    """The id of the sweep a job's run belongs to (a run logged before sweeps had ids: the sweep's name)."""
    return str(run.config_value("sweep.id") or run.config_value("sweep.name"))


def config_column(key: str) -> str:
    """A config key as a column of the runs table (the wire name W&B gives a nested config key)."""
    first, *rest = key.split(".")
    return f"config:{first}.value" + "".join(f".{part}" for part in rest)


def build_workspace(sweep: SweepRuns, entity: str, project: str, name: str):
    """The view of one sweep as a `wandb_workspaces` Workspace (its spec: `workspace._to_model()`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    history, summary = sweep.history_keys, sweep.summary_keys
    results = [metric for metric in RESULT_METRICS if metric in summary]
    sections = []
    panels: list[Any] = []
    if results or sweep.group_by:
        panels.append(wr.ParallelCoordinatesPlot(
            title="varied keys to results", layout=wr.Layout(w=24, h=9),
            columns=[*(wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key), display_name=key)
                       for key in sweep.group_by),
                     *(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric)) for metric in results)]))
    if {"val/f1_macro", "test/f1_macro"} <= summary:
        panels.append(wr.ScatterPlot(title="best validation vs test macro F1", x=wr.SummaryMetric("val/f1_macro"),
                                     y=wr.SummaryMetric("test/f1_macro")))
    if panels:
        sections.append(ws.Section(name="Results", panels=panels, is_open=True))
    curves = [curve_panel(wr, metric, "epoch") for metric in CURVE_METRICS if metric in history]
    if curves:
        sections.append(ws.Section(name="Training curves", panels=curves, is_open=True,
                                   layout_settings=ws.SectionLayoutSettings(columns=3, rows=2)))
    diffusion = [curve_panel(wr, [m for m in metrics if m in history], DIFFUSION_STEP, title)
                 for title, metrics in DIFFUSION_PANELS.items() if metrics[0] in history and DIFFUSION_STEP in history]
    if DIFFUSION_GRIDS in history:
        diffusion.append(wr.MediaBrowser(title="validation grids", media_keys=[DIFFUSION_GRIDS], gallery_axis="step"))
    if diffusion:
        sections.append(ws.Section(name="Diffusion LoRA", panels=diffusion, is_open=True))
    paper = paper_table(wr, sweep.report)
    if paper:
        sections.append(ws.Section(name="Paper table", panels=paper, is_open=True))
    pinned = [*map(config_column, sweep.columns), *(f"summary:{metric}" for metric in results)]
    order = [ws.Ordering(ws.Summary("val/f1_macro"), ascending=False)] if "val/f1_macro" in summary else []
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis="epoch", max_runs=100),
        runset_settings=ws.RunsetSettings(filters=runs_shown(ws, sweep),
                                          groupby=[ws.Config(key) for key in sweep.group_by],
                                          order=order, pinned_columns=pinned))


def runs_shown(ws, sweep: SweepRuns) -> list:
    """The view's runs: the sweep's (its tag), and of those only the results when the runs mark them."""
    shown = [ws.Tags().isin([sweep.tag])]
    if sweep.marks_results:
        shown.append(ws.Summary(RESULT_MARK) == True)  # noqa: E712 (W&B's filter `result = true`, no comparison)
    return shown


def paper_table(wr, report: RunFile | None) -> list:
    """The report's tables and files from its artifact (the report run is no result, so not among the runs
    shown); none from a report run that names no artifact (logged before it did)."""
    artifact = report.config_value("report.artifact") if report is not None else None
    if artifact is None:
        return []
    tables = [wr.WeavePanelArtifactVersionedFile(artifact=artifact, version="latest",
                                                 file=f"{artifact_table(csv_name)}.table.json",
                                                 layout=wr.Layout(w=24, h=10))
              for csv_name in REPORT_TABLES.values()]
    return [*tables, wr.WeavePanelArtifact(artifact=artifact, tab="files", layout=wr.Layout(w=24, h=10))]


def curve_panel(wr, metrics: str | Sequence[str], x: str, title: str | None = None):
    """Lines of one or more metrics against `x`: each group's mean over its runs (seeds) and their range."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    return wr.LinePlot(title=title or metrics[0], x=x, y=metrics, groupby_aggfunc="mean", groupby_rangefunc="minmax",
                       aggregate=True)


def outline(workspace) -> list[str]:
    """The view in words: the runs shown, then each section and its panels."""
    runset = workspace.runset_settings
    lines = [f"view {workspace.name!r}: runs where {runset.filters}, grouped by "
             f"{', '.join(group.name for group in runset.groupby) or 'nothing'}; columns "
             f"{', '.join(runset.pinned_columns)}"]
    for section in workspace.sections:
        lines.append(f"section {section.name}:")
        lines += [f"  {panel_text(panel)}" for panel in section.panels]
    return lines


def panel_text(panel) -> str:
    kind = type(panel).__name__
    if kind == "LinePlot":
        return f"{kind} {', '.join(map(str, panel.y))} against {panel.x} (mean and min-max over each group)"
    if kind == "ParallelCoordinatesPlot":
        return f"{kind} {' | '.join(column.metric.name for column in panel.columns)}"
    if kind == "ScatterPlot":
        return f"{kind} x {panel.x.name}, y {panel.y.name}"
    if kind == "MediaBrowser":
        return f"{kind} {', '.join(panel.media_keys)}"
    if kind == "WeavePanelArtifactVersionedFile":
        return f"{kind} {panel.file} of artifact {panel.artifact}:{panel.version}"
    if kind == "WeavePanelArtifact":
        return f"{kind} {panel.artifact} ({panel.tab})"
    return f"{kind} {getattr(panel, 'table_name', '')}".strip()


def view_name(cfg: JobConfig, sweep: SweepRuns) -> str:
    return cfg.dashboard.name or f"pneumo_exp sweep {sweep.id}"


def main_dashboard(cfg: JobConfig) -> str:
    """Builds the view of the sweep in `report.input`, writes its spec, saves it unless `dashboard.dry_run`; returns
    what to print (the outline, then the view's URL)."""
    folder = Path(cfg.report.input).resolve()
    sweep = read_sweep(folder)
    entity = cfg.logger.entity
    workspace = build_workspace(sweep, entity or "<your W&B entity>", cfg.logger.project, view_name(cfg, sweep))
    spec = workspace._to_model().model_dump(by_alias=True, exclude_none=True)
    write_atomic(folder / SPEC_FILE, json.dumps(spec, indent=1) + "\n")
    lines = [*outline(workspace), f"spec written to {folder / SPEC_FILE}"]
    if cfg.dashboard.dry_run:
        return "\n".join(lines)
    api = logged_in_api()
    entity = entity or api.default_entity
    check_synced(api, entity, cfg.logger.project, sweep)
    workspace = build_workspace(sweep, entity, cfg.logger.project, view_name(cfg, sweep))
    url = save_view(workspace, api, folder)
    return "\n".join([*lines, f"dashboard: {url}"])


def logged_in_api():
    """The W&B API; one line saying what to do when this machine is not logged in."""
    import wandb
    from wandb.errors import UsageError

    try:
        return wandb.Api()
    except UsageError:
        raise UserError("the dashboard is saved on a W&B server and this machine is not logged in to W&B",
                        fix="run wandb login (or set WANDB_API_KEY), make sync to upload the sweep's runs, then this "
                            "again (dashboard.dry_run=true writes the view's spec without a server)") from None


def check_synced(api, entity: str, project: str, sweep: SweepRuns) -> None:
    """The sweep's runs are on the server, in `entity/project`; else one line saying what to do."""
    try:
        found = {run.id for run in api.runs(f"{entity}/{project}", filters={"tags": {"$in": [sweep.tag]}})}
    except Exception as error:  # a missing project, the network: the server's own words, in one line
        raise UserError(f"cannot read the runs of {entity}/{project} on the W&B server: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}",
                        where=str(sweep.folder), fix=NOT_SYNCED_FIX) from error
    missing = [run.run_id for run in sweep.jobs if run.run_id not in found]
    if missing:
        raise UserError(f"{len(missing)} of the sweep's {len(sweep.jobs)} runs are not on the W&B server yet",
                        where=str(sweep.folder), fix=NOT_SYNCED_FIX)


def save_view(workspace, api, folder: Path) -> str:
    """Saves the view, over the one saved before for this sweep when there is one; returns its URL."""
    previous = folder / VIEW_FILE
    record = json.loads(previous.read_text()) if previous.is_file() else None
    if record is None or (record["entity"], record["project"]) != (workspace.entity, workspace.project):
        record = find_view(api, workspace.entity, workspace.project, workspace.name)
    if record is not None:
        workspace._internal_name, workspace._internal_id = record["name"], record["id"]
    try:
        workspace.save()
        url = workspace.url
    except Exception as error:  # the server refused the view: its own words, in one line
        raise UserError(f"the W&B server did not save the view: {str(error).splitlines()[0]}",
                        where=f"{workspace.entity}/{workspace.project}") from error
    write_json_atomic(previous, {"url": url, "entity": workspace.entity, "project": workspace.project,
                                 "name": workspace._internal_name, "id": workspace._internal_id,
                                 "display_name": workspace.name})
    return url


VIEWS_QUERY = """
query ProjectViews($entityName: String, $name: String, $viewType: String = "project-view") {
    project(name: $name, entityName: $entityName) {
        allViews(viewType: $viewType) { edges { node { id name displayName } } }
    }
}
"""


def find_view(api, entity: str, project: str, display_name: str) -> dict | None:
    """A saved view of the project with this name (the dashboard of this sweep, saved from another folder)."""
    from wandb_workspaces._graphql import execute_graphql

    response = execute_graphql(api, VIEWS_QUERY, {"entityName": entity, "name": project})
    edges = ((response.get("project") or {}).get("allViews") or {}).get("edges", [])
    nodes = [edge["node"] for edge in edges if edge["node"]["displayName"] == display_name]
    return {"name": nodes[0]["name"], "id": nodes[0]["id"]} if nodes else None
