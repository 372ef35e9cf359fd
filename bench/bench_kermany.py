"""The real-data recipe, N seeds: test metrics per seed and their mean with CIs, wall time and peak memory.

    python bench/bench_kermany.py DATA_DIR [--seeds 0 1 2] [--experiment kermany_cpu] [--out FILE] [overrides ...]

Each seed is one ordinary `pneumo-exp experiment=... seed=N` run in its own process (so peak memory is per run),
selecting the epoch on the patient-grouped validation split and touching the test split once. With the override
`dataset.val_fraction=0` each seed is the final fit on train + val instead (the recipe's epochs, last epoch kept).
The JSON holds each run's test metrics with patient-level bootstrap CIs, per-class recall, confusion matrix, wall
time and peak RSS (that run's own), and the mean over seeds with a Student-t 95 % CI. Run folders and logs go to a
folder beside the JSON (git-ignored); the JSON itself is small and committed when the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pneumo_exp.report.statistics import summarize  # noqa: E402

HEADLINE = ("test/acc", "test/f1_macro", "test/recall_macro", "test/recall_NORMAL", "test/recall_BACTERIA",
            "test/recall_VIRUS", "test/auroc_macro", "test/ece")
VALIDATION = ("val/acc", "val/f1_macro", "val/recall_NORMAL", "val/recall_BACTERIA", "val/recall_VIRUS")


# Launches the command and writes its peak resident memory (KiB) to argv[1]. A child's ru_maxrss includes the memory
# of the process it was forked from, so the command is forked from this small launcher, not from the bench itself
# (what /usr/bin/time does too); wait4 reads that one child's peak, not a maximum over every child so far.
PEAK_LAUNCHER = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); "
                 "_, status, usage = os.wait4(child.pid, 0); "
                 "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def run_measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """Run `command` from the repository, its output to `log`: exit code, wall seconds and the command's own peak
    resident memory in KiB (plus the few MiB of the launcher it is forked from)."""
    peak_file = log.with_suffix(".max-rss-kib")
    start = time.perf_counter()
    with open(log, "w") as output:
        done = subprocess.run([sys.executable, "-c", PEAK_LAUNCHER, str(peak_file), *command], cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=output, stderr=subprocess.STDOUT)
    return done.returncode, time.perf_counter() - start, int(peak_file.read_text())


def run_seed(data: Path, experiment: str, seed: int, folder: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "pneumo_exp.cli", f"experiment={experiment}", f"dataset.root={data}",
               f"seed={seed}", f"hydra.run.dir={folder}", "logger=none", *overrides]
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"seed{seed}.log"
    returncode, wall, peak_kib = run_measured(command, log)
    if returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{log.read_text()[-3000:]}")
    results = json.loads((folder / "results.json").read_text())
    return {"seed": seed, "run_dir": str(folder), "wall_seconds": round(wall, 1),
            "peak_rss_mib": round(peak_kib / 1024, 1), "best_epoch": results["best_epoch"],
            "metrics": {k: results["metrics"][k] for k in HEADLINE},
            "validation": {k: results["metrics"][k] for k in VALIDATION if k in results["metrics"]},
            "ci95": {k: results["ci95"][k] for k in HEADLINE if k in results["ci95"]},
            "confusion_matrix_test": results["confusion_matrix"]["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the Kermany dataset folder or zip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiment", default="kermany_cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kermany.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every seed")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    root = args.out.parent / f"{args.experiment}-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args.data.resolve(), args.experiment, seed, root / f"seed{seed}", args.overrides))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1]["metrics"].items())
              + f"  ({runs[-1]['wall_seconds']:.0f} s)", flush=True)
    mean = {metric: summarize(run["metrics"][metric] for run in runs) for metric in HEADLINE}
    report = {"experiment": args.experiment, "data": str(args.data), "overrides": args.overrides,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "seeds": runs, "mean_over_seeds": mean}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for metric, stats in mean.items():
        print(f"{metric:<22} mean {stats['mean']:.4f}  95% CI [{stats['ci_low']}, {stats['ci_high']}]")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
