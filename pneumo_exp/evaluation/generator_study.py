"""`task=generator_study`: did the generators learn? Each generator (a base model, optionally with a LoRA) draws
`generator_study.images_per_class` images per class with the class prompts of `diffusion_lora`, and the classifier
of a run trained on real images only (`generator_study.reference_run`, the judge) measures them beside the real
validation images, the reference arm every study holds (`real_validation`):

(a) class steering: the share of each class's images the judge assigns to the prompted class (chance 1/3); for the
    real validation images this is the judge's per-class validation recall;
(b) FID, KID and nearest-neighbour distances to the real training images of the class, in the judge's image
    embedding, a feature space that never saw a synthetic image;
(c) intensity statistics: mean, contrast (per-image std) and the dark border of real films (the outer 10 % frame
    against the middle of the image);
(d) memorisation: the images nearer a real training image than all but `copy_quantile` of the real validation
    images are (the threshold is calibrated on validation-to-training distances in the same space);
(e) the quality stage's classification accuracy score: the judge's recipe trained on the generator's images alone
    and on as many real training images, both tested on the real test split;
(f) fidelity as the field measures it (`fidelity.py`), per class and overall, with every arm cut to the same number
    of images per class: FID and KID, precision, recall, density and coverage (k = 5), and a classifier two-sample
    test (held-out AUROC of real training against the arm's images, 0.5: indistinguishable).

Each generator draws `generator_study.draws` disjoint sets (draw i with seed + i); every number of a draw gets its
mean and Student-t CI over the draws, and every pair of generators a paired CI of their difference (draw i of each
paired, as they share their seeds). Every image reaches the judge as its own run's images did: a PNG decoded at the
run's `dataset.resolution` with its `dataset.intensity` through the image cache, evaluated under the run's
precision. Writes `generator_study.json`, `generator_study.md`, `<arm>/samples.png` (a generator's first draw), each
draw's images under `<generator>/draw_<i>/synthetic/` and its score's classifiers under
`<generator>/draw_<i>/quality/`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pneumo_exp.config import JobConfig, LoggerMode, Precision, StudyGenerator, plain, stored_job_config
from pneumo_exp.core.files import atomic_file, write_atomic, write_json_atomic
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.manifest import Record, read_csv
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.data.provenance import check_trained_within
from pneumo_exp.evaluation.fidelity import RealReference, matched_sizes, measured_in, paired_difference, t_interval
from pneumo_exp.evaluation.quality import encode, feature_quality, nearest_real_distances
from pneumo_exp.hub import ModelSourceError
from pneumo_exp.inputs import stored_inputs
from pneumo_exp.labels import CLASSES, class_index
from pneumo_exp.rundir import not_a_result
from pneumo_exp.validate import RANDOM_BASE, STUDY_REAL_ARM

log = logging.getLogger(__name__)

BORDER = 0.1  # the outer frame, as a share of the side, that real films show dark
CHANCE = 1 / len(CLASSES)


@dataclass
class Reference:
    """The judge: a run's classifier on its device, the accelerator of its precision, its recipe and its images."""
    run_dir: Path
    recipe: JobConfig  # the run's config with this study's paths and seed, without W&B
    data: PreparedData  # the run's manifest: the splits its classifier trained, validated and was tested on
    classifier: torch.nn.Module
    accelerator: object


@dataclass
class ImageSet:
    """Images as the judge sees them: uint8 (N, R, R) at its run's resolution, after its intensity step."""
    records: list[Record]
    pixels: np.ndarray
    labels: np.ndarray  # (N,) class indices

    def of_class(self, index: int) -> np.ndarray:
        return self.pixels[self.labels == index]


def load_reference(cfg: JobConfig) -> Reference:
    """The judge, its recipe at the precision its run resolved (`trainer.precision=auto`) and trained at."""
    from pneumo_exp.classify.predict import load_as_trained, trained_precision

    run_dir = Path(cfg.generator_study.reference_run)
    classifier, _, accelerator = load_as_trained(run_dir, cfg.paths.cache_dir)
    stored = stored_job_config(OmegaConf.load(run_dir / "config.yaml"))
    precision = Precision(trained_precision(run_dir) or stored.trainer.precision)
    recipe = replace(stored, paths=cfg.paths, seed=cfg.seed, resume=False,
                     logger=replace(stored.logger, mode=LoggerMode.disabled),
                     trainer=replace(stored.trainer, precision=precision))
    return Reference(run_dir, recipe, PreparedData(records=read_csv(run_dir / "manifest.csv")), classifier,
                     accelerator)


