"""Phantom chest X-rays: a deterministic, procedural stand-in for the pediatric pneumonia dataset.

Every image is named by a key such as ``phantom:v1:seed=0:difficulty=0.5:BACTERIA:PB0003:1`` and is drawn
from that key alone, at any size, in any process: no download and no files. The key's parts are the generator
version, the dataset seed, the difficulty, the class, the patient and the image's index within the patient.

What is drawn, in a patient's own (anatomical) coordinates ``u`` (left to right on the image, i.e. the
patient's right is on the image's left) and ``v`` (top to bottom), both about [-1, 1]:

* soft tissue of the thorax and neck, two dark air-filled lungs whose bases rest on the diaphragm domes, the
  mediastinum and a heart shifted to the patient's left, the spine, clavicles, curved ribs, vessels fanning out
  of the hila and a gastric air bubble under the left dome;
* NORMAL: clear lungs;
* BACTERIA: one lobar consolidation (dense, homogeneous, sharp-edged, with a fissure-bounded side and air
  bronchograms) in a random lobe of a random lung;
* VIRUS: bilateral perihilar haze with streaky and reticular interstitial markings, no focal density.

A patient fixes anatomy, exposure habits and the lesion; each of their images moves, rotates and exposes it a
little differently and adds fresh noise. ``difficulty`` in [0, 1] lowers lesion contrast and raises noise and
anatomical variation. Each image is finally gamma-corrected to a target mean brightness drawn independently of
its class (like automatic exposure control), so the global mean says nothing about the label.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pneumo_exp.config import PhantomDatasetConfig
from pneumo_exp.data.manifest import DatasetError, Record
from pneumo_exp.labels import CLASSES

PHANTOM = PhantomDatasetConfig()  # the defaults of `dataset=phantom`

PHANTOM_PREFIX = "phantom:"
GENERATOR_VERSION = "v1"
MIN_SIZE = 16
PATIENT_ID_PREFIX = {"NORMAL": "PN", "BACTERIA": "PB", "VIRUS": "PV"}
SHA256_SIZE = 64

_KEY_PARTS = 7
_TEXTURE_GRID = 20
_RETICULAR_GRID = 28
_VESSEL_BINS = 64
_SECTOR_BINS = 24
_LOBES = ("upper", "middle", "lower")


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class PhantomSpec:
    seed: int
    difficulty: float
    label: str
    patient_id: str
    image_index: int


def make_key(seed: int, difficulty: float, label: str, patient_id: str, image_index: int) -> str:
    spec = PhantomSpec(int(seed), float(difficulty), label, patient_id, int(image_index))
    _validate_spec(spec, where="make_key")
    return (f"{PHANTOM_PREFIX}{GENERATOR_VERSION}:seed={spec.seed}:difficulty={spec.difficulty!r}:"
            f"{spec.label}:{spec.patient_id}:{spec.image_index}")


def is_phantom_key(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PHANTOM_PREFIX)


def parse_key(key: str) -> PhantomSpec:
    if not is_phantom_key(key):
        raise ValueError(f"not a phantom key: {key!r} (expected it to start with {PHANTOM_PREFIX!r})")
    parts = key.split(":")
    if len(parts) != _KEY_PARTS:
        raise ValueError(f"malformed phantom key {key!r}: expected "
                         f"'phantom:{GENERATOR_VERSION}:seed=S:difficulty=D:LABEL:PATIENT:INDEX'")
    _, version, seed_part, difficulty_part, label, patient_id, index_part = parts
    if version != GENERATOR_VERSION:
        raise ValueError(f"phantom key {key!r}: unknown generator version {version!r}; "
                         f"this code draws {GENERATOR_VERSION!r}")
    try:
        seed = int(_field_value(seed_part, "seed"))
        difficulty = float(_field_value(difficulty_part, "difficulty"))
        image_index = int(index_part)
    except ValueError as error:
        raise ValueError(f"malformed phantom key {key!r}: {error}") from None
    spec = PhantomSpec(seed, difficulty, label, patient_id, image_index)
    _validate_spec(spec, where=f"phantom key {key!r}")
    return spec


def _field_value(part: str, name: str) -> str:
    prefix = f"{name}="
    if not part.startswith(prefix):
        raise ValueError(f"expected {prefix}... but found {part!r}")
    return part[len(prefix):]


def _validate_spec(spec: PhantomSpec, where: str) -> None:
    if spec.label not in CLASSES:
        raise ValueError(f"{where}: unknown label {spec.label!r}; expected one of {', '.join(CLASSES)}")
    _check_difficulty(spec.difficulty, where)
    if not isinstance(spec.patient_id, str) or not spec.patient_id or ":" in spec.patient_id:
        raise ValueError(f"{where}: patient_id must be non-empty and free of ':' (got {spec.patient_id!r})")
    if spec.image_index < 0:
        raise ValueError(f"{where}: image_index must be >= 0 (got {spec.image_index})")


def _check_difficulty(difficulty: float, where: str) -> None:
    if not (0.0 <= difficulty <= 1.0):  # also rejects NaN
        raise ValueError(f"{where}: difficulty must be in [0, 1] (got {difficulty})")


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a stable hash of the parts (never Python's salted hash()): the same stream in every
    process."""
    text = "\x1f".join(str(part) for part in parts).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text).digest()[:16], "little"))


