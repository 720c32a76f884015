"""One validated configuration tree for optics, simulator, model, training, engine and the daemon.

Every section is a frozen pydantic model that round-trips to YAML: the daemon shares one config across threads, so
a change is a validated copy (`replace`). Unknown keys are errors, so a typo in a config on the scope PC is caught at
start-up instead of being silently ignored. The model section is keyed on `architecture` and the training section
on `data`, so a setting that does not apply (or one that is missing) is an error when the file loads. Units are in
the names.

`version` (top level) is the schema version. Version 1 (files without the key, and the configs embedded in weights
files and run records written before it) had one flat model and training section whose keys for other
architectures or data sources were accepted and ignored: such keys are dropped when a version 1 file is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from acquire_refocus.cache_dirs import default_engine_cache_dir
from acquire_refocus.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_VERSION = 2  # what dump_config writes; see the module docstring

_SectionT = TypeVar("_SectionT", bound=BaseModel)


class _Section(BaseModel):
    # allow_inf_nan=False: no setting here means anything as NaN or infinity (a dead band of .inf never moves the
    # stage, and run.json would hold non-standard JSON). frozen: one config is shared across threads
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def replace(section: _SectionT, **changes: Any) -> _SectionT:
    """A validated copy of `section` with `changes` (as useq-schema's `replace()`): sections are frozen. The copy
    remembers which keys were given (the section's own and `changes`), so settings that follow the optics when
    left out still do. Raises pydantic's ValidationError for a value the section refuses."""
    given = {name: getattr(section, name) for name in section.model_fields_set}
    return type(section).model_validate({**given, **changes})


class ChannelOpticsConfig(_Section):
    """What differs between the channels (Micro-Manager channel presets) of one microscope: the emission band."""

    emission_wavelength_nm: float = Field(..., ge=300.0, le=1100.0)


class OpticsConfig(_Section):
    """Widefield fluorescence optics. Defaults: BBBC006-like 20x/0.45 air objective, Hoechst emission.

    `collar_thickness_um` is the coverslip thickness the objective is corrected for. A mismatch with the actual
    `coverslip_thickness_um` adds spherical aberration, which makes the blur above and below focus differ (a 100 um
    mismatch: 34-52 % L1 between the PSFs at +d and -d for |d| = 2-30 um, against 2-3 % when matched).
    """

    numerical_aperture: float = Field(0.45, gt=0.0, le=1.7)
    magnification: float = Field(20.0, gt=0.0)
    immersion_index: float = Field(1.0, ge=1.0, le=2.0, description="refractive index of the immersion medium")
    coverslip_index: float = Field(1.515, ge=1.0, le=2.0)
    coverslip_thickness_um: float = Field(
        170.0, ge=0.0, le=2000.0, description="actual thickness of the coverslip or plate bottom"
    )
    collar_thickness_um: float = Field(
        170.0,
        ge=0.0,
        le=2000.0,
        description="coverslip thickness the objective is corrected for (its correction collar setting)",
    )
    sample_index: float = Field(1.33, ge=1.0, le=2.0, description="refractive index of the mounting medium")
    emission_wavelength_nm: float = Field(461.0, ge=300.0, le=1100.0)
    camera_pixel_size_um: float = Field(6.5, gt=0.0, le=50.0)
    channels: dict[str, ChannelOpticsConfig] = Field(
        default_factory=dict,
        description="per channel preset name, its emission wavelength (the others use emission_wavelength_nm)",
    )

    def for_channel(self, channel: str | None) -> OpticsConfig:
        """These optics with the channel's emission wavelength (unchanged for a channel not listed)."""
        entry = self.channels.get(channel) if channel is not None else None
        if entry is None:
            return self
        return self.model_copy(update={"emission_wavelength_nm": entry.emission_wavelength_nm, "channels": {}})

    @model_validator(mode="after")
    def _aperture_below_immersion(self) -> OpticsConfig:
        if self.numerical_aperture >= self.immersion_index:
            raise ValueError(
                f"numerical_aperture ({self.numerical_aperture}) must be smaller than immersion_index "
                f"({self.immersion_index}); an objective cannot collect light at NA >= n"
            )
        return self

    @property
    def pixel_size_um(self) -> float:
        """Pixel size at the sample."""
        return self.camera_pixel_size_um / self.magnification

    @property
    def depth_of_field_um(self) -> float:
        """Total depth of field (Berek/Inoue: wave term plus detector term)."""
        wavelength_um = self.emission_wavelength_nm / 1000.0
        na, n = self.numerical_aperture, self.immersion_index
        return wavelength_um * n / na**2 + n * self.pixel_size_um / na


class CameraConfig(_Section):
    """A scientific CMOS camera model: the simulator's noise, and the frame size of a simulated run."""

    width_px: int = Field(512, ge=64, le=8192)
    height_px: int = Field(512, ge=64, le=8192)
    bit_depth: int = Field(16, ge=8, le=16)
    gain_adu_per_electron: float = Field(2.0, gt=0.0, le=100.0)
    offset_adu: float = Field(100.0, ge=0.0)
    read_noise_electrons: float = Field(1.6, ge=0.0, le=100.0)
    quantum_efficiency: float = Field(0.8, gt=0.0, le=1.0)
    exposure_ms: float = Field(20.0, gt=0.0, le=60_000.0)

    @property
    def max_adu(self) -> int:
        return (1 << self.bit_depth) - 1


SpecimenFamily = Literal["nuclei", "cytoplasm", "membranes", "filaments", "puncta", "beads", "mixture"]


class SpecimenConfig(_Section):
    """A procedural specimen larger than one camera frame: by default Hoechst-stained nuclei in a monolayer;
    other families (sim/families.py) give training and evaluation specimens of other shapes and textures."""

    family: SpecimenFamily = Field(
        "nuclei",
        description="nuclei, cytoplasm, membranes, filaments, puncta, beads (one plane), or mixture (nuclei plus "
        "another)",
    )
    field_size_um: tuple[float, float] = (600.0, 600.0)
    layer_thickness_um: float = Field(6.0, ge=0.0, le=100.0, description="spread of nucleus centres in z")
    nuclei_per_mm2: float = Field(1500.0, ge=0.0, le=20_000.0)
    nucleus_diameter_um: tuple[float, float] = (7.0, 14.0)
    nucleus_thickness_um: tuple[float, float] = (4.0, 7.0)
    cluster_fraction: float = Field(0.4, ge=0.0, le=1.0)
    bright_fraction: float = Field(0.08, ge=0.0, le=1.0, description="mitotic / dividing, brighter nuclei")
    photons_per_um3: float = Field(
        60.0,
        gt=0.0,
        description="photons per exposure an average nucleus gives, as detected with the default 20x / 0.45 air"
        " optics; other optics scale it by their collection solid angle (sim/specimen.py)",
    )
    background_photons_per_px: float = Field(5.0, ge=0.0)
    z_step_um: float = Field(1.0, gt=0.0, le=5.0, description="axial sampling of the specimen volume")


class DriftConfig(_Section):
    """Focus disturbances: how the in-focus stage Z wanders over time, and a sample tilt."""

    model: Literal["none", "linear", "thermal", "random_walk", "steps"] = "none"
    rate_um_per_min: float = Field(1.0, description="linear drift speed")
    amplitude_um: float = Field(8.0, description="final excursion of the thermal (exponential) drift")
    time_constant_s: float = Field(300.0, gt=0.0, description="thermal settling time")
    random_walk_um_per_sqrt_s: float = Field(0.1, ge=0.0)
    step_um: float = Field(4.0, description="size of each sudden step")
    step_interval_s: float = Field(60.0, gt=0.0)
    tilt_x_um_per_mm: float = Field(0.0, description="defocus gradient across the field along x")
    tilt_y_um_per_mm: float = Field(0.0)
    seed: int = Field(0, ge=0)


class SimChannelConfig(_Section):
    """One stain of the simulated specimen, exposed as a Micro-Manager channel preset of the same name. Its emission
    wavelength is `optics.channels.<name>` (else `optics.emission_wavelength_nm`)."""

    stain: Literal["nuclei", "cytoplasm"] = Field(
        "nuclei", description="nuclei: the nuclear stain; cytoplasm: the same cells' cytoplasm with bright puncta"
    )
    brightness: float = Field(1.0, gt=0.0, le=100.0, description="photons relative to specimen.photons_per_um3")


class SimulatorConfig(_Section):
    """The simulated microscope: specimen, camera, drift, stages."""

    camera: CameraConfig = CameraConfig()
    specimen: SpecimenConfig = SpecimenConfig()
    drift: DriftConfig = DriftConfig()
    sample_drift: DriftConfig = Field(
        DriftConfig(),
        description="drift of the sample relative to the coverslip, which a focus lock cannot see; "
        "`drift` is the stand's (coverslip relative to objective), which a focus lock removes",
    )
    focus_lock: bool = Field(
        False,
        description="add a hardware focus lock like Nikon's PFS: devices SimPFS (State On/Off, Status) "
        "and SimPFSOffset (its offset, a stage device, um)",
    )
    channels: dict[str, SimChannelConfig] = Field(
        default_factory=dict,
        description="stains as channel presets of config group `channel_group`; empty: one "
        "channel (the nuclei), no channel group",
    )
    channel_group: str = "Channel"
    focus_z_um: float = Field(100.0, description="stage Z at which the specimen mid-plane is in focus at t=0")
    z_limits_um: tuple[float, float] = (0.0, 200.0)
    max_defocus_um: float = Field(40.0, gt=0.0, le=200.0, description="half-range of the precomputed PSF bank")
    psf_z_step_um: float = Field(0.25, gt=0.0, le=5.0)
    psf_cache_dir: Path | None = Field(
        None,
        description="where the PSF bank is cached; default: the user's cache directory (on Linux "
        "~/.cache/acquire-refocus)",
    )
    psf_model: Literal["vectorial", "scalar"] = Field(
        "vectorial", description="psfmodels' vectorial (Aguet) or scalar Gibson-Lanni model for the PSF bank"
    )
    seed: int = Field(0, ge=0)
    time_per_frame_s: float | None = Field(
        None, description="simulated clock advance per frame; None follows the wall clock"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SimulatorConfig:
        lo, hi = self.z_limits_um
        if lo >= hi:
            raise ValueError(f"z_limits_um must be (low, high) with low < high, got {self.z_limits_um}")
        if not lo <= self.focus_z_um <= hi:
            raise ValueError(f"focus_z_um ({self.focus_z_um}) lies outside z_limits_um {self.z_limits_um}")
        return self


FocusInput = Literal["bottleneck", "image"]  # what the autofocus head reads (model/network.py)
MagnitudeLoss = Literal["huber", "log_l1"]  # the loss on the unsigned estimate |d| (model/losses.py)


class _ModelSection(_Section):
    """The refocusing network. `weights: null` means the default model shipped in the package."""

    architecture: str  # each architecture's own Literal; first, so that a dump names it first
    base_channels: int = Field(16, ge=4, le=128)
    focus_input: FocusInput = Field(
        "bottleneck",
        description="what the autofocus head reads: the U-Net's bottleneck features, or the frame itself through "
        "a full-resolution trunk of its own (measured at 20x: |d| closer at 3-10 um, worse beyond 14 um on dim "
        "frames; a 512 px call 1.28x as long; tools/reports/robust-model/README.md)",
    )
    weights: Path | None = None
    weights_per_channel: dict[str, Path] = Field(
        default_factory=dict,
        description="channel preset name -> weights file: that channel's frames are refocused "
        "by this model (loaded at start on the same engine), its wavelength checked against this model's optics; "
        "channels not listed use `weights`",
    )


class UNetModelConfig(_ModelSection):
    """A U-Net with a focus head at its bottleneck (model/network.py RefocusUNet)."""

    architecture: Literal["unet"] = "unet"
    depth: int = Field(4, ge=2, le=6, description="number of down-sampling stages")


class MultiScaleModelConfig(_ModelSection):
    """The head-to-tail multi-scale U-Net (model/network.py MultiScaleUNet)."""

    architecture: Literal["multiscale"] = "multiscale"
    depth: int = Field(4, ge=2, le=6, description="number of down-sampling stages")
    scales: int = Field(3, ge=2, le=4, description="number of scales")
    fusion: Literal["sum", "concat"] = "sum"


class ResNet34ModelConfig(_ModelSection):
    """A U-Net on a ResNet-34 encoder (model/network.py ResNet34UNet)."""

    architecture: Literal["resnet34"] = "resnet34"
    pretrained_encoder: Path | None = Field(None, description="ResNet-34 ImageNet weights, local file only")


def _tag(default: str, key: str) -> Discriminator:
    """The discriminator of a keyed section: `key` of a mapping (`default` where left out) or of a section."""

    def tag(value: Any) -> Any:
        return value.get(key, default) if isinstance(value, dict) else getattr(value, key, None)

    return Discriminator(
        tag,
        custom_error_type="invalid_section_kind",
        custom_error_message=f"unknown {key}",
        custom_error_context={"key": key},
    )


ModelConfig = Annotated[
    Annotated[UNetModelConfig, Tag("unet")]
    | Annotated[MultiScaleModelConfig, Tag("multiscale")]
    | Annotated[ResNet34ModelConfig, Tag("resnet34")],
    _tag("unet", "architecture"),
]
"""The model section: one of the architectures, chosen by its `architecture` key (default unet)."""

_MODEL_KINDS: dict[str, type[_ModelSection]] = {
    "unet": UNetModelConfig,
    "multiscale": MultiScaleModelConfig,
    "resnet34": ResNet34ModelConfig,
}
_MODEL_CONFIG = TypeAdapter[ModelConfig](ModelConfig)


class LossConfig(_Section):
    """Weights of each loss term; a weight of 0 switches a term off."""

    l1_weight: float = Field(1.0, ge=0.0)
    ms_ssim_weight: float = Field(0.5, ge=0.0)
    l2_weight: float = Field(
        0.0,
        ge=0.0,
        description="mean squared error: PSNR is an MSE measure, and where the in-focus image is "
        "uncertain (far from focus) L1 learns its median, L2 its mean",
    )
    psnr_gain_weight: float = Field(
        0.0,
        ge=0.0,
        description="minus the PSNR gain (dB) of each patch's output over its input, averaged over the batch: "
        "every patch weighs by its error relative to the raw frame's, so bright frames (small errors in "
        "normalised units) count as much as dim ones, where MSE and L1 let dim frames' noise dominate",
    )
    multiscale_weight: float = Field(0.5, ge=0.0, description="loss on the coarser outputs of multiscale nets")
    perceptual_weight: float = Field(0.0, ge=0.0)
    gram_weight: float = Field(0.0, ge=0.0)
    feature_network_weights: Path | None = Field(None, description="VGG-16 weights file for the feature loss")
    defocus_weight: float = Field(0.05, ge=0.0)
    defocus_huber_delta_um: float = Field(1.0, gt=0.0)
    defocus_magnitude_loss: MagnitudeLoss = Field(
        "huber",
        description="loss on the unsigned estimate |d|: huber (in um), or log_l1 (L1 of log(1 + |d| / 1 um): "
        "relative error far from focus, absolute near it, so 1 um in focus weighs as much as 30 um at 30 um)",
    )


def _ordered_pair(name: str, pair: tuple[float, float]) -> None:
    low, high = pair
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{name} must be (low, high) with finite low <= high, got {list(pair)}")


# The simulator's 7-14 um nuclei times these: 3-35 um, the range between cell types.
NUCLEUS_SIZE_FACTOR_LIMITS = (0.4, 2.5)


class RandomizationConfig(_Section):
    """Domain randomisation of simulated training data: the envelope of cameras, specimens and optics a model is
    trained on, so that it refocuses what real scopes produce rather than one simulator setting. The trained
    model records this envelope in its metadata. Each window of training data draws one camera, each specimen
    seed one family, density, layer thickness and optics variant."""

    peak_photons: tuple[float, float] = Field(
        (20.0, 5000.0), description="peak signal of the in-focus frame, photons per pixel (log-uniform)"
    )
    background_fraction: tuple[float, float] = Field((0.0, 0.2), description="background, as a fraction of the peak")
    read_noise_electrons: tuple[float, float] = (0.5, 3.0)
    gain_adu_per_electron: tuple[float, float] = (0.5, 4.0)
    offset_adu: tuple[float, float] = (0.0, 500.0)
    hot_pixel_fraction: tuple[float, float] = Field((0.0, 2e-4), description="pixels with a large dark signal")
    fixed_pattern_adu: tuple[float, float] = Field((0.0, 1.5), description="std of per-column offsets")
    families: tuple[SpecimenFamily, ...] = Field(
        ("nuclei", "cytoplasm", "filaments", "puncta", "mixture"),
        description="specimen families drawn for training (the evaluation holds out those not listed)",
    )
    density_factor: tuple[float, float] = Field(
        (0.3, 3.0), description="sparse to confluent: scales the family's density (log-uniform)"
    )
    nucleus_size_factor: tuple[float, float] = Field(
        (1.0, 1.0),
        description="scales the diameter and thickness of the nuclei (families nuclei and mixture; log-uniform) and "
        "their number per area by its inverse square, so the density factor alone sets how confluent (at most "
        "20,000 nuclei per mm2): nuclei are 3-35 um across between cell types",
    )
    layer_thickness_um: tuple[float, ...] = Field(
        (2.0, 6.0, 14.0), description="thin to thick specimens; few values, since each needs its own PSF bank"
    )
    field_size_um: float = Field(200.0, ge=60.0, le=2000.0, description="side of each simulated specimen")
    optics_variants: int = Field(
        4, ge=0, le=32, description="optics drawn around the config's own (each has its own PSF bank)"
    )
    numerical_aperture_jitter: float = Field(0.04, ge=0.0, le=0.3)
    emission_wavelength_jitter_nm: float = Field(30.0, ge=0.0, le=200.0)
    collar_mismatch_um: tuple[float, float] = Field(
        (0.0, 80.0), description="coverslip thickness minus the correction collar's setting (spherical aberration)"
    )
    pixel_size_jitter: float = Field(0.08, ge=0.0, le=0.5, description="relative spread of the pixel size")

    @model_validator(mode="after")
    def _check_ranges(self) -> RandomizationConfig:
        for name in (
            "peak_photons",
            "background_fraction",
            "read_noise_electrons",
            "gain_adu_per_electron",
            "offset_adu",
            "hot_pixel_fraction",
            "fixed_pattern_adu",
            "density_factor",
            "nucleus_size_factor",
            "collar_mismatch_um",
        ):
            _ordered_pair(name, getattr(self, name))
        if min(self.peak_photons[0], self.gain_adu_per_electron[0], self.density_factor[0]) <= 0:
            raise ValueError("peak_photons, gain_adu_per_electron and density_factor must be positive")
        low, high = NUCLEUS_SIZE_FACTOR_LIMITS
        if not (low <= self.nucleus_size_factor[0] and self.nucleus_size_factor[1] <= high):
            raise ValueError(
                f"nucleus_size_factor must lie between {low} and {high}, got {list(self.nucleus_size_factor)}"
            )
        if not self.families:
            raise ValueError("families must name at least one specimen family")
        if not self.layer_thickness_um or any(not (0 <= t <= 100) for t in self.layer_thickness_um):
            raise ValueError("layer_thickness_um must list values from 0 to 100 um")
        return self


class _TrainingSection(_Section):
    """How to train: data source, optimisation, validation and checkpoints."""

    data: str  # each data source's own Literal; first, so that a dump names it first
    defocus_range_um: tuple[float, float] = (-35.0, 35.0)
    patch_size_px: int = Field(128, ge=64, le=1024)
    batch_size: int = Field(8, ge=1, le=512)
    steps: int = Field(3000, ge=1)
    max_wall_time_min: float | None = Field(
        None,
        gt=0.0,
        description="stop after this long; the learning-rate schedule follows time or steps, whichever "
        "is further along, so a time-limited run still anneals fully",
    )
    learning_rate: float = Field(2e-3, gt=0.0, le=1.0)
    validation_every: int = Field(250, ge=1)
    validation_fields: int = Field(16, ge=1)
    checkpoint_dir: Path = Path("runs/train")
    initial_weights: Path | Literal["shipped"] | None = Field(
        "shipped",
        description="start from these weights; 'shipped': the model shipped in the package when the model "
        "section is its architecture (else a fresh start, logged); null: a fresh start. Parameters of another shape "
        "start fresh",
    )
    train_only: Literal["all", "focus_head", "decoder"] = Field(
        "all",
        description="focus_head: keep the refocusing network as it is and train the autofocus head alone; "
        "decoder: keep the encoder and the autofocus head as they are and train the image decoder alone",
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None uses all cores")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    fusion_margin_extra_um: float = Field(
        0.0,
        ge=0.0,
        le=20.0,
        description="added to the fusion margin measured on the simulated validation specimens when the focus "
        "head is calibrated, and written into the weights with it: the head may overrate |d| more on real "
        "specimens (+1 um turned 40x / 0.95 air's -4.4 dB on a real image in focus into +4.1 dB)",
    )

    @model_validator(mode="after")
    def _check_defocus_range(self) -> _TrainingSection:
        low, high = self.defocus_range_um
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"defocus_range_um must be (low, high) with finite low < high, got {self.defocus_range_um}"
            )
        return self


class SimulatedTrainingConfig(_TrainingSection):
    """Training on frames the simulated microscope renders on the fly."""

    data: Literal["simulated"] = "simulated"
    train_fields: int = Field(64, ge=1, description="distinct specimen fields of view for training")
    randomization: RandomizationConfig | None = Field(
        None,
        description="domain randomisation (camera, specimen family, optics); none renders the simulator "
        "section's own specimen and camera",
    )


class StoredTrainingConfig(_TrainingSection):
    """Training on a stored dataset: one written by 'acquire-refocus simulate', or real BBBC006-style folders."""

    data: Literal["stored"] = "stored"
    dataset_dir: Path = Field(..., description="stored dataset (simulated or BBBC006-style folders)")
    in_focus_index: int | None = Field(None, ge=0, description="real data: z index of the focal plane")
    z_step_um: float | None = Field(None, gt=0.0, description="real data: stage step between planes")
    pixel_size_um: float | None = Field(None, gt=0.0, description="real data: pixel size at sample")
    file_pattern: str | None = Field(
        None,
        description="real data: glob on file names choosing one channel, e.g. '*_w1*' for BBBC006's "
        "Hoechst images (without it every channel is a field of its own)",
    )
    z_order: Literal["increasing", "decreasing"] = Field(
        "increasing",
        description="real data: 'increasing' when higher plane folder numbers were taken "
        "deeper into the sample (higher stage Z)",
    )


TrainingConfig = Annotated[
    Annotated[SimulatedTrainingConfig, Tag("simulated")] | Annotated[StoredTrainingConfig, Tag("stored")],
    _tag("simulated", "data"),
]
"""The training section: simulated or stored data, chosen by its `data` key (default simulated)."""

_TRAINING_KINDS: dict[str, type[_TrainingSection]] = {
    "simulated": SimulatedTrainingConfig,
    "stored": StoredTrainingConfig,
}
# the keyed sections: AppConfig key -> (discriminator key, its default, the kinds)
_KEYED_SECTIONS: dict[str, tuple[str, str, Mapping[str, type[_Section]]]] = {
    "model": ("architecture", "unet", _MODEL_KINDS),
    "training": ("data", "simulated", _TRAINING_KINDS),
}


class EngineConfig(_Section):
    """Which inference backend runs the network, and the frame sizes it is built for."""

    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = "auto"
    precision: Literal["fp16", "fp32"] = "fp16"
    cache_dir: Path = Field(
        default_factory=lambda: default_engine_cache_dir(PROJECT_ROOT),
        description="ONNX exports and TensorRT engines; default: trt_engines/ in a source checkout, else the "
        "user's cache directory (acquire_refocus.cache_dirs)",
    )
    min_size_px: int = Field(64, ge=16)
    opt_size_px: int = Field(2048, ge=16)
    max_size_px: int = Field(2048, ge=16)
    max_batch: int = Field(4, ge=1, le=64)
    tile_overlap_px: int = Field(64, ge=0)
    num_threads: int | None = Field(None, ge=1, description="CPU threads for onnxruntime / torch")
    physics_fusion: bool = Field(
        True,
        description="bound the network's image by what defocus can explain and lean on the raw frame where "
        "it already holds the answer (model/fusion.py); false returns the network's image as it is",
    )
    physics_path: bool = Field(
        True,
        description="mix in Wiener deconvolution at the estimated |d| where the weights' calibration says it "
        "restores better, for frames inside the model's envelope (model/physics_path.py; needs physics_fusion); "
        "false runs the network's path alone",
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> EngineConfig:
        if not self.min_size_px <= self.opt_size_px <= self.max_size_px:
            raise ValueError("need min_size_px <= opt_size_px <= max_size_px")
        if self.tile_overlap_px * 2 >= self.max_size_px:
            raise ValueError("tile_overlap_px must be less than half of max_size_px")
        return self


class PipelineConfig(_Section):
    """Between the acquisition thread and the engine."""

    queue_size: int = Field(8, ge=1, le=10_000)
    overflow: Literal["latest", "all"] = Field(
        "all", description="latest: always correct the newest frame; all: queue up to queue_size, then skip"
    )
    max_backlog_frames: int = Field(
        16,
        ge=1,
        le=10_000,
        description=(
            "results waiting for the sinks (publisher, focus log, refocused store) that keep their pixels. When "
            "the sinks fall this far behind (a slow disk), the engine waits and frames skipped meanwhile reach "
            "the sinks without pixels (no raw message, an empty refocused plane; counted as pixels_released), "
            "so memory stays bounded. The raw data is saved by the acquisition backend either way"
        ),
    )
    channels: list[str] | None = Field(
        None,
        description="channel presets the network refocuses; null: those whose emission wavelength "
        "(optics.channels) lies within the model's envelope. Others are published and logged raw, status skipped",
    )
    refocus_any_wavelength: bool = Field(
        False,
        description="refocus the channels in `channels` even where their wavelength is outside the model's envelope",
    )
    allow_harmful_model: bool = Field(
        False,
        description="use the refocused frames of a model whose recorded evaluation ('acquire-refocus "
        "evaluate --record') says it harms at some distance; otherwise every frame is kept raw (status skipped)",
    )


class PublishingConfig(_Section):
    """ZeroMQ sockets. Loopback by default: open them to the network only on purpose."""

    enabled: bool = True
    pub_address: str = "tcp://127.0.0.1:5556"
    control_address: str = "tcp://127.0.0.1:5557"
    high_water_mark: int = Field(64, ge=1, description="messages kept per subscriber before dropping")
    publish_raw: bool = True

    keys_dir: Path | None = Field(
        None,
        description="CURVE keys made with 'acquire-refocus keys DIR': both sockets accept only clients "
        "holding a client key of DIR/clients. Required when an address binds beyond loopback",
    )

    @model_validator(mode="after")
    def _check_addresses(self) -> PublishingConfig:
        from acquire_refocus.addresses import address_problem, is_loopback

        for name in ("pub_address", "control_address"):
            address = getattr(self, name)
            problem = address_problem(address)
            if problem:
                raise ValueError(f"{name} {address!r}: {problem}; expected one like tcp://127.0.0.1:5556")
            if self.keys_dir is None and not is_loopback(address):
                raise ValueError(
                    f"{name} {address!r} binds beyond loopback, where anyone who reaches the port could "
                    "drive the daemon or read every frame: create keys with 'acquire-refocus keys DIR' "
                    "and set publishing.keys_dir (README, Security)"
                )
        if self.enabled and self.pub_address == self.control_address:
            raise ValueError(f"pub_address and control_address are both {self.pub_address}; give each its own port")
        return self


class StorageConfig(_Section):
    """Where corrected frames and the focus log are saved, beside the raw data."""

    output_dir: Path | None = None
    data_root: Path | None = Field(
        None,
        description="run requests may save only inside this folder (checked after '..' and symlinks); "
        "default: the --output folder (or output_dir)",
    )
    save_raw: bool = True
    save_refocused: bool = True
    min_free_mb: float = Field(
        256.0,
        ge=0.0,
        description="free disk space kept: a run that would leave less is refused before it starts, "
        "and one that gets there (another program filled the disk) stops cleanly as failed",
    )


class LogFileConfig(_Section):
    """The daemon's (`serve`) log file, as well as stderr: rotated by size, so a run of days keeps a bounded
    history on disk."""

    enabled: bool = True
    folder: Path | None = Field(
        None,
        description="where acquire-refocus.log is written; default: the --output folder (storage.output_dir), "
        "and no file when neither is set",
    )
    max_file_mb: float = Field(10.0, gt=0.0, le=10_000.0, description="size at which the file is rotated")
    keep_files: int = Field(
        5, ge=0, le=1000, description="rotated files kept (acquire-refocus.log.1 ... .N, the oldest deleted)"
    )


# a stage step finer than any focus drive: what rounding a limit for the docs (2.9988 um -> "2 um") may cost
_OFFSET_TOLERANCE_UM = 0.005


class SoftwareAutofocusConfig(_Section):
    """useq `autofocus_plan` run by acquire-refocus itself (pymmcore-plus backend): a short through-focus sweep."""

    device_name: str = Field(
        "acquire-refocus", description="the autofocus_device_name of an MDASequence's autofocus_plan that runs it"
    )
    range_um: float = Field(15.0, gt=0.0, le=200.0, description="search up to this far from the planned Z")
    step_um: float = Field(1.0, gt=0.0, le=20.0, description="plane spacing of the fine sweep (and a plain sweep)")
    fine_planes: int = Field(5, ge=3, le=41, description="planes of the fine sweep around the focus found")


# The sharpness band's scale (focus.sharpness_band_um): from below the finest resolution of any objective to far
# beyond what a frame's central crop holds; calibrate-focus recommends nothing outside it.
MIN_SHARPNESS_BAND_UM = 0.05
MAX_SHARPNESS_BAND_UM = 20.0


class FocusConfig(_Section):
    """Closed-loop focus: from autofocus estimates to Z-stage moves."""

    mode: Literal["off", "observe", "correct"] = "observe"
    channel: str | list[str] | None = Field(
        None,
        description="channel preset(s), in order of preference, whose frames drive the loop; null: the "
        "sequence's first channel. Frames of other channels never enter the loop; its offset applies to them all",
    )
    actuator: Literal["z_stage", "autofocus_offset"] = Field(
        "z_stage",
        description="z_stage: move the focus drive; autofocus_offset: change a hardware focus lock's "
        "offset (the Z drive is never moved while the lock is engaged)",
    )
    lock_offset_device: str | None = Field(
        None,
        description="autofocus_offset: the lock's offset stage device (e.g. PFSOffset); null: the core's "
        "autofocus device (setAutoFocusOffset)",
    )
    lock_status: tuple[str, str, str] | None = Field(
        None,
        description="autofocus_offset: (device, property, value while locked); null: the core's "
        "isContinuousFocusLocked()",
    )
    lock_um_per_unit: float = Field(
        1.0,
        gt=0.0,
        le=1000.0,
        description="autofocus_offset: micrometres of focus per unit of the lock's offset "
        "(measure it: change the offset by 10 units and see how far focus moves)",
    )
    max_step_action: Literal["split", "refuse"] = Field(
        "split", description="a move larger than max_step_um: split over time points, or refused (logged)"
    )
    autofocus: SoftwareAutofocusConfig = SoftwareAutofocusConfig()
    window_frames: int = Field(
        5,
        ge=1,
        le=1000,
        description="recent estimates combined (median); the frames of the sharpness fit too (at least 2)",
    )
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    dead_band_um: float = Field(0.3, ge=0.0)
    sign_source: Literal["network", "probe"] = Field(
        "network",
        description=(
            "network: trust the signed estimate. probe: use only the unsigned |defocus| and learn the side of "
            "focus from how it changes between stage positions (for optics whose blur looks alike above and "
            "below focus); set dead_band_um at or above the |defocus| the model reports in focus"
        ),
    )
    fine_source: Literal["none", "sharpness"] = Field(
        "none",
        description=(
            "sharpness: near focus (the network's |defocus| at most sharpness_range_um), put focus where an "
            "image-sharpness measure peaks, fitted to frames of the position taken at different Z; in correct "
            "mode the stage alternates +-sharpness_dither_um around the focus it holds, so such frames exist"
        ),
    )
    sharpness_dither_um: float | None = Field(
        None,
        ge=0.0,
        le=5.0,
        description="fine_source sharpness: Z dither between time points; null: a tenth of the optics' depth of field",
    )
    sharpness_width_um: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description=(
            "defocus at which the sharpness falls to exp(-1/2) of its peak; null: 4/3 of the depth of field "
            "(4 um for 20x / 0.45 NA, measured 3.8-4.6 on the simulated nuclei). Too small only slows the loop; "
            "more than 1.4 times the true width makes it overshoot"
        ),
    )
    sharpness_band_um: float | None = Field(
        None,
        ge=MIN_SHARPNESS_BAND_UM,
        le=MAX_SHARPNESS_BAND_UM,
        description=(
            "scale of the band of spatial frequencies the sharpness is measured in (a difference of Gaussians of "
            "0.8 and 2.1 times it); null: the optics' resolution, 0.61 wavelength / NA. A specimen without detail "
            "that fine (at 60x / 1.4 the simulated nuclei: only camera noise there) needs a coarser band: "
            "calibrate-focus measures which band, width and range suit your specimen"
        ),
    )
    sharpness_lead_time_points: float = Field(
        1.5,
        ge=0.0,
        le=10.0,
        description="drift feed-forward: the sharpness fit's lag, in time points (0: none)",
    )
    sharpness_range_um: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="largest distance to focus the sharpness fit is trusted for; null: 4/3 of the depth of field",
    )
    hold: Literal["sharpest", "start"] = Field(
        "sharpest",
        description=(
            "fine_source sharpness: the plane the loop holds. sharpest: the sharpest plane (plus target_offset_um). "
            "start: with z-stacks of 3 or more planes, each position's stack stays centred where it was when the "
            "first stack was taken (the plane you focused on), kept at the distance from the sharpest plane that "
            "stack measured; for specimens thicker than the depth of field, whose sharpest plane depends on the "
            "field (60x: -1.8 to +1.9 um from the simulated layer's mid-plane)"
        ),
    )
    target_offset_um: float = Field(
        0.0,
        ge=-50.0,
        le=50.0,
        description=(
            "hold the stage this far from the focus found, + deeper into the sample (the sign of defocus_um): from "
            "the sharpest plane where the sharpness fit leads (at most half of sharpness_range_um), from the "
            "network's focus where it leads; an offset within dead_band_um of where the stage is may not be applied"
        ),
    )
    max_step_um: float = Field(5.0, gt=0.0)
    gain: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the estimated error corrected per move")
    z_limits_um: tuple[float, float] = Field((0.0, 200.0), description="soft limits never crossed")
    estimate_wait_s: float = Field(
        5.0,
        ge=0.0,
        le=600.0,
        description="correct mode: how long a time point may wait for the previous one's estimates (0: never)",
    )

    @model_validator(mode="after")
    def _check_limits(self) -> FocusConfig:
        if self.z_limits_um[0] >= self.z_limits_um[1]:
            raise ValueError(f"z_limits_um must be (low, high) with low < high, got {self.z_limits_um}")
        return self

    def sharpness_settings_um(self, optics: OpticsConfig) -> tuple[float, float, float]:
        """(dither, width, range) of the sharpness fit in um: as set, or scaled with the optics' depth of field
        where left null (a tenth, 4/3 and 4/3 of it)."""
        dof_um = optics.depth_of_field_um
        return (
            dof_um / 10 if self.sharpness_dither_um is None else self.sharpness_dither_um,
            dof_um * 4 / 3 if self.sharpness_width_um is None else self.sharpness_width_um,
            dof_um * 4 / 3 if self.sharpness_range_um is None else self.sharpness_range_um,
        )


class AcquisitionConfig(_Section):
    """Which acquisition backend runs, and the useq-schema MDASequence it runs."""

    backend: Literal["simulator", "pymmcore-plus", "pycromanager"] = "simulator"
    mm_config_file: Path | None = Field(None, description="Micro-Manager hardware config (pymmcore-plus)")
    mm_app_path: Path | None = Field(None, description="Micro-Manager installation (adapters)")
    pycromanager_port: int = Field(4827, ge=1, le=65535)
    focus_device: str | None = Field(None, description="Z stage to drive; None uses the core's focus device")
    pixel_size_um: float | None = Field(None, gt=0.0, description="override the core's pixel size")
    sequence: dict[str, Any] | Path | None = Field(None, description="useq MDASequence, inline or a file")


class AppConfig(_Section):
    """The whole configuration of acquire-refocus."""

    version: int = Field(CONFIG_VERSION, description="schema version of this file (1 where left out)")
    optics: OpticsConfig = OpticsConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    model: ModelConfig = UNetModelConfig()
    loss: LossConfig = LossConfig()
    training: TrainingConfig = SimulatedTrainingConfig()
    engine: EngineConfig = EngineConfig()
    pipeline: PipelineConfig = PipelineConfig()
    publishing: PublishingConfig = PublishingConfig()
    storage: StorageConfig = StorageConfig()
    focus: FocusConfig = FocusConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    log_file: LogFileConfig = LogFileConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _read_older_versions(cls, data: Any) -> Any:
        """A mapping of an older schema version is brought to this one; the loaded config is of this version."""
        if not isinstance(data, dict) or not isinstance(data.get("version", 1), int):
            return data
        version = data.get("version", 1)
        if version > CONFIG_VERSION:
            return data  # `version` says why
        sections = {name: _upgraded(name, data[name], version) for name in _KEYED_SECTIONS if name in data}
        return {**data, **sections, "version": CONFIG_VERSION}

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= CONFIG_VERSION:
            raise ValueError(
                f"this acquire-refocus reads configuration versions 1 to {CONFIG_VERSION}; a file of version "
                f"{version} was written by a newer one: update acquire-refocus, or rewrite the file for version "
                f"{CONFIG_VERSION}"
            )
        return version

    @model_validator(mode="after")
    def _check_focus_offset(self) -> AppConfig:
        focus = self.focus
        if focus.hold == "start" and focus.fine_source != "sharpness":
            raise ValueError(
                "focus.hold: start keeps a distance from the sharpest plane, which only fine_source: sharpness "
                "measures; set fine_source: sharpness, or hold: sharpest"
            )
        if focus.hold == "start" and focus.target_offset_um != 0:
            raise ValueError(
                "focus.hold: start holds the plane each position started at, so focus.target_offset_um must be 0; "
                "for a fixed distance from the sharpest plane use hold: sharpest"
            )
        if focus.fine_source == "sharpness":
            range_um = focus.sharpness_settings_um(self.optics)[2]
            if abs(focus.target_offset_um) > range_um / 2 + _OFFSET_TOLERANCE_UM:
                raise ValueError(
                    f"focus.target_offset_um ({focus.target_offset_um} um) must lie within +-{range_um / 2:.2f} um "
                    f"with fine_source sharpness: half of sharpness_range_um ({range_um:.2f} um), the distance from "
                    "the frames over which the sharpness fit is trusted"
                )
        return self

    @model_validator(mode="after")
    def _scale_defocus_to_depth_of_field(self) -> AppConfig:
        """Defocus settings the file leaves out follow the optics. Their defaults suit the shipped model's 20x / 0.45
        NA objective (depth of field 3 um); for other optics the ranges scale by the depth of field and the PSF bank's
        plane spacing is at most a fifth of it, so a 100x oil objective (0.47 um) trains over +-5.5 um, not +-35 um,
        and its PSF bank stays under a GB."""
        depth_of_field_um = self.optics.depth_of_field_um
        scale = depth_of_field_um / OpticsConfig().depth_of_field_um
        if scale == 1.0:
            return self
        training, simulator = self.training, self.simulator
        if "defocus_range_um" not in training.model_fields_set:
            low, high = training.defocus_range_um
            training = replace(training, defocus_range_um=(round(low * scale, 1), round(high * scale, 1)))
        scaled: dict[str, float] = {}
        if "max_defocus_um" not in simulator.model_fields_set:
            scaled["max_defocus_um"] = min(200.0, round(simulator.max_defocus_um * scale, 1))
        if "psf_z_step_um" not in simulator.model_fields_set:
            scaled["psf_z_step_um"] = min(simulator.psf_z_step_um, round(depth_of_field_um / 5, 2))
        # still validating: nothing else holds this config yet, and a validator returns `self` (pydantic)
        object.__setattr__(self, "training", training)
        object.__setattr__(self, "simulator", replace(simulator, **scaled))
        return self


def _upgraded(name: str, section: Any, version: int) -> Any:
    """A keyed section (model, training) of a version 1 mapping without the keys of the other kinds, which version
    1 accepted and ignored (a key no kind knows stays, and is refused as unknown)."""
    key, default, kinds = _KEYED_SECTIONS[name]
    if version != 1 or not isinstance(section, dict) or section.get(key, default) not in kinds:
        return section
    own = kinds[section.get(key, default)].model_fields
    others = {field for kind in kinds.values() for field in kind.model_fields} - set(own)
    return {field: value for field, value in section.items() if field not in others}


def parse_model_section(data: Any, version: int = CONFIG_VERSION) -> ModelConfig:
    """Validate a model section on its own (weights files embed it), of the given schema version. Raises pydantic's
    ValidationError."""
    return _MODEL_CONFIG.validate_python(_upgraded("model", data, version))


def _describe_error(error: ErrorDetails) -> str:
    loc = list(error["loc"])
    kind_note = ""
    if len(loc) >= 2 and loc[0] in _KEYED_SECTIONS and loc[1] in _KEYED_SECTIONS[str(loc[0])][2]:
        tag = loc.pop(1)  # pydantic names the kind in the location: say it the file's way
        kind_note = f" with {_KEYED_SECTIONS[str(loc[0])][0]}: {tag}"
    location = ".".join(str(part) for part in loc) or "(top level)"
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        return f"{location}: unknown key{kind_note} (check its spelling and section)"
    if kind == "missing":
        return f"{location}: required{kind_note}"
    if kind == "invalid_section_kind":
        key, kinds = _KEYED_SECTIONS[str(loc[0])][0], _KEYED_SECTIONS[str(loc[0])][2]
        chosen = given.get(key) if isinstance(given, dict) else given
        return f"{location}.{key}: expected one of {', '.join(kinds)} (got {chosen!r})"
    message = error["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{location}: {message}{shown}"


def _resolved(section: _SectionT, base_dir: Path) -> _SectionT:
    """The section with relative paths made relative to the config file, not to wherever the command ran."""
    changes: dict[str, Any] = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            resolved: Any = _resolved(value, base_dir)
        elif isinstance(value, Path) and not value.is_absolute():
            resolved = (base_dir / value).resolve()
        elif isinstance(value, dict) and all(isinstance(path, Path) for path in value.values()):
            resolved = {key: path if path.is_absolute() else (base_dir / path).resolve() for key, path in value.items()}
        else:
            continue
        if resolved is not value and resolved != value:
            changes[name] = resolved
    return replace(section, **changes) if changes else section


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> AppConfig:
    """Validate a mapping as an AppConfig; every problem is listed in one ConfigError naming `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (optics:, simulator:, ...), got {type(data).__name__}"
        )
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe_error(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {problems}") from None
    return config if base_dir is None else _resolved(config, base_dir)


def load_config(path: str | Path | None) -> AppConfig:
    """Load a YAML config file; None gives the defaults (the simulated microscope)."""
    if path is None:
        return AppConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    from acquire_refocus.yaml_safe import load_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = load_yaml(text, str(path))
    return parse_config(data, source=str(path), base_dir=path.parent.resolve())


def dump_config(config: AppConfig) -> str:
    """The config as YAML, for run records."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