def image_set(records: list[Record], reference: Reference, progress: bool = False) -> ImageSet:
    """`records` through the judge's image cache: its resolution and intensity step."""
    dataset = reference.recipe.dataset
    cache = open_or_build(records, dataset.resolution, reference.recipe.paths.cache_dir, progress=progress,
                          intensity=dataset.intensity)
    return ImageSet(records, np.asarray(cache.pixels[cache.rows_of(records)]),
                    np.array([class_index(r.label) for r in records], dtype=np.int64))


# ------------------------------------------------------------------------------------------ measures


def steering(predicted: np.ndarray, labels: np.ndarray) -> dict:
    """Per prompted class, the share of its images assigned to that class, and how all of them were assigned."""
    present = [index for index in range(len(CLASSES)) if (labels == index).any()]
    rates = {CLASSES[i]: float(np.mean(predicted[labels == i] == i)) for i in present}
    assigned = {CLASSES[i]: {CLASSES[j]: int(np.sum(predicted[labels == i] == j)) for j in range(len(CLASSES))}
                for i in present}
    return {"per_class": rates, "mean": float(np.mean(list(rates.values()))), "assigned": assigned}


def intensity_statistics(pixels: np.ndarray) -> dict:
    """Grey levels (0-255) of a set of images: their mean, contrast (the mean per-image std), and the border (the
    outer 10 % frame) against the centre (the middle half of the side)."""
    images = pixels.astype(np.float64)
    side = images.shape[-1]
    frame, quarter = max(1, round(BORDER * side)), side // 4
    border = np.ones((side, side), dtype=bool)
    border[frame:side - frame, frame:side - frame] = False
    border_mean = float(images[:, border].mean())
    centre_mean = float(images[:, quarter:side - quarter, quarter:side - quarter].mean())
    return {"mean": float(images.mean()), "contrast": float(images.std(axis=(1, 2)).mean()), "border": border_mean,
            "centre": centre_mean, "border_over_centre": border_mean / centre_mean if centre_mean else None}


def class_counts(images: ImageSet) -> dict[str, int]:
    return {label: int((images.labels == index).sum()) for index, label in enumerate(CLASSES)}


def intensity_by_class(images: ImageSet) -> dict:
    return {label: intensity_statistics(images.of_class(index)) for index, label in enumerate(CLASSES)
            if (images.labels == index).any()}


def likely_copies(nearest: torch.Tensor, labels: np.ndarray, threshold: float) -> dict:
    """The images whose nearest real training image is no farther than `threshold`, in all and per class."""
    flagged = (nearest <= threshold).numpy()
    return {"likely_copies": int(flagged.sum()), "images": len(flagged),
            "per_class": {label: int(flagged[labels == index].sum()) for index, label in enumerate(CLASSES)
                          if (labels == index).any()}}