# ---------------------------------------------------------------------------------- random draws


@dataclass(frozen=True, eq=False)
class Patient:
    """What stays the same across one patient's images (lengths in anatomical units)."""
    body_half_width: float
    body_half_height: float
    scale: float
    rotation_deg: float
    shift: tuple[float, float]
    lung_half_width: float
    lung_half_height: float
    lung_top: float
    heart_half_width: float
    heart_half_height: float
    heart_offset: float
    dome_right: float
    dome_left: float
    rib_spacing: float
    rib_phase: float
    vessel_strength: float
    vessel_noise: np.ndarray       # (2, _VESSEL_BINS) angular profiles, one per hilum
    texture: np.ndarray            # (_TEXTURE_GRID, _TEXTURE_GRID) soft-tissue mottle
    contrast: float
    target_mean: float
    noise_sigma: float
    lesion: Lesion | None


@dataclass(frozen=True)
class Consolidation:
    side: int                      # -1: patient's right (image left), +1: patient's left
    lobe: str
    center: tuple[float, float]
    radii: tuple[float, float]
    harmonics: tuple               # 3 (cos, sin) amplitude pairs: the outline's 2nd, 3rd and 4th harmonics
    fissure_level: float
    bronchogram_angles: tuple
    strength: float


@dataclass(frozen=True, eq=False)
class Interstitial:
    side_strength: tuple[float, float]
    haze_radius: float
    sectors: np.ndarray            # (2, _SECTOR_BINS) angular profiles: broad streaky sectors around each hilum
    reticular: np.ndarray          # (_RETICULAR_GRID, _RETICULAR_GRID) zero-mean field, its zero lines a net
    strength: float


Lesion = Consolidation | Interstitial


@dataclass(frozen=True)
class View:
    """What changes from one image of a patient to the next."""
    rotation_deg: float
    shift: tuple[float, float]
    scale: float
    contrast: float
    mean_offset: float
    lesion_gain: float
    lesion_shift: tuple[float, float]


def _lesion_contrast(difficulty: float) -> float:
    return 1.0 - 0.72 * difficulty


def _anatomy_spread(difficulty: float) -> float:
    return 0.6 + 0.8 * difficulty


def draw_patient(spec: PhantomSpec) -> Patient:
    """Anatomy and lesion of a patient. The same standard draws are scaled by difficulty, so a patient keeps
    its identity when only the difficulty changes."""
    rng = _rng(GENERATOR_VERSION, "patient", spec.seed, spec.label, spec.patient_id)
    spread = _anatomy_spread(spec.difficulty)

    def standard() -> float:
        return min(max(float(rng.standard_normal()), -2.5), 2.5)

    def varied(mean: float, relative: float) -> float:
        return mean * (1.0 + relative * spread * standard())

    def offset(mean: float, absolute: float) -> float:
        return mean + absolute * spread * standard()

    body_half_width = varied(0.86, 0.05)
    body_half_height = varied(1.0, 0.04)
    scale = varied(0.95, 0.04)
    rotation_deg = offset(0.0, 2.5)
    shift = (offset(0.0, 0.035), offset(0.02, 0.035))
    lung_half_width = varied(0.29, 0.06)
    lung_half_height = varied(0.62, 0.04)
    lung_top = offset(-0.72, 0.03)
    heart_half_width = varied(0.33, 0.08)
    heart_half_height = varied(0.25, 0.07)
    heart_offset = offset(0.1, 0.025)
    dome_right = offset(0.38, 0.035)
    dome_left = dome_right + offset(0.05, 0.015)
    rib_spacing = varied(0.115, 0.05)
    rib_phase = float(rng.uniform())
    vessel_strength = varied(0.08, 0.15)
    vessel_noise = rng.standard_normal((2, _VESSEL_BINS)).astype(np.float32)
    texture = rng.standard_normal((_TEXTURE_GRID, _TEXTURE_GRID)).astype(np.float32)
    contrast = varied(1.2, 0.08)
    target_mean = float(rng.uniform(0.36, 0.48))
    noise_sigma = (0.012 + 0.035 * spec.difficulty) * varied(1.0, 0.2)
    consolidation = _draw_consolidation(rng, spec.difficulty, lung_half_width)
    interstitial = _draw_interstitial(rng, spec.difficulty)
    lesion = {"NORMAL": None, "BACTERIA": consolidation, "VIRUS": interstitial}[spec.label]
    return Patient(body_half_width, body_half_height, scale, rotation_deg, shift, lung_half_width,
                   lung_half_height, lung_top, heart_half_width, heart_half_height, heart_offset, dome_right,
                   dome_left, rib_spacing, rib_phase, vessel_strength, vessel_noise, texture, contrast,
                   target_mean, noise_sigma, lesion)


