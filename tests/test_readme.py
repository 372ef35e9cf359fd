"""The README stays true: its printed blocks match what the commands print, and every make target, config option and
task it names exists.

A printed block is a fenced block without a language. Its lines must appear, in order, in what the command prints
(lines left out are allowed); `...` in a line stands for any text. The tests here are cheap: the demo's data summary is
built in process and the metric and quality tables are checked for their format. `make readme-check` runs them, then
`python tests/test_readme.py`: the demo itself (about a minute), whose metric values must lie within TOLERANCE of the
README's since CPU kernels round differently between machines, and the real data's summary where
../shared/data/kermany-224 exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import REAL_DATA, REPO, compose

README = REPO / "README.md"
TOLERANCE = 0.1  # of a metric between the README's demo and a fresh run; one of the 72 test images moves acc 0.014
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.M | re.S)
DEMO_COMMAND = "pneumo-exp experiment=demo"


def readme_text() -> str:
    return README.read_text()


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block, its indentation removed."""
    return [(language, [line[len(indent):].rstrip() for line in body.splitlines()])
            for indent, language, body in FENCE.findall(text)]


def printed_blocks(text: str) -> dict[str, list[str]]:
    """The blocks that show what a command prints, by their first line."""
    return {lines[0]: lines for language, lines in fenced_blocks(text) if not language}


def code_text(text: str) -> str:
    """Everything the README sets as code: fenced blocks and inline spans."""
    prose = FENCE.sub("", text)
    return "\n".join(["\n".join(lines) for _, lines in fenced_blocks(text)] + re.findall(r"`([^`]+)`", prose))


def line_matches(shown: str, printed: str) -> bool:
    if "..." not in shown:
        return shown == printed.rstrip()
    return re.fullmatch(".*".join(re.escape(part) for part in shown.split("...")), printed.rstrip()) is not None


def missing_lines(shown: list[str], printed: list[str]) -> list[str]:
    """The shown lines that do not appear, in order, among the printed ones (a line `...` stands for any lines)."""
    missing, position = [], 0
    for line in shown:
        if line == "...":
            continue
        found = next((i for i in range(position, len(printed)) if line_matches(line, printed[i])), None)
        if found is None:
            missing.append(line)
        else:
            position = found + 1
    return missing


def split_demo_block(lines: list[str]) -> tuple[list[str], list[str]]:
    """The data summary (through the leakage check) and the metric table of the demo's block."""
    end = next(i for i, line in enumerate(lines) if line.startswith("leakage check:")) + 1
    return lines[:end], lines[end:]


def metric_rows(lines: list[str]) -> dict[str, dict[str, float]]:
    from pneumo_exp.classify.metrics import HEADLINE

    rows = {}
    for line in lines[1:]:
        split, *values = line.split()
        rows[split] = dict(zip(HEADLINE, map(float, values), strict=True))
    return rows


def metric_table_problems(lines: list[str]) -> list[str]:
    """Differences between the README's metric table and what the demo prints for the same numbers."""
    from pneumo_exp.pipeline import format_metrics

    printed = format_metrics({f"{split}/{name}": value for split, row in metric_rows(lines).items()
                              for name, value in row.items()}).splitlines()
    return [f"README: {shown!r}\nprints: {fresh!r}" for shown, fresh in zip(lines, printed, strict=True)
            if shown != fresh]