class Judge:
    """The reference classifier and the real training images, as every arm's measures need them."""

    def __init__(self, cfg: JobConfig, reference: Reference):
        from pneumo_exp.evaluation.quality_stage import ImageEmbedding

        self.cfg, self.reference = cfg, reference
        self.embedding = ImageEmbedding(reference.classifier, reference.accelerator)
        self.num_features = reference.classifier.embedding_dim
        real = image_set(reference.data.records, reference, progress=True)  # the run's own cache: built once
        self.train = self.subset(real, "train")
        self.validation = self.subset(real, "val")
        self.train_features = self.features(self.train)
        self.validation_nearest = nearest_real_distances(self.train_features, self.features(self.validation))
        self.copy_threshold = float(torch.quantile(self.validation_nearest, cfg.generator_study.copy_quantile))
        drawn = {label: cfg.generator_study.images_per_class for label in CLASSES}
        self.fidelity = RealReference(self.train_features, self.train.labels,
                                      matched_sizes(class_counts(self.validation), drawn, class_counts(self.train)),
                                      self.num_features,
                                      cfg.quality.kid_subset_size, cfg.quality.kid_subsets, cfg.seed)

    @staticmethod
    def subset(images: ImageSet, split: str) -> ImageSet:
        rows = [row for row, record in enumerate(images.records) if record.split == split]
        return ImageSet([images.records[row] for row in rows], images.pixels[rows], images.labels[rows])

    def features(self, images: ImageSet) -> torch.Tensor:
        return encode(images.pixels, self.embedding, self.num_features, self.reference.recipe.dataset.resolution,
                      self.reference.recipe.trainer.eval_batch_size)

    @torch.no_grad()
    def predictions(self, images: ImageSet) -> np.ndarray:
        from pneumo_exp.classify.predict import class_probabilities

        batch = self.reference.recipe.trainer.eval_batch_size
        probabilities = [class_probabilities(self.reference.classifier,
                                             to_unit_float(torch.from_numpy(images.pixels[start:start + batch])),
                                             self.reference.accelerator)
                         for start in range(0, len(images.pixels), batch)]
        return torch.cat(probabilities).argmax(-1).numpy()

    def class_quality(self, features: torch.Tensor, labels: np.ndarray) -> dict:
        """(b) per class: FID, KID and nearest-neighbour distances to the class's real training images."""
        settings = self.cfg.quality
        report = {}
        for index, label in enumerate(CLASSES):
            if (labels == index).any():
                row = feature_quality(self.train_features[self.train.labels == index],
                                      features[labels == index], self.num_features, settings.kid_subset_size,
                                      settings.kid_subsets, self.cfg.seed)
                row.pop("likely_copies")  # the study counts copies against its calibrated threshold, (d)
                report[label] = row
        return report

    def report(self, images: ImageSet) -> dict:
        """Measures (a) to (d) and (f) of one arm."""
        features = self.features(images)
        return {"images": class_counts(images),
                "steering": steering(self.predictions(images), images.labels),
                "quality": self.class_quality(features, images.labels),
                "intensity": intensity_by_class(images),
                "memorisation": likely_copies(nearest_real_distances(self.train_features, features), images.labels,
                                              self.copy_threshold),
                "fidelity": self.fidelity.measure(features, images.labels, self.cfg.seed)}

    def fidelity_note(self) -> dict:
        recipe = self.reference.recipe
        return measured_in(f"the judge's unit-norm image embedding ({self.num_features}-d)",
                           f"each image decoded to grey at the judge's dataset.resolution={recipe.dataset.resolution} "
                           f"px with its dataset.intensity={recipe.dataset.intensity} (the judge's image cache), "
                           f"then the judge's own input transform, under precision {recipe.trainer.precision.value}",
                           self.fidelity.sizes)

    def copy_threshold_note(self) -> str:
        quantile = self.cfg.generator_study.copy_quantile
        return (f"a likely copy is an image whose nearest real training image, in the judge's embedding, is no "
                f"farther than {self.copy_threshold:.4g}: the {100 * quantile:g} % quantile "
                f"(generator_study.copy_quantile={quantile:g}) of the distances from each of the "
                f"{len(self.validation_nearest)} real validation images to its nearest training image, so an image "
                f"is flagged when it sits nearer the training set than all but {100 * quantile:g} % of real "
                f"held-out images do; the real_validation arm is the calibration set, flagged at that rate by "
                f"construction")


# ------------------------------------------------------------------------------------------ generators


def generator_source(cfg: JobConfig, generator: StudyGenerator, train: list[Record]) -> str:
    """The folder or hub id of the generator's base model (the preset's: its base for the judge's training split)."""
    from pneumo_exp.diffusion.bases import run_base
    from pneumo_exp.diffusion.stable_diffusion import pipeline_source

    if generator.base == RANDOM_BASE:
        return pipeline_source(replace(cfg.diffusion_lora, pretrained=None), cfg.paths.cache_dir)
    if generator.base is None:
        return pipeline_source(run_base(cfg.diffusion_lora, train), cfg.paths.cache_dir)
    return generator.base