def _draw_consolidation(rng: np.random.Generator, difficulty: float, lung_half_width: float) -> Consolidation:
    side = int(rng.choice((-1, 1)))
    lobe = _LOBES[int(rng.integers(len(_LOBES)))]
    lateral = float(rng.uniform(-0.35, 0.35)) * lung_half_width
    lung_center = 0.36
    if lobe == "upper":
        center_v, radii, fissure = float(rng.uniform(-0.42, -0.24)), (0.23, 0.21), float(rng.uniform(-0.16, -0.06))
    elif lobe == "middle":  # the right middle lobe, or the lingula on the left: both hug the heart border
        center_v, radii, fissure = float(rng.uniform(0.0, 0.12)), (0.19, 0.15), -0.08
        lateral = -abs(lateral) * 0.6 - 0.05
    else:
        center_v, radii, fissure = float(rng.uniform(0.1, 0.22)), (0.24, 0.2), float(rng.uniform(-0.08, 0.02))
    size = float(rng.uniform(0.95, 1.3))
    return Consolidation(
        side=side, lobe=lobe,
        center=(side * (lung_center + lateral), center_v),
        radii=(radii[0] * size, radii[1] * size),
        harmonics=tuple(tuple(pair) for pair in rng.normal(0.0, 0.07, (3, 2)).tolist()),
        fissure_level=fissure,
        bronchogram_angles=tuple(rng.uniform(-0.6, 0.6, 3).tolist()),
        strength=_lesion_contrast(difficulty) * float(rng.uniform(0.50, 0.62)),
    )


def _draw_interstitial(rng: np.random.Generator, difficulty: float) -> Interstitial:
    right = float(rng.uniform(0.8, 1.2))
    return Interstitial(
        side_strength=(right, right * float(rng.uniform(0.8, 1.25))),
        haze_radius=float(rng.uniform(0.28, 0.38)),
        sectors=rng.standard_normal((2, _SECTOR_BINS)).astype(np.float32),
        reticular=rng.standard_normal((_RETICULAR_GRID, _RETICULAR_GRID)).astype(np.float32),
        strength=_lesion_contrast(difficulty) * float(rng.uniform(0.40, 0.50)),
    )


def draw_view(spec: PhantomSpec) -> View:
    rng = _rng(GENERATOR_VERSION, "view", spec.seed, spec.label, spec.patient_id, spec.image_index)
    spread = _anatomy_spread(spec.difficulty)
    return View(
        rotation_deg=float(rng.normal(0.0, 1.0 * spread)),
        shift=(float(rng.normal(0.0, 0.015 * spread)), float(rng.normal(0.0, 0.015 * spread))),
        scale=float(1.0 + rng.normal(0.0, 0.012 * spread)),
        contrast=float(1.0 + rng.normal(0.0, 0.04)),
        mean_offset=float(rng.uniform(-0.015, 0.015)),
        lesion_gain=float(rng.uniform(0.92, 1.08)),
        lesion_shift=(float(rng.normal(0.0, 0.012)), float(rng.normal(0.0, 0.012))),
    )


# -------------------------------------------------------------------------------- field helpers


