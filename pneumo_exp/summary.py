"""A printable summary of a prepared dataset: images per split and class, patients, and the leakage check."""

from __future__ import annotations

from pneumo_exp.data.manifest import SPLITS, counts, images_in_several_splits, leaking_patients, patient_counts
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.labels import CLASSES


def summary_table(data: PreparedData) -> dict:
    per_class = counts(data.records)
    patients = patient_counts(data.records)
    return {split: {**per_class[split], "total": sum(per_class[split].values()), "patients": patients[split]}
            for split in SPLITS}


def format_summary(data: PreparedData, name: str) -> str:
    table = summary_table(data)
    columns = [*CLASSES, "total", "patients"]
    lines = [f"dataset: {name}", f"{'split':<10}" + "".join(f"{c:>10}" for c in columns)]
    for split in SPLITS:
        lines.append(f"{split:<10}" + "".join(f"{table[split][c]:>10}" for c in columns))
    for label, splits in (("train+val", ("train", "val")), ("all", SPLITS)):
        lines.append(f"{label:<10}" + "".join(f"{sum(table[s][c] for s in splits):>10}"
                                              for c in [*CLASSES, "total"]))
    leaks, copies = leaking_patients(data.records), images_in_several_splits(data.records)
    lines.append("leakage check: " + ("OK, no patient and no identical image appears in more than one split"
                                      if not leaks and not copies else
                                      f"FAILED, {len(leaks)} patient(s) and {len(copies)} image(s) in several "
                                      f"splits"))
    lines.extend(f"note: {note}" for note in data.notes)
    if data.skipped:
        lines.append(f"skipped {len(data.skipped)} file(s):")
        lines.extend(f"  {message}" for message in data.skipped[:20])
        if len(data.skipped) > 20:
            lines.append(f"  ... and {len(data.skipped) - 20} more (all listed in skipped.txt)")
    return "\n".join(lines)