def checked_sources(cfg: JobConfig, data: PreparedData) -> dict[str, str]:
    """Each generator's base, refused before any image is drawn where it cannot draw at `diffusion_lora.resolution`
    or where it, or its LoRA, trained on images outside the judge's training split (it may have seen the test
    images)."""
    from pneumo_exp.diffusion.bases import check_base_provenance
    from pneumo_exp.diffusion.stable_diffusion import check_resolution

    train = [r for r in data.split("train") if r.source == "real"]
    sources = {}
    for index, generator in enumerate(cfg.generator_study.generators):
        key = f"generator_study.generators[{index}]"
        sources[generator.name] = generator_source(cfg, generator, train)
        with named_base(generator, f"{key}.base"):
            check_resolution(cfg.diffusion_lora, sources[generator.name])
        if generator.base not in (None, RANDOM_BASE):
            check_base_provenance(sources[generator.name], train, f"{key}.base", required=False)
        if generator.lora:
            check_trained_within(generator.lora, train, "LoRA", f"{key}.lora")
    return sources


@contextmanager
def named_base(generator: StudyGenerator, key: str) -> Iterator[None]:
    """A base the generator names itself (a folder or hub id) that cannot be loaded is reported, on one line, against
    its own key rather than the preset's `diffusion_lora.pretrained`."""
    try:
        yield
    except ModelSourceError as error:
        if generator.base in (None, RANDOM_BASE):
            raise
        raise ModelSourceError(" ".join(error.what.split()), where=key, fix=error.fix) from None


def draw_seeds(cfg: JobConfig) -> list[int]:
    """The seed of each draw: the generation seed, plus the draw's index (image seeds are hashed from it, so the
    draws share no image; draw i of every generator starts from the same noise)."""
    generation = cfg.diffusion_lora.generation
    seed = int(cfg.seed if generation.seed is None else generation.seed)
    return [seed + index for index in range(cfg.generator_study.draws)]


def draw(cfg: JobConfig, generator: StudyGenerator, source: str, folder: Path, seed: int) -> list[Record]:
    """`images_per_class` images of every class, drawn as the synthesize stage draws them, into folder/synthetic."""
    from pneumo_exp.diffusion.generate import generate_synthetic

    preset, settings = cfg.diffusion_lora, cfg.diffusion_lora.generation
    log.info("generator %s: drawing %d images per class with seed %d", generator.name,
             cfg.generator_study.images_per_class, seed)
    return generate_synthetic(
        source, generator.lora, {label: cfg.generator_study.images_per_class for label in CLASSES},
        plain(preset.prompts), folder, seed=seed,
        steps=settings.num_inference_steps, guidance=settings.guidance_scale, batch_size=settings.batch_size,
        resolution=int(preset.resolution), device="cpu" if cfg.trainer.cpu else None,
        precision=settings.precision, revision=preset.revision if generator.base is None else None)


def draw_folder(output_dir: Path, name: str, index: int) -> Path:
    return output_dir / name / f"draw_{index}"


def accuracy_score(cfg: JobConfig, reference: Reference, synthetic: list[Record], folder: Path) -> dict:
    """(e) the quality stage's classification accuracy score with the judge's recipe, splits and test images."""
    from pneumo_exp.evaluation.quality_stage import classification_accuracy_score

    if not cfg.generator_study.accuracy_score:
        return {"not_run": "generator_study.accuracy_score=false"}
    return classification_accuracy_score(reference.recipe, PreparedData(records=reference.data.records + synthetic),
                                         folder)


