"""Training data: (defocused input, in-focus target, defocus) patches, from the simulator on the fly or from stored
z-stacks.

Fields of view are the unit of every split: a field is one specimen seed and stage position (simulated) or one
stored field; all its planes go to the same side, so no specimen seen in training is ever used to validate or test.
Simulated specimens use disjoint seed ranges (`TRAIN_SEED_BASE`, `VALIDATION_SEED_BASE`, `TEST_SEED_BASE`).

Patches are normalised with the input's own percentiles (normalization.py) and the target with the same
offset/scale, exactly as Refocuser does with a whole frame.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from acquire_refocus.config import (
    AppConfig,
    OpticsConfig,
    RandomizationConfig,
    SimulatedTrainingConfig,
    SimulatorConfig,
    StoredTrainingConfig,
)
from acquire_refocus.errors import ConfigError
from acquire_refocus.logs import kv
from acquire_refocus.model.normalization import NormalizationParams, frame_scale, normalize

if TYPE_CHECKING:
    from acquire_refocus.datasets.zstack import ZStackDataset
    from acquire_refocus.sim.microscope import SimulatedMicroscope

log = logging.getLogger(__name__)

TRAIN_SEED_BASE = 1000
VALIDATION_SEED_BASE = 2000
TEST_SEED_BASE = 3000
FIELDS_PER_SPECIMEN = 16
# Domain-randomised specimens are small (RandomizationConfig.field_size_um) and many: a 2 x 2 grid of windows each.
RANDOMIZED_FIELDS_PER_SPECIMEN = 4
# Share of training planes drawn near focus (|d| <= this), where the defocus MAE target is tightest.
NEAR_FOCUS_FRACTION = 0.25
NEAR_FOCUS_UM = 5.0
# Domain-randomised training: share of planes drawn within +-IN_FOCUS_UM, where a good output equals the input.
IN_FOCUS_FRACTION = 0.1
IN_FOCUS_UM = 1.0
EMPTY_PATCH_CONTRAST = 0.2
EMPTY_PATCH_RETRIES = 4
_CHANNEL_SUFFIX = re.compile(r"_w\d$")


@dataclass(frozen=True)
class Field:
    """A field of view: a specimen (seed) and a stage position in um."""

    seed: int
    x_um: float
    y_um: float


@dataclass
class Window:
    """One field of view through focus: raw planes, their defocus, and the in-focus ground truth."""

    planes: np.ndarray  # [Z, H, W] raw camera counts
    defocus_um: np.ndarray  # float64 [Z]
    truth: np.ndarray  # float32 [H, W], same units as planes
    name: str
    family: str = ""  # the specimen family of a domain-randomised window ("" where one family is all there is)
    peak_photons: float = math.nan  # the drawn camera's peak signal (domain-randomised windows)


@dataclass
class PatchBatch:
    inputs: np.ndarray  # float32 [N, 1, P, P], normalised
    targets: np.ndarray  # float32 [N, 1, P, P], normalised with the input's offset/scale
    defocus_um: np.ndarray  # float32 [N]


class WindowSource(Protocol):
    """Anything that hands out fields of view through focus for training."""

    def next_window(self, rng: np.random.Generator) -> Window: ...


def simulated_fields(count: int, seed_base: int, field_size_um: tuple[float, float]) -> list[Field]:
    """`count` fields: FIELDS_PER_SPECIMEN stage positions on a grid over each specimen, specimen seeds from
    `seed_base`, ordered by specimen so a pass over them builds each specimen once."""
    per_axis = math.ceil(math.sqrt(FIELDS_PER_SPECIMEN))
    fields = []
    for index in range(count):
        specimen, position = divmod(index, FIELDS_PER_SPECIMEN)
        row, col = divmod(position, per_axis)
        x_um = (col + 0.5) / per_axis * field_size_um[0]
        y_um = (row + 0.5) / per_axis * field_size_um[1]
        fields.append(Field(seed_base + specimen, x_um, y_um))
    return fields


def sample_defocus(rng: np.random.Generator, count: int, defocus_range_um: tuple[float, float]) -> np.ndarray:
    """Uniform over the training range, with NEAR_FOCUS_FRACTION of the values drawn within +-NEAR_FOCUS_UM."""
    low, high = defocus_range_um
    values = rng.uniform(low, high, count)
    near = rng.random(count) < NEAR_FOCUS_FRACTION
    near_low, near_high = max(low, -NEAR_FOCUS_UM), min(high, NEAR_FOCUS_UM)
    if near_low < near_high:
        values[near] = rng.uniform(near_low, near_high, int(near.sum()))
    return values


class MicroscopeCache:
    """Simulated microscopes by specimen seed; a specimen takes seconds and ~200 MB, so only a few are kept.
    `build` makes the microscope of a seed (default: the config's optics and simulator with that seed, no drift)."""

    def __init__(
        self,
        optics: OpticsConfig,
        simulator: SimulatorConfig,
        keep: int = 2,
        build: Callable[[int], SimulatedMicroscope] | None = None,
    ) -> None:
        self.optics = optics
        self.simulator = simulator
        self.keep = keep
        self.build = build if build is not None else self._build
        self._scopes: OrderedDict[int, SimulatedMicroscope] = OrderedDict()

    def _build(self, seed: int) -> SimulatedMicroscope:
        from acquire_refocus.sim.microscope import SimulatedMicroscope

        simulator = self.simulator.model_copy(update={"seed": seed})
        drift = simulator.drift.model_copy(update={"model": "none", "tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0})
        return SimulatedMicroscope(self.optics, simulator.model_copy(update={"drift": drift}))

    def get(self, seed: int) -> SimulatedMicroscope:
        scope = self._scopes.pop(seed, None)
        if scope is None:
            scope = self.build(seed)
            log.debug(kv("specimen_built", seed=seed))
        self._scopes[seed] = scope
        while len(self._scopes) > self.keep:
            self._scopes.popitem(last=False)
        return scope


class SimulatedWindows:
    """Windows rendered on demand, cycling through a fixed list of fields with fresh defocus and noise each time."""

    def __init__(
        self,
        optics: OpticsConfig,
        simulator: SimulatorConfig,
        fields: Sequence[Field],
        defocus_range_um: tuple[float, float],
        window_px: int,
        planes_per_window: int = 8,
    ) -> None:
        if not fields:
            raise ConfigError("training needs at least one field of view")
        self.scopes = MicroscopeCache(optics, simulator)
        self.fields = list(fields)
        self.defocus_range_um = defocus_range_um
        self.window_px = window_px
        self.planes_per_window = planes_per_window
        self._next = 0

    def render(self, field: Field, defocus_um: Sequence[float] | np.ndarray, rng: np.random.Generator) -> Window:
        scope = self.scopes.get(field.seed)
        planes, truth = scope.render_stack(
            list(defocus_um), (field.x_um, field.y_um), rng=rng, shape_px=(self.window_px, self.window_px)
        )
        return Window(
            planes, np.asarray(defocus_um, dtype=np.float64), truth, f"seed{field.seed}_x{field.x_um:g}_y{field.y_um:g}"
        )

    def next_window(self, rng: np.random.Generator) -> Window:
        field = self.fields[self._next % len(self.fields)]
        self._next += 1
        return self.render(field, sample_defocus(rng, self.planes_per_window, self.defocus_range_um), rng)


class RandomizedWindows:
    """Windows from domain-randomised specimens and cameras (sim/randomization.py): each specimen seed draws a
    family, density, thickness and optics variant; each window draws a camera. `fields_per_specimen` stage
    positions on a grid over each specimen; windows cycle through specimens in order so each is built once a pass."""

    def __init__(
        self,
        optics: OpticsConfig,
        simulator: SimulatorConfig,
        envelope: RandomizationConfig,
        seeds: Sequence[int],
        defocus_range_um: tuple[float, float],
        window_px: int,
        fields_per_specimen: int = 4,
        planes_per_window: int = 8,
        variants_seed: int = 0,
    ) -> None:
        from acquire_refocus.sim import randomization

        if not seeds:
            raise ConfigError("training needs at least one specimen")
        self.envelope = envelope
        self.simulator = simulator
        self.optics_variants = randomization.optics_variants(envelope, optics, variants_seed)
        self.seeds = list(seeds)
        self.draws = {seed: randomization.draw_specimen(envelope, seed) for seed in self.seeds}
        self.defocus_range_um = defocus_range_um
        self.window_px = window_px
        self.planes_per_window = planes_per_window
        per_axis = max(1, math.ceil(math.sqrt(fields_per_specimen)))
        side_um = envelope.field_size_um
        self.fields = [
            Field(seed, (col + 0.5) / per_axis * side_um, (row + 0.5) / per_axis * side_um)
            for seed in self.seeds
            for row in range(per_axis)
            for col in range(per_axis)
        ]
        self.scopes = MicroscopeCache(optics, simulator, build=self._build)
        self._next = 0

    def _build(self, seed: int) -> SimulatedMicroscope:
        """The microscope of a drawn specimen: its optics variant, family, density and thickness."""
        from acquire_refocus.sim import randomization
        from acquire_refocus.sim.microscope import SimulatedMicroscope

        draw = self.draws[seed]
        simulator = randomization.specimen_simulator(self.envelope, self.simulator, draw, seed)
        return SimulatedMicroscope(self.optics_variants[draw.optics_index], simulator)

    def render(self, field: Field, defocus_um: Sequence[float] | np.ndarray, rng: np.random.Generator) -> Window:
        from acquire_refocus.sim import randomization

        scope = self.scopes.get(field.seed)
        photons, truth_photons = scope.photon_stack(
            list(defocus_um), (field.x_um, field.y_um), shape_px=(self.window_px, self.window_px)
        )
        camera = randomization.draw_camera(self.envelope, rng)
        planes, truth = randomization.expose_window(photons, truth_photons, camera, self.simulator.camera, rng)
        draw = self.draws[field.seed]
        name = f"seed{field.seed}_{draw.family}_x{field.x_um:g}_y{field.y_um:g}_peak{camera.peak_photons:.0f}"
        return Window(planes, np.asarray(defocus_um, dtype=np.float64), truth, name, draw.family, camera.peak_photons)

    def next_window(self, rng: np.random.Generator) -> Window:
        field = self.fields[self._next % len(self.fields)]
        self._next += 1
        defocus = sample_defocus(rng, self.planes_per_window, self.defocus_range_um)
        # in-focus frames must come out unharmed: a share within +-IN_FOCUS_UM, where the answer is the input
        in_focus = rng.random(len(defocus)) < IN_FOCUS_FRACTION
        low, high = max(self.defocus_range_um[0], -IN_FOCUS_UM), min(self.defocus_range_um[1], IN_FOCUS_UM)
        if low < high:
            defocus[in_focus] = rng.uniform(low, high, int(in_focus.sum()))
        return self.render(field, defocus, rng)


class StoredWindows:
    """Fields of a stored z-stack dataset (simulated or BBBC006-style), a subset chosen by field name."""

    def __init__(self, dataset: ZStackDataset, names: Sequence[str], defocus_range_um: tuple[float, float]) -> None:
        self.dataset = dataset
        by_name = {name: index for index, name in enumerate(dataset.field_names)}
        self.indices = [by_name[name] for name in names]
        if not self.indices:
            raise ConfigError("the stored dataset has no fields left for this split")
        self.defocus_range_um = defocus_range_um
        self._next = 0

    def next_window(self, rng: np.random.Generator) -> Window:
        field = self.dataset[self.indices[self._next % len(self.indices)]]
        self._next += 1
        low, high = self.defocus_range_um
        keep = (field.defocus_um >= low) & (field.defocus_um <= high)
        if not keep.any():
            raise ConfigError(
                f"stored field {field.name} has no plane within training.defocus_range_um {self.defocus_range_um}"
            )
        return Window(field.planes[keep], field.defocus_um[keep], field.ground_truth, field.name)


def _site(name: str) -> str:
    """The place a stored field shows: its name without a channel suffix (BBBC006 `a01_s1_w2` -> `a01_s1`)."""
    return _CHANNEL_SUFFIX.sub("", name)


def split_field_names(names: Sequence[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of stored fields by site: a field's planes, and its other channels, never straddle
    the split (the same nuclei in Hoechst and in another stain would otherwise be on both sides)."""

    def rank(site: str) -> str:
        return hashlib.sha256(f"{seed}:{site}".encode()).hexdigest()

    sites = sorted({_site(name) for name in names}, key=rank)
    count = max(1, round(len(sites) * validation_fraction)) if len(sites) > 1 else 0
    held_out = set(sites[:count])
    return sorted(n for n in names if _site(n) not in held_out), sorted(n for n in names if _site(n) in held_out)


def _augment(patch: np.ndarray, truth: np.ndarray, k: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    patch, truth = np.rot90(patch, k), np.rot90(truth, k)
    if flip:
        patch, truth = patch[:, ::-1], truth[:, ::-1]
    return patch, truth


def make_pair(raw: np.ndarray, truth: np.ndarray, normalization: NormalizationParams) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (input, target), the target with the input's offset/scale."""
    intensity = frame_scale(raw, normalization)
    return normalize(raw, intensity), normalize(truth, intensity)


class PatchPool:
    """A pool of windows, refreshed one at a time, from which random augmented patches are cut.

    Rendering a window costs about as much as a few training steps, so each window serves many patches
    (random crop, plane, 90-degree rotation and flip); refreshing keeps the data from repeating.
    """

    def __init__(
        self,
        source: WindowSource,
        pool_size: int,
        patch_px: int,
        normalization: NormalizationParams,
        rng: np.random.Generator,
    ) -> None:
        self.source = source
        self.patch_px = patch_px
        self.normalization = normalization
        self.rng = rng
        self.windows = [source.next_window(rng) for _ in range(pool_size)]
        self._replace = 0

    def refresh(self, count: int = 1) -> None:
        for _ in range(count):
            self.windows[self._replace % len(self.windows)] = self.source.next_window(self.rng)
            self._replace += 1

    def batch(self, size: int) -> PatchBatch:
        inputs, targets, defocus = [], [], []
        p = self.patch_px
        for _ in range(size):
            window = self.windows[int(self.rng.integers(len(self.windows)))]
            z = int(self.rng.integers(len(window.defocus_um)))
            height, width = window.truth.shape
            if height < p or width < p:
                raise ConfigError(f"field {window.name} ({height}x{width} px) is smaller than the {p} px patch")
            # Patches without any specimen teach little; redraw a crop whose in-focus contrast is below
            # EMPTY_PATCH_CONTRAST of its window's a few times (some empty patches stay: the network must see them).
            window_contrast = float(np.ptp(window.truth))
            for _ in range(EMPTY_PATCH_RETRIES):
                top = int(self.rng.integers(height - p + 1))
                left = int(self.rng.integers(width - p + 1))
                truth = window.truth[top : top + p, left : left + p]
                if np.ptp(truth) >= EMPTY_PATCH_CONTRAST * window_contrast:
                    break
            raw = window.planes[z, top : top + p, left : left + p]
            raw, truth = _augment(raw, truth, int(self.rng.integers(4)), bool(self.rng.integers(2)))
            x, y = make_pair(raw, truth, self.normalization)
            inputs.append(x)
            targets.append(y)
            defocus.append(window.defocus_um[z])
        return PatchBatch(
            np.stack(inputs)[:, None],
            np.stack(targets)[:, None],
            np.asarray(defocus, dtype=np.float32),
        )


def fixed_batch(windows: Sequence[Window], patch_px: int, normalization: NormalizationParams) -> PatchBatch:
    """Every plane of every window, centre-cropped to patch_px: a deterministic validation set."""
    inputs, targets, defocus = [], [], []
    for window in windows:
        height, width = window.truth.shape
        # the centre crop or one of the four corner crops: whichever shows the most specimen
        candidates = [
            ((height - patch_px) // 2, (width - patch_px) // 2),
            (0, 0),
            (0, width - patch_px),
            (height - patch_px, 0),
            (height - patch_px, width - patch_px),
        ]
        top, left = max(
            candidates, key=lambda c: float(np.ptp(window.truth[c[0] : c[0] + patch_px, c[1] : c[1] + patch_px]))
        )
        truth = window.truth[top : top + patch_px, left : left + patch_px]
        for z, d in enumerate(window.defocus_um):
            x, y = make_pair(window.planes[z, top : top + patch_px, left : left + patch_px], truth, normalization)
            inputs.append(x)
            targets.append(y)
            defocus.append(d)
    return PatchBatch(np.stack(inputs)[:, None], np.stack(targets)[:, None], np.asarray(defocus, dtype=np.float32))


_TrainingT = TypeVar("_TrainingT", SimulatedTrainingConfig, StoredTrainingConfig)


def _training(config: AppConfig, kind: type[_TrainingT]) -> _TrainingT:
    """The training section, of the data source a function reads."""
    if not isinstance(config.training, kind):
        raise ConfigError(f"training.data is {config.training.data!r}, not {kind.model_fields['data'].default!r}")
    return config.training


def simulated_sources(config: AppConfig, window_px: int) -> tuple[SimulatedWindows, list[Window]]:
    """Training window source and fixed validation windows (evenly spaced defocus) from disjoint specimens."""
    training = _training(config, SimulatedTrainingConfig)
    _check_defocus_range(config)
    field_size = config.simulator.specimen.field_size_um
    train = SimulatedWindows(
        config.optics,
        config.simulator,
        simulated_fields(training.train_fields, TRAIN_SEED_BASE, field_size),
        training.defocus_range_um,
        window_px,
    )
    validation_source = SimulatedWindows(
        config.optics,
        config.simulator,
        simulated_fields(training.validation_fields, VALIDATION_SEED_BASE, field_size),
        training.defocus_range_um,
        window_px,
    )
    rng = np.random.default_rng(np.random.SeedSequence([training.seed, 0x5A1]))
    return train, _validation_windows(validation_source, validation_source.fields, training.defocus_range_um, rng)


class _RendersFields(Protocol):
    def render(self, field: Field, defocus_um: Sequence[float] | np.ndarray, rng: np.random.Generator) -> Window: ...


def _validation_windows(
    source: _RendersFields, fields: Sequence[Field], defocus_range_um: tuple[float, float], rng: np.random.Generator
) -> list[Window]:
    """One window a field at 8 evenly spaced defocus values, offset per field so that together the fields cover
    the range densely."""
    low, high = defocus_range_um
    planes = np.linspace(low, high, 8)
    windows = []
    for index, field in enumerate(fields):
        shift = (index / max(1, len(fields)) - 0.5) * (planes[1] - planes[0])
        windows.append(source.render(field, np.clip(planes + shift, low, high), rng))
    return windows


def randomized_sources(config: AppConfig, window_px: int) -> tuple[RandomizedWindows, list[Window]]:
    """Training source and fixed validation windows (evenly spaced defocus, one drawn camera each) from disjoint
    specimen seeds of the domain-randomised envelope `training.randomization`."""
    training = _training(config, SimulatedTrainingConfig)
    envelope = training.randomization
    if envelope is None:
        raise ConfigError("training.randomization is not set")
    _check_defocus_range(config)
    per_specimen = RANDOMIZED_FIELDS_PER_SPECIMEN
    train_seeds = [TRAIN_SEED_BASE + i for i in range(math.ceil(training.train_fields / per_specimen))]
    validation_seeds = [VALIDATION_SEED_BASE + i for i in range(math.ceil(training.validation_fields / per_specimen))]

    def windows(seeds: list[int]) -> RandomizedWindows:
        return RandomizedWindows(
            config.optics,
            config.simulator,
            envelope,
            seeds,
            training.defocus_range_um,
            window_px,
            fields_per_specimen=per_specimen,
            variants_seed=training.seed,
        )

    train, validation_source = windows(train_seeds), windows(validation_seeds)
    rng = np.random.default_rng(np.random.SeedSequence([training.seed, 0x5A2]))
    fields = validation_source.fields[: training.validation_fields]
    return train, _validation_windows(validation_source, fields, training.defocus_range_um, rng)


def _check_defocus_range(config: AppConfig) -> None:
    training = config.training
    limit_um = config.simulator.max_defocus_um
    if max(map(abs, training.defocus_range_um)) > limit_um:
        raise ConfigError(
            f"training.defocus_range_um {list(training.defocus_range_um)} reaches beyond the simulator's PSF bank "
            f"(simulator.max_defocus_um: {limit_um:g}); narrow the range or raise max_defocus_um"
        )


def stored_sources(config: AppConfig) -> tuple[StoredWindows, list[Window]]:
    """Training source and validation windows from training.dataset_dir, split by field name."""
    from acquire_refocus.datasets.zstack import read_zstack_folders

    training = _training(config, StoredTrainingConfig)
    dataset = read_zstack_folders(
        training.dataset_dir,
        training.in_focus_index,
        training.z_step_um,
        training.pixel_size_um,
        z_order=training.z_order,
        file_pattern=training.file_pattern,
    )
    model_pixel_um = config.optics.pixel_size_um
    if dataset.pixel_size_um is not None and not math.isclose(dataset.pixel_size_um, model_pixel_um, rel_tol=1e-3):
        raise ConfigError(
            f"{training.dataset_dir}: its pixels are {dataset.pixel_size_um:g} um at the sample, but the optics "
            f"section gives {model_pixel_um:g} um (camera_pixel_size_um / magnification): set the optics section "
            "(magnification, camera_pixel_size_um, numerical_aperture, emission_wavelength_nm) to the microscope "
            "that took the dataset. The trained model records them, and frames of another pixel size are resampled "
            "to its own"
        )
    names = list(dataset.field_names)
    sites = {_site(name) for name in names}
    if len(sites) < 2:
        raise ConfigError(f"{training.dataset_dir}: needs at least 2 fields of view to split training/validation")
    fraction = min(0.5, training.validation_fields / len(sites))
    train_names, validation_names = split_field_names(names, fraction, training.seed)
    log.info(
        kv(
            "dataset_split",
            dataset=training.dataset_dir,
            train_fields=len(train_names),
            validation_fields=len(validation_names),
        )
    )
    validation_source = StoredWindows(dataset, validation_names, training.defocus_range_um)
    rng = np.random.default_rng(training.seed)
    validation = [validation_source.next_window(rng) for _ in validation_names]
    return StoredWindows(dataset, train_names, training.defocus_range_um), validation


def calibration_windows(config: AppConfig, fields: int, window_px: int, magnitudes_um: Sequence[float]) -> list[Window]:
    """Windows of the training envelope's validation specimens (simulated or domain-randomised; never the test
    seeds), one a field, at the given |d| with a sign drawn per plane: frames on which a model's post-processing is
    tuned after training (model/physics_path.py)."""
    training = _training(config, SimulatedTrainingConfig)
    count = max(1, fields)
    source: _RendersFields
    if training.randomization is not None:
        per_specimen = RANDOMIZED_FIELDS_PER_SPECIMEN
        seeds = [VALIDATION_SEED_BASE + i for i in range(math.ceil(count / per_specimen))]
        randomized = RandomizedWindows(
            config.optics,
            config.simulator,
            training.randomization,
            seeds,
            training.defocus_range_um,
            window_px,
            fields_per_specimen=per_specimen,
            variants_seed=training.seed,
        )
        source, chosen = randomized, randomized.fields[:count]
    else:
        field_size = config.simulator.specimen.field_size_um
        chosen = simulated_fields(count, VALIDATION_SEED_BASE, field_size)
        source = SimulatedWindows(config.optics, config.simulator, chosen, training.defocus_range_um, window_px)
    rng = np.random.default_rng(np.random.SeedSequence([training.seed, 0xCA1]))
    magnitudes = np.asarray(magnitudes_um, dtype=np.float64)
    return [source.render(field, magnitudes * rng.choice((-1.0, 1.0), magnitudes.size), rng) for field in chosen]