def _unit_clip(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (np.clip's Python wrapper costs more than the work on small images)."""
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _soft_inside(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """1 where signed_distance > edge/2, 0 where < -edge/2, a linear ramp in between."""
    ramp = signed_distance * (1.0 / edge)
    ramp += 0.5
    return _unit_clip(ramp)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float,
                      power: float = 2.0) -> np.ndarray:
    """Approximate signed distance (positive inside) to a superellipse, in units of its smaller radius."""
    radius = (np.abs((u - cu) / ru) ** power + np.abs((v - cv) / rv) ** power) ** (1.0 / power)
    return (1.0 - radius) * min(ru, rv)


def _angular_noise(profile: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Linearly interpolate a periodic 1-D random profile at angles in [-pi, pi] (from arctan2, give or take a
    little): streaks radiating from a centre."""
    n = profile.shape[0]
    around = np.concatenate((profile, profile, profile[:2]))  # covers positions n/2 - n/4 .. 3n/2 + n/4 unwrapped
    position = np.clip(angle * (n / (2.0 * math.pi)) + n, 0.0, 2.0 * n)
    below = np.floor(position)
    index = below.astype(np.intp)
    fraction = position - below  # float32 - float32: subtracting the integer index would promote to float64
    low = around[index]
    return low + (around[index + 1] - low) * fraction


# ------------------------------------------------------------------------------------ anatomy


@dataclass
class Frame:
    """Anatomical coordinates (u, v) of a rectangle of pixels, the affine map that gives them and a pixel's size
    in those units. ``to_anatomy`` (2 x 3) maps a pixel centre (column + 0.5, row + 0.5, 1) to (u, v)."""
    u: np.ndarray
    v: np.ndarray
    to_anatomy: np.ndarray
    pixel: float

    def crop(self, u_range: tuple[float, float], v_range: tuple[float, float]) -> tuple[Frame, tuple[slice, slice]]:
        """The part of the frame that covers an anatomical rectangle, and its (rows, columns) in this frame:
        local structures are only computed where they can be."""
        corners = np.array([[u, v] for u in u_range for v in v_range]) - self.to_anatomy[:, 2]
        columns, rows = np.linalg.solve(self.to_anatomy[:, :2], corners.T) - 0.5
        height, width = self.u.shape
        window = (slice(max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, height)),
                  slice(max(int(columns.min()) - 1, 0), min(int(columns.max()) + 2, width)))
        shifted = self.to_anatomy.copy()
        shifted[:, 2] += self.to_anatomy[:, :2] @ np.array([window[1].start, window[0].start], dtype=np.float64)
        return Frame(self.u[window], self.v[window], shifted, self.pixel), window


def _frame(size: int, patient: Patient, view: View) -> Frame:
    scale = patient.scale * view.scale
    angle = math.radians(patient.rotation_deg + view.rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    step = 2.0 / (size * scale)
    left = (-1.0 - patient.shift[0] - view.shift[0]) / scale
    top = (-1.0 - patient.shift[1] - view.shift[1]) / scale
    to_anatomy = np.array([[cos * step, sin * step, cos * left + sin * top],
                           [-sin * step, cos * step, -sin * left + cos * top]])
    centres = np.arange(size, dtype=np.float64) + 0.5
    u = to_anatomy[0, 0] * centres[None, :] + to_anatomy[0, 1] * centres[:, None] + to_anatomy[0, 2]
    v = to_anatomy[1, 0] * centres[None, :] + to_anatomy[1, 1] * centres[:, None] + to_anatomy[1, 2]
    return Frame(u.astype(np.float32), v.astype(np.float32), to_anatomy, pixel=step)


def _grid_noise(grid: np.ndarray, frame: Frame, zoom: float = 1.0, offset: tuple[float, float] = (0.0, 0.0),
                extent: float = 1.3) -> np.ndarray:
    """Bilinearly sample a random grid that covers [-extent, extent]^2 of anatomical space (seen through
    ``zoom`` and ``offset``) at every pixel: texture independent of resolution. PIL's affine resampling does
    the work: it is exact, and several times faster than gathering with numpy."""
    n = grid.shape[0]
    to_grid = zoom * (n - 1) / (2.0 * extent)
    coefficients = to_grid * frame.to_anatomy
    coefficients[:, 2] += to_grid * np.asarray(offset) + 0.5 * (n - 1) + 0.5  # PIL puts pixel centres at +0.5
    height, width = frame.u.shape
    if height == 0 or width == 0:
        return np.zeros_like(frame.u)
    sampled = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32)).transform(
        (width, height), Image.Transform.AFFINE, data=tuple(coefficients.ravel()),
        resample=Image.Resampling.BILINEAR)
    return np.asarray(sampled)


def _edge(frame: Frame, width: float) -> float:
    return max(width, 1.5 * frame.pixel)  # never sharper than the pixels can show


def _local(frame: Frame, center: tuple[float, float], reach: tuple[float, float], draw) -> np.ndarray:
    """``draw`` evaluated only in the pixels within ``reach`` of ``center`` (anatomical units, plus a margin for
    soft edges), zero elsewhere: small structures then cost little. ``draw`` must be zero beyond its reach."""
    margin = 0.05 + 2.0 * frame.pixel
    (cu, cv), (ru, rv) = center, reach
    part, window = frame.crop((cu - ru - margin, cu + ru + margin), (cv - rv - margin, cv + rv + margin))
    full = np.zeros_like(frame.u)
    full[window] = draw(part)
    return full


def _body(frame: Frame, patient: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Outline of the trunk and neck, and the trunk's soft-tissue thickness along the beam (1 at the midline)."""
    u, v = frame.u, frame.v
    width, height = patient.body_half_width, patient.body_half_height
    thorax = _soft_inside(_ellipse_distance(u, v, 0.0, 0.12, width, height, power=2.4), _edge(frame, 0.03))
    neck = _soft_inside(0.2 - np.abs(u), _edge(frame, 0.03)) * _soft_inside(-0.6 - v, 0.1)
    outline = np.maximum(thorax, neck)
    thickness = np.sqrt(_unit_clip(1.0 - (u / (width * 1.02)) ** 2))
    return outline, np.maximum(thorax * (0.1 + 0.9 * thickness), 0.6 * neck)


def _domes(frame: Frame, patient: Patient) -> np.ndarray:
    """Height of the diaphragm under each pixel; larger v is lower. Each dome peaks mid-hemithorax."""
    u = frame.u
    right = patient.dome_right + 1.3 * (u + 0.36) ** 2
    left = patient.dome_left + 1.3 * (u - 0.36) ** 2
    return np.where(u < 0, right, left)


def _heart_center(patient: Patient) -> tuple[float, float]:
    return patient.heart_offset, patient.dome_left - 0.45 * patient.heart_half_height


def _heart(frame: Frame, patient: Patient) -> np.ndarray:
    """The cardiac silhouette: an ellipse whose long axis runs down towards the patient's left, resting on
    the diaphragm."""
    tilt = math.radians(30.0)
    center_u, center_v = _heart_center(patient)
    du, dv = frame.u - center_u, frame.v - center_v
    along = du * math.cos(tilt) + dv * math.sin(tilt)
    across = -du * math.sin(tilt) + dv * math.cos(tilt)
    distance = _ellipse_distance(along, across, 0.0, 0.0, patient.heart_half_width, patient.heart_half_height)
    return _soft_inside(distance, _edge(frame, 0.02))


def _mediastinum(frame: Frame, patient: Patient) -> tuple[np.ndarray, np.ndarray]:
    """The soft-tissue column between the lungs and, inside it, the dark air column of the trachea."""
    u, v = frame.u, frame.v
    below_neck = _soft_inside(v + 0.75, 0.1)
    column = _soft_inside(0.12 + 0.08 * _unit_clip(v + 0.3) - np.abs(u - 0.01), _edge(frame, 0.03))
    trachea = _soft_inside(0.035 - np.abs(u - 0.01), _edge(frame, 0.015)) * _soft_inside(-0.12 - v, 0.05)
    return column * below_neck, trachea


def _lungs(frame: Frame, patient: Patient, domes: np.ndarray, heart: np.ndarray,
           mediastinum: np.ndarray) -> np.ndarray:
    """Air fraction per pixel: two lungs with rounded apices, widening downwards, resting on the domes."""
    u, v = frame.u, frame.v
    depth = (v - patient.lung_top) / (2.0 * patient.lung_half_height)
    apex = _unit_clip(depth / 0.3)
    half_width = patient.lung_half_width * np.sqrt(1.0 - (1.0 - apex) ** 2) * (0.85 + 0.25 * _unit_clip(depth.copy()))
    air = np.zeros_like(u)
    for center_u in (-0.38, 0.39):
        distance = np.minimum(half_width - np.abs(u - center_u), v - patient.lung_top)
        air = np.maximum(air, _soft_inside(distance, _edge(frame, 0.025)))
    above_diaphragm = _soft_inside(domes - v, _edge(frame, 0.02))
    return air * above_diaphragm * (1.0 - 0.85 * heart) * (1.0 - mediastinum)


def _ribs(frame: Frame, patient: Patient, domes: np.ndarray) -> np.ndarray:
    """Posterior ribs (descending laterally) and fainter anterior ribs, as bands with brighter cortices."""
    u, v = frame.u, frame.v
    lateral = np.abs(u)
    bent = v - (0.9 * (lateral - 0.1) ** 2 - 0.08 * lateral)
    posterior = _rib_bands(frame, np.sqrt(np.maximum(bent + 1.2, 0.0)) * (1.1 / patient.rib_spacing)
                           + patient.rib_phase, patient.rib_spacing)
    anterior = _rib_bands(frame, (v + 0.35 * lateral) / (patient.rib_spacing * 1.3) + patient.rib_phase * 1.7,
                          patient.rib_spacing * 1.3)
    span = _soft_inside(v + 0.8, 0.08) * _soft_inside(domes + 0.12 - v, 0.1)
    beside_spine = _smoothstep((lateral - 0.05) / 0.08)
    inside_cage = _soft_inside(patient.body_half_width * 0.9 - lateral, 0.06)
    return (posterior + 0.3 * anterior) * span * beside_spine * inside_cage


def _rib_bands(frame: Frame, phase: np.ndarray, spacing: float) -> np.ndarray:
    width = 0.45
    position = phase - np.floor(phase)
    from_center = np.abs(position - width / 2) / (width / 2)
    squared = from_center * from_center
    band = _soft_inside(1.0 - from_center, 0.25) * (0.6 + 0.4 * squared * squared)
    visibility = min(max(spacing / frame.pixel / 2.0 - 0.5, 0.0), 1.0)  # fade bands the pixels can't resolve
    return band if visibility == 1.0 else visibility * band + (1.0 - visibility) * 0.25


def _clavicles(frame: Frame) -> np.ndarray:
    u, v = frame.u, frame.v
    lateral = np.abs(u)
    along = _unit_clip((lateral - 0.08) / 0.5)
    center_v = -0.66 - 0.12 * along + 0.1 * along * (1.0 - along)
    inside = _soft_inside(0.035 - np.abs(v - center_v), 0.02) * _soft_inside(0.58 - lateral, 0.04)
    return inside * _soft_inside(lateral - 0.06, 0.03)


def _spine(frame: Frame) -> np.ndarray:
    u, v = frame.u, frame.v
    column = _soft_inside(0.07 - np.abs(u), 0.03)
    vertebrae = 0.8 + 0.2 * np.cos(v * (2.0 * math.pi / 0.1))
    return column * vertebrae


@dataclass
class Hilum:
    """Polar coordinates of every pixel around one hilum, and the bronchovascular streaks radiating from it."""
    radius: np.ndarray
    angle: np.ndarray
    streaks: np.ndarray


def _hilum_position(side: int, patient: Patient) -> tuple[float, float]:
    return side * 0.17 + 0.02, patient.lung_top + 0.55 * patient.lung_half_height


def _hila(frame: Frame, patient: Patient) -> list[Hilum]:
    hila = []
    for side_index, side in enumerate((-1, 1)):
        hilum_u, hilum_v = _hilum_position(side, patient)
        du, dv = frame.u - hilum_u, frame.v - hilum_v
        radius = np.sqrt(du * du + dv * dv)
        wobble = 0.12 * np.sin(radius * 11.0 + side_index)  # lets the streaks curve a little
        angle = np.arctan2(dv, du)
        profile = np.maximum(_angular_noise(patient.vessel_noise[side_index], angle + wobble), 0.0)
        hila.append(Hilum(radius, angle, profile * np.sqrt(profile)))
    return hila


def _vessels(patient: Patient, hila: list[Hilum]) -> np.ndarray:
    """Vascular markings: streaks radiating from each hilum, fading towards the periphery."""
    total = sum(h.streaks * np.exp(h.radius * (-1.0 / 0.25)) + 1.5 * np.exp(-(h.radius * (1.0 / 0.07)) ** 2)
                for h in hila)
    return patient.vessel_strength * total


# ------------------------------------------------------------------------------------- lesions


def _consolidation(frame: Frame, lesion: Consolidation, view: View, patient: Patient) -> np.ndarray:
    """A dense, homogeneous, sharply outlined region with a lobulated outline, cut straight by a fissure."""
    cu = lesion.center[0] + view.lesion_shift[0]
    cv = lesion.center[1] + view.lesion_shift[1]
    du, dv = (frame.u - cu) / lesion.radii[0], (frame.v - cv) / lesion.radii[1]
    radius = np.sqrt(du * du + dv * dv) + 1e-6
    cos1, sin1 = du / radius, dv / radius
    cos2, sin2 = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1
    cos3, sin3 = cos1 * cos2 - sin1 * sin2, sin1 * cos2 + cos1 * sin2
    cos4, sin4 = cos2 * cos2 - sin2 * sin2, 2.0 * cos2 * sin2
    (a2, b2), (a3, b3), (a4, b4) = lesion.harmonics
    outline = 1.0 + a2 * cos2 + b2 * sin2 + a3 * cos3 + b3 * sin3 + a4 * cos4 + b4 * sin4
    region = _soft_inside((outline - radius) * min(lesion.radii), _edge(frame, 0.035))
    if lesion.lobe == "upper":  # bounded below by the horizontal fissure
        region *= _soft_inside(lesion.fissure_level - frame.v, _edge(frame, 0.012))
    elif lesion.lobe == "lower":  # bounded above by the oblique fissure
        region *= _soft_inside(frame.v - lesion.fissure_level - 0.25 * lesion.side * frame.u, _edge(frame, 0.012))
    homogeneity = 1.0 + 0.12 * _grid_noise(patient.texture, frame, zoom=2.5)
    density = region * homogeneity * (1.0 - 0.55 * _bronchograms(frame, lesion, cu, cv, patient))
    return lesion.strength * view.lesion_gain * density


def _bronchograms(frame: Frame, lesion: Consolidation, cu: float, cv: float, patient: Patient) -> np.ndarray:
    """Thin dark branching tubes of air running through the consolidation away from the hilum."""
    hilum_u, hilum_v = _hilum_position(lesion.side, patient)
    base = math.atan2(cv - hilum_v, cu - hilum_u)
    tubes = np.zeros_like(frame.u)
    for turn in lesion.bronchogram_angles:
        direction = base + 0.5 * float(turn)
        across = -(frame.u - cu) * math.sin(direction) + (frame.v - cv) * math.cos(direction)
        along = (frame.u - cu) * math.cos(direction) + (frame.v - cv) * math.sin(direction)
        width = 0.012 * (1.0 - 0.4 * _unit_clip(along / 0.2))
        tube = _soft_inside(width - np.abs(across), _edge(frame, 0.008))
        tubes = np.maximum(tubes, tube * _soft_inside(along + 0.12, 0.05) * _soft_inside(0.16 - along, 0.05))
    return tubes


def _interstitial(frame: Frame, lesion: Interstitial, view: View, hila: list[Hilum]) -> np.ndarray:
    """Bilateral perihilar haze, thickened bronchovascular streaks and a reticular net, fading outwards."""
    reticular = _grid_noise(lesion.reticular, frame, offset=view.lesion_shift)
    net = np.exp(-(reticular * (1.0 / 0.5)) ** 2)
    total = np.zeros_like(frame.u)
    for side_index, (side_strength, hilum) in enumerate(zip(lesion.side_strength, hila)):
        haze = np.exp(-(hilum.radius * (1.0 / lesion.haze_radius)) ** 2)
        sectors = np.maximum(_angular_noise(lesion.sectors[side_index], hilum.angle) + 0.3, 0.0)
        streaks = (sectors + 0.5 * hilum.streaks) * np.exp(hilum.radius * (-1.0 / 0.4))
        total += side_strength * (0.6 * haze + 0.3 * streaks + 0.35 * net * np.sqrt(haze) * (0.5 + sectors))
    return lesion.strength * view.lesion_gain * total


# ------------------------------------------------------------------------------------- render


def render(key: str, size: int) -> np.ndarray:
    """The image named by ``key`` as a (size, size) uint8 array; the same pixels in every process."""
    spec = parse_key(key)
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"render: size must be an integer >= {MIN_SIZE} (got {size!r}) for {key!r}")
    size = int(size)
    patient, view = draw_patient(spec), draw_view(spec)
    frame = _frame(size, patient, view)
    attenuation = _attenuation(frame, patient, view)
    image = 1.0 - np.exp(-patient.contrast * view.contrast * attenuation)
    noise_rng = _rng(GENERATOR_VERSION, "noise", spec.seed, spec.difficulty, spec.label, spec.patient_id,
                     spec.image_index, size)
    image += patient.noise_sigma * noise_rng.standard_normal((size, size), dtype=np.float32)
    image = _unit_clip(image)
    image = _match_mean(image, patient.target_mean + view.mean_offset)
    return np.round(image * 255.0).astype(np.uint8)


def _attenuation(frame: Frame, patient: Patient, view: View) -> np.ndarray:
    body, thickness = _body(frame, patient)
    domes = _domes(frame, patient)
    heart_reach = max(patient.heart_half_width, patient.heart_half_height)
    heart = _local(frame, _heart_center(patient), (heart_reach, heart_reach), lambda part: _heart(part, patient))
    mediastinum, trachea = _mediastinum(frame, patient)
    chest, window = frame.crop(*_chest_extent(patient))
    lungs, lung_content = np.zeros_like(frame.u), np.zeros_like(frame.u)
    lungs[window] = _lungs(chest, patient, domes[window], heart[window], mediastinum[window])
    lung_content[window] = _lung_content(chest, patient, view)
    mottle = 0.04 * _grid_noise(patient.texture, frame)
    above_diaphragm = _soft_inside(domes - frame.v, 0.05)
    soft_tissue = (thickness * (0.9 + mottle) * (1.0 - 0.8 * lungs)
                   + (0.12 * heart + 0.1 * mediastinum) * above_diaphragm * body - 0.15 * trachea)
    clavicles = _local(frame, (0.0, -0.72), (0.62, 0.14), _clavicles)
    spine = _local(frame, (0.0, 0.0), (0.1, 3.0), _spine)
    bones = 0.14 * _ribs(frame, patient, domes) * (0.3 + 0.7 * lungs) + 0.3 * clavicles + 0.18 * spine
    bubble = _local(frame, _bubble_center(patient), (0.11, 0.06), lambda part: _gastric_bubble(part, patient))
    return soft_tissue + bones * body + lung_content * lungs - 0.35 * bubble


def _chest_extent(patient: Patient) -> tuple[tuple[float, float], tuple[float, float]]:
    """An anatomical rectangle (u range, v range) that holds both lungs, whatever the patient's proportions."""
    half_width = 0.4 + 1.1 * patient.lung_half_width + 0.05
    return (-half_width, half_width), (patient.lung_top - 0.05, max(patient.dome_left, patient.dome_right) + 0.35)


def _lung_content(chest: Frame, patient: Patient, view: View) -> np.ndarray:
    """Density added inside the lungs: vessels and the lesion."""
    hila = _hila(chest, patient)
    content = _vessels(patient, hila)
    if isinstance(patient.lesion, Consolidation):
        content += _consolidation(chest, patient.lesion, view, patient)
    elif isinstance(patient.lesion, Interstitial):
        content += _interstitial(chest, patient.lesion, view, hila)
    return content


def _bubble_center(patient: Patient) -> tuple[float, float]:
    return 0.38, patient.dome_left + 0.13


def _gastric_bubble(frame: Frame, patient: Patient) -> np.ndarray:
    distance = _ellipse_distance(frame.u, frame.v, *_bubble_center(patient), 0.11, 0.06)
    return _soft_inside(distance, _edge(frame, 0.02))


def _match_mean(image: np.ndarray, target: float) -> np.ndarray:
    """Gamma-correct so the mean brightness is ``target``: exposure control that hides class-linked brightness.
    The gamma is found by bisection on a 256-level histogram, which is cheap and exact enough."""
    levels = 256
    histogram = np.bincount((image.ravel() * (levels - 1) + 0.5).astype(np.intp), minlength=levels)
    values = np.arange(levels, dtype=np.float64) / (levels - 1)
    weights = histogram / histogram.sum()
    low, high = -3.0, 3.0  # bounds on log(gamma); a larger gamma darkens
    for _ in range(24):
        middle = 0.5 * (low + high)
        if float(weights @ values ** math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return image ** np.float32(math.exp(0.5 * (low + high)))


# ------------------------------------------------------------------------------------ dataset


def phantom_records(patients_per_class: int = PHANTOM.patients_per_class,
                    test_patients_per_class: int = PHANTOM.test_patients_per_class,
                    images_per_patient: int = PHANTOM.images_per_patient, difficulty: float = PHANTOM.difficulty,
                    seed: int = PHANTOM.seed) -> list[Record]:
    """The phantom dataset's manifest: per class, ``patients_per_class`` train patients then
    ``test_patients_per_class`` test patients, each with ``images_per_patient`` images."""
    for name, value, least in (("patients_per_class", patients_per_class, 1),
                               ("test_patients_per_class", test_patients_per_class, 0),
                               ("images_per_patient", images_per_patient, 1)):
        if value < least:
            raise DatasetError(f"{name} must be >= {least} (got {value})", f"dataset.{name}",
                               f"give a whole number >= {least}")
    if not 0.0 <= difficulty <= 1.0:
        raise DatasetError(f"difficulty must be in [0, 1] (got {difficulty})", "dataset.difficulty",
                           "use 0 for obvious lesions up to 1 for subtle ones")
    records = []
    for label in CLASSES:
        for number in range(1, patients_per_class + test_patients_per_class + 1):
            patient_id = f"{PATIENT_ID_PREFIX[label]}{number:04d}"
            split = "train" if number <= patients_per_class else "test"
            for image_index in range(images_per_patient):
                key = make_key(seed, difficulty, label, patient_id, image_index)
                records.append(Record(path=key, label=label, patient_id=patient_id, split=split, source="real",
                                      sha256=pixels_sha256(key)))
    return records


@functools.cache  # a pure function of the key; sweeps run in one process prepare the same images for every job
def pixels_sha256(key: str) -> str:
    return hashlib.sha256(render(key, SHA256_SIZE).tobytes()).hexdigest()