def write_grid(images: ImageSet, count: int, path: Path) -> None:
    from pneumo_exp.diffusion.stable_diffusion import grid_image

    rows = {label: images.of_class(index)[:count] for index, label in enumerate(CLASSES)
            if (images.labels == index).any()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as handle:
        grid_image(rows).save(handle, format="PNG")


# ------------------------------------------------------------------------------------------ the task


def run_generator_study(cfg: JobConfig, output_dir: Path) -> str:
    """The study's JSON, markdown and sample grids in `output_dir`; returns the markdown."""
    from accelerate.utils.memory import clear_device_cache

    reference = load_reference(cfg)
    sources = checked_sources(cfg, reference.data)
    seeds = draw_seeds(cfg)
    drawn = {generator.name: [draw(cfg, generator, sources[generator.name], draw_folder(output_dir, generator.name, i),
                                   seed) for i, seed in enumerate(seeds)]
             for generator in cfg.generator_study.generators}
    judge = Judge(cfg, reference)
    arms = {STUDY_REAL_ARM: judge.report(judge.validation)}
    write_grid(judge.validation, cfg.generator_study.grid_images, output_dir / STUDY_REAL_ARM / "samples.png")
    for name, draws in drawn.items():
        reports = []
        for seed, records in zip(seeds, draws):
            images = image_set(records, reference)
            reports.append({"seed": seed, **judge.report(images)})
        arms[name] = {"draws": reports}
        write_grid(image_set(draws[0], reference), cfg.generator_study.grid_images, output_dir / name / "samples.png")
    study = study_summary(cfg, judge, sources, arms)
    del judge
    reference.classifier = None  # the score's classifiers train next, on the same device
    clear_device_cache(garbage_collection=True)
    for name, draws in drawn.items():
        for index, (report, records) in enumerate(zip(arms[name]["draws"], draws)):
            report["accuracy_score"] = accuracy_score(cfg, reference, records, draw_folder(output_dir, name, index))
        arms[name]["over_draws"] = over_draws(arms[name]["draws"])
    study["comparisons"] = comparisons(arms, [generator.name for generator in cfg.generator_study.generators])
    write_json_atomic(output_dir / "generator_study.json", study)
    markdown = format_study(study)
    write_atomic(output_dir / "generator_study.md", markdown)
    return markdown


# ------------------------------------------------------------------------------------------ over draws


def numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a draw's report by its dotted path (`fidelity.overall.precision`), its seed left out."""
    found = {}
    for key, value in report.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(numbers(value, path + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and path != "seed":
            found[path] = float(value)
    return found


def over_draws(reports: list[dict]) -> dict[str, dict]:
    """Every number of the draws: its mean and t CI over them (`fidelity.t_interval`)."""
    values = [numbers(report) for report in reports]
    paths = list(dict.fromkeys(path for draw in values for path in draw))
    return {path: t_interval([draw.get(path) for draw in values]) for path in paths}


def comparisons(arms: dict, names: list[str]) -> dict[str, dict]:
    """Every pair of generators, later minus earlier: per number, the paired t CI of the difference over the
    draws (draw i of each generator paired) and what it shows."""
    compared = {}
    for first, second in combinations(names, 2):
        values = [[numbers(report) for report in arms[name]["draws"]] for name in (first, second)]
        paths = [path for path in values[0][0] if path in values[1][0]]
        compared[f"{second} - {first}"] = {
            "first": first, "second": second,
            "differences": {path: paired_difference([draw.get(path) for draw in values[0]],
                                                    [draw.get(path) for draw in values[1]]) for path in paths}}
    return compared


def judge_not_a_result(reference: Reference) -> list[str]:
    """Why the judge's numbers are no result: its run chose its epoch on a capped validation split, tested on a
    capped test split or trained on a subset of the dataset."""
    results_file = reference.run_dir / "results.json"
    capped = json.loads(results_file.read_text()).get("capped") or {} if results_file.is_file() else {}
    return [f"the judge's {reason}" for reason in not_a_result(capped, reference.recipe.dataset.limit_per_class)]


def study_summary(cfg: JobConfig, judge: Judge, sources: dict[str, str], arms: dict) -> dict:
    recipe, generation = judge.reference.recipe, cfg.diffusion_lora.generation
    return {
        "reference_run": str(judge.reference.run_dir),
        "not_a_result": judge_not_a_result(judge.reference),
        "reference_inputs": stored_inputs(judge.reference.run_dir),  # what the judge read, by content
        "judge": {"resolution": recipe.dataset.resolution, "intensity": recipe.dataset.intensity,
                  "precision": recipe.trainer.precision.value,
                  "feature_space": f"the judge's unit-norm image embedding ({judge.num_features}-d)"},
        "sampling": {"diffusion_lora": cfg.diffusion_lora.name, "resolution": cfg.diffusion_lora.resolution,
                     "images_per_class": cfg.generator_study.images_per_class,
                     "steps": generation.num_inference_steps, "guidance": generation.guidance_scale,
                     "draws": cfg.generator_study.draws, "seeds": draw_seeds(cfg)},
        "fidelity": judge.fidelity_note(),
        "generators": {generator.name: {"base": sources[generator.name], "lora": generator.lora}
                       for generator in cfg.generator_study.generators},
        "chance_steering": CHANCE,
        "copy_threshold": {"value": judge.copy_threshold, "how": judge.copy_threshold_note()},
        "training_images": {"images": {label: int((judge.train.labels == index).sum())
                                       for index, label in enumerate(CLASSES)},
                            "intensity": intensity_by_class(judge.train)},
        "arms": arms,
    }


# ------------------------------------------------------------------------------------------ markdown


def cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)  # 4 significant digits: KID is ~1e-4


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(cell(value) for value in row) + " |" for row in rows), ""]