def quality_lines_printed_for(lines: list[str]) -> list[str]:
    """What the quality stage prints for the numbers the README's quality block shows."""
    from pneumo_exp.evaluation.quality import fid_shortfall
    from pneumo_exp.evaluation.quality_stage import format_quality
    from pneumo_exp.labels import CLASSES

    columns = ("real", "synthetic", "fid", "kid_mean", "diversity_synthetic_over_real", "nn_median",
               "real_nn_median", "likely_copies")
    per_class, scores = {}, {}
    for line in lines:
        cells = line.split()
        if cells and cells[0] in CLASSES and len(cells) == 1 + len(columns):
            per_class[cells[0]] = {c: None if v == "-" else float(v) for c, v in zip(columns, cells[1:], strict=True)}
        elif note := re.match(r"  (\w+) FID: .* the (\d+) feature dimensions", line):
            row = per_class[note[1]]
            row["fid_note"] = fid_shortfall(int(row["real"]), int(row["synthetic"]), int(note[2]))
        elif score := re.fullmatch(r"  (\w+) +(\d+) images   test acc ([\d.]+)   macro F1 ([\d.]+)", line):
            scores[score[1]] = {"train_images": int(score[2]), "test/acc": float(score[3]),
                                "test/f1_macro": float(score[4])}
    return format_quality({"per_class": per_class, "classification_accuracy_score": scores,
                           "synthetic_classes": list(CLASSES)}).splitlines()


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", (REPO / "Makefile").read_text(), re.M))


def config_groups() -> list[str]:
    conf = REPO / "conf"
    return sorted({str(Path(folder).relative_to(conf)) for folder, _, files in os.walk(conf, followlinks=True)
                   if any(name.endswith(".yaml") for name in files) and Path(folder) != conf})


def named_options(code: str) -> set[tuple[str, str]]:
    """(group, option) for every `group=option[,option...]` the README's code names (BACKBONES= names clip_lora)."""
    groups = "|".join(re.escape(group) for group in sorted(config_groups(), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./])({groups}|BACKBONES)=([\w/-]+(?:,[\w/-]+)*)(?![\w/.=-])")
    return {("clip_lora" if group == "BACKBONES" else group, option)
            for group, options in pattern.findall(code) for option in options.split(",")}


def option_exists(group: str, option: str) -> bool:
    if (REPO / "conf" / group / f"{option}.yaml").is_file():
        return True
    if not group.startswith("hydra/"):
        return False
    try:  # a Hydra plugin's own config, e.g. hydra/launcher=submitit_local
        compose([f"{group}={option}"])
    except Exception:
        return False
    return True


def test_every_printed_block_is_checked():
    assert set(printed_blocks(readme_text())) <= {"dataset: phantom", "dataset: kermany",
                                                  "synthetic image quality (classifier embedding space)"}, \
        "a new printed block in the README: teach tests/test_readme.py to check it"


def test_every_make_target_named_exists():
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", code_text(readme_text())))
    assert {"demo", "test", "summary"} <= named
    assert not named - makefile_targets(), f"README names make targets the Makefile lacks: {named - makefile_targets()}"


def test_every_config_option_named_exists():
    named = named_options(code_text(readme_text()))
    assert {("experiment", "demo"), ("clip_lora", "vit_l14"), ("diffusion_lora", "cxr_small")} <= named
    missing = sorted(pair for pair in named if not option_exists(*pair))
    assert not missing, f"README names options that are not under conf/ or experiments/: {missing}"


def test_the_option_finder_sees_a_missing_option():
    named = named_options("pneumo-exp experiment=nonesuch clip_lora=tiny,vit_x dataset.root=~/x `make demo`")
    assert named == {("experiment", "nonesuch"), ("clip_lora", "tiny"), ("clip_lora", "vit_x")}
    assert [pair for pair in sorted(named) if not option_exists(*pair)] == [("clip_lora", "vit_x"),
                                                                           ("experiment", "nonesuch")]


def test_every_task_named_exists():
    from pneumo_exp.validate import TASKS

    named = set(re.findall(r"\btask=(\w+)", code_text(readme_text())))
    assert named and not named - set(TASKS), f"README names unknown tasks: {named - set(TASKS)}"


def test_configuration_table_lists_each_groups_options():
    for group, options in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", readme_text(), re.M):
        if "files in" in options or not (REPO / "conf" / group).is_dir():
            continue
        listed = set(re.findall(r"`(\w+)`", options))
        present = {path.stem for path in (REPO / "conf" / group).glob("*.yaml")}
        assert listed == present, f"README's options for {group}: {sorted(listed)}; conf/{group}: {sorted(present)}"