def arm_rows(arms: dict) -> list[tuple[str, dict]]:
    """Each measured set as a table row names it: the real arm, each generator (`name draw i` with several draws)."""
    rows = []
    for name, arm in arms.items():
        draws = arm.get("draws", [arm])
        rows += [(name if len(draws) == 1 else f"{name} draw {index}", report) for index, report in enumerate(draws)]
    return rows


def format_study(study: dict) -> str:
    arms, judge = study["arms"], study["judge"]
    rows = arm_rows(arms)
    lines = ["# Generator study", "",
             f"Judge: the classifier of `{study['reference_run']}` (trained on real images only); every image is "
             f"seen at {judge['resolution']} px, intensity `{judge['intensity']}`, precision `{judge['precision']}`. "
             f"Generators: " + ", ".join(f"`{name}` = {g['base']}" + (f" + LoRA {g['lora']}" if g["lora"] else "")
                                         for name, g in study["generators"].items()) + ".", "",
             f"Draws per generator: {study['sampling']['draws']} (seeds {study['sampling']['seeds']}).", "",
             *(f"not a result: {reason}" for reason in study.get("not_a_result", ())),
             f"## (a) Class steering: share classified as the prompted class (chance {study['chance_steering']:.3f})",
             ""]
    lines += table(["arm", *CLASSES, "mean"], [[name, *(arm["steering"]["per_class"].get(label) for label in CLASSES),
                                               arm["steering"]["mean"]] for name, arm in rows])
    lines += ["## (b) Distance to the real training images of the class (judge's embedding)", ""]
    columns = ("synthetic", "fid", "kid_mean", "nn_median", "real_nn_median", "diversity_synthetic_over_real")
    lines += table(["arm", "class", "images", "FID", "KID", "NN median", "train-train NN median", "diversity"],
                   [[name, label, *(row.get(column) for column in columns)]
                    for name, arm in rows for label, row in arm["quality"].items()])
    lines += [f"- {name} {label}: FID {row['fid_note']}" for name, arm in rows
              for label, row in arm["quality"].items() if "fid_note" in row]
    lines += ["", "## (c) Intensity (grey levels 0-255, as the judge sees them)", ""]
    intensity_rows = {"real training": study["training_images"]["intensity"],
                      **{name: arm["intensity"] for name, arm in rows}}
    statistics = ("mean", "contrast", "border", "centre", "border_over_centre")
    lines += table(["images", "class", "mean", "contrast (std)", "border (outer 10 %)", "centre", "border / centre"],
                   [[name, label, *(row[key] for key in statistics)]
                    for name, by_class in intensity_rows.items() for label, row in by_class.items()])
    lines += ["## (d) Memorisation: likely copies of training images", "", study["copy_threshold"]["how"] + ".", ""]
    lines += table(["arm", "likely copies", "images", *CLASSES],
                   [[name, arm["memorisation"]["likely_copies"], arm["memorisation"]["images"],
                     *(arm["memorisation"]["per_class"].get(label) for label in CLASSES)]
                    for name, arm in rows])
    lines += ["## (e) Classification accuracy score (the judge's recipe, tested on the real test split)", ""]
    lines += accuracy_score_lines(rows)
    lines += fidelity_lines(study["fidelity"], rows)
    lines += over_draws_lines(arms)
    lines += comparison_lines(study.get("comparisons", {}))
    return "\n".join(lines)


def accuracy_score_lines(rows: list[tuple[str, dict]]) -> list[str]:
    table_rows, notes = [], []
    for name, arm in rows:
        scores = arm.get("accuracy_score")
        if scores is None:
            continue
        if "not_run" in scores:
            notes.append(f"- {name}: not run ({scores['not_run']})")
            continue
        table_rows += [[name, arm_name, row["train_images"], row["test/acc"], row["test/f1_macro"]]
                       for arm_name, row in scores.items()]
    header = ["generator", "trained on", "images", "test acc", "test macro F1"]
    return (table(header, table_rows) if table_rows else []) + notes


FIDELITY_COLUMNS = ("images", "fid", "kid_mean", "precision", "recall", "density", "coverage", "c2st_auroc")


def fidelity_lines(how: dict, rows: list[tuple[str, dict]]) -> list[str]:
    sizes = ", ".join(f"{label} {size}" for label, size in how["images_per_arm"].items())
    lines = ["", "## (f) Fidelity against the real training images, every arm at the same size", "",
             f"Feature space: {how['feature_space']}. Preprocessing: {how['preprocessing']}. Images per arm and "
             f"class: {sizes}; {how['matched']}. Precision, recall, density and coverage with k = {how['neighbours']}. "
             f"Two-sample test: {how['two_sample_test']}; 0.5: the arm cannot be told from real images.", ""]
    header = ["arm", "class", "images", "FID", "KID", "precision", "recall", "density", "coverage",
              "two-sample AUROC", "95 % CI"]
    body, noted = [], {}
    for name, arm in rows:
        for label, row in [*arm["fidelity"]["per_class"].items(), ("overall", arm["fidelity"]["overall"])]:
            interval = None if row["c2st_ci_low"] is None else f"[{row['c2st_ci_low']:.3f}, {row['c2st_ci_high']:.3f}]"
            body.append([name, label, *(row[column] for column in FIDELITY_COLUMNS), interval])
            for note in row.get("notes", ()):
                noted.setdefault(note, []).append(f"{name} {label}")
    return lines + table(header, body) + [f"- {note} ({', '.join(where)})" for note, where in noted.items()]


HEADLINE = {"steering.mean": "class steering (mean)", "fidelity.overall.fid": "FID (matched, overall)",
            "fidelity.overall.kid_mean": "KID (matched, overall)", "fidelity.overall.precision": "precision",
            "fidelity.overall.recall": "recall", "fidelity.overall.density": "density",
            "fidelity.overall.coverage": "coverage", "fidelity.overall.c2st_auroc": "two-sample AUROC",
            "memorisation.likely_copies": "likely copies",
            "accuracy_score.synthetic_only.test/f1_macro": "accuracy score: test macro F1, synthetic only"}


def interval_text(summary: dict | None) -> str | None:
    if summary is None or summary["mean"] is None:
        return None
    if summary["ci_low"] is None:
        return cell(summary["mean"])
    return f"{cell(summary['mean'])} [{cell(summary['ci_low'])}, {cell(summary['ci_high'])}]"


def over_draws_lines(arms: dict) -> list[str]:
    generators = {name: arm["over_draws"] for name, arm in arms.items() if "over_draws" in arm}
    if not generators:
        return []
    draws = max(len(arm["draws"]) for arm in arms.values() if "draws" in arm)
    lines = ["", f"## (g) Over the {draws} draws: mean [95 % Student-t CI]", ""]
    if draws < 2:
        lines += ["One draw per generator: no interval (generator_study.draws=k, k >= 2, gives one).", ""]
    body = [[title, *(interval_text(summary.get(path)) for summary in generators.values())]
            for path, title in HEADLINE.items()]
    return lines + table(["metric", *generators], body) + ["Every number of a draw, with its interval: "
                                                          "`over_draws` of each arm in generator_study.json.", ""]


def comparison_lines(compared: dict) -> list[str]:
    if not compared:
        return []
    lines = ["## (h) Generators compared, draw i with draw i: paired difference [95 % t CI]", ""]
    body = [[pair, title, interval_text(result["differences"].get(path)),
             result["differences"][path]["verdict"] if path in result["differences"] else None]
            for pair, result in compared.items() for path, title in HEADLINE.items()]
    return lines + table(["difference", "metric", "mean [CI]", "shows"], body) + [
        "`shows`: above 0 or below 0 where the CI excludes 0, else no difference shown; every number in "
        "`comparisons` of generator_study.json.", ""]