def test_demo_block_shows_the_demos_data_summary(make_cfg):
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.summary import format_summary

    text = readme_text()
    assert DEMO_COMMAND in text
    summary, _ = split_demo_block(printed_blocks(text)["dataset: phantom"])
    cfg = make_cfg("experiment=demo")
    printed = format_summary(prepare_data(cfg.dataset, cfg.paths.cache_dir), cfg.dataset.name).splitlines()
    assert len(summary) >= 5 and not missing_lines(summary, printed), missing_lines(summary, printed)


def test_demo_block_shows_the_metric_table_as_printed():
    _, table = split_demo_block(printed_blocks(readme_text())["dataset: phantom"])
    rows = metric_rows(table)
    assert set(rows) == {"val", "test"} and all(0 <= v <= 1 for row in rows.values() for v in row.values())
    assert not metric_table_problems(table), "\n".join(metric_table_problems(table))


def test_quality_block_shows_the_quality_report_as_printed():
    block = printed_blocks(readme_text())["synthetic image quality (classifier embedding space)"]
    printed = quality_lines_printed_for(block)
    assert not missing_lines(block, printed), missing_lines(block, printed)


def test_a_stale_line_is_caught():
    printed = ["dataset: phantom", "train  60  60", "note: 170 personN numbers occur in both splits, always apart"]
    assert not missing_lines(["dataset: phantom", "note: 170 personN numbers occur ...", "..."], printed)
    assert missing_lines(["dataset: phantom", "train  61  60"], printed) == ["train  61  60"]
    assert missing_lines(["train  60  60", "dataset: phantom"], printed) == ["dataset: phantom"]  # out of order
    stale = ["split            acc  recall_macro      f1_macro   auroc_macro           ece",
             "test         0.8194        0.8194        0.8154        0.9763        0.087"]
    assert metric_table_problems(stale)


def fresh_demo_problems() -> list[str]:
    """Runs the demo once and compares its printout with the README's block (values within TOLERANCE)."""
    summary, table = split_demo_block(printed_blocks(readme_text())["dataset: phantom"])
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([str(Path(sys.executable).parent / "pneumo-exp"), "experiment=demo", "logger=none",
                               f"hydra.run.dir={folder}"], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return [f"the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}"]
    printed = done.stdout.splitlines()
    problems = [f"not printed by the demo: {line!r}" for line in missing_lines(summary, printed)]
    header = next((i for i, line in enumerate(printed) if line.startswith("split") and "acc" in line), None)
    if header is None:
        return [*problems, "the demo printed no metric table"]
    fresh_table = printed[header:header + len(table)]
    if fresh_table[0] != table[0]:
        problems.append(f"metric header\nREADME: {table[0]!r}\nprints: {fresh_table[0]!r}")
    shown, fresh = metric_rows(table), metric_rows(fresh_table)
    problems += [f"{split}/{name}: README {value:.4f}, fresh run {fresh[split][name]:.4f}"
                 for split, row in shown.items() for name, value in row.items()
                 if abs(value - fresh[split][name]) > TOLERANCE]
    print("\n".join(["the demo printed:", *fresh_table]))
    return problems


def real_data_summary_problems() -> list[str]:
    """The README's `make summary` block against the summary of the real data (about 20 s: it hashes every file)."""
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.summary import format_summary

    block = printed_blocks(readme_text())["dataset: kermany"]
    with tempfile.TemporaryDirectory() as folder:
        cfg = compose(["dataset=kermany", f"dataset.root={REAL_DATA}", f"paths.cache_dir={folder}"])
        printed = format_summary(prepare_data(cfg.dataset, cfg.paths.cache_dir), cfg.dataset.name).splitlines()
    return [f"not printed by make summary: {line!r}" for line in missing_lines(block, printed)]


def main() -> int:
    problems = fresh_demo_problems()
    if (REAL_DATA / "train").is_dir():
        problems += real_data_summary_problems()
        print(f"make summary's block checked against {REAL_DATA}")
    else:
        print(f"the real data summary block is not checked: no dataset at {REAL_DATA}")
    print("\n".join(problems) if problems else
          f"README's printed blocks: OK (demo metrics within {TOLERANCE} of this run)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
