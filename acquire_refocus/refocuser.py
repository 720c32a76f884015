"""The public API: one frame in, the refocused frame and a defocus estimate out.

    from acquire_refocus import Refocuser
    r = Refocuser.load()                        # shipped model, best engine here
    out = r(frame, pixel_size_um=0.325)
    out.image, out.defocus_um, out.confidence

Per frame: validate -> percentile-normalise (normalization.py) -> resample to the model's pixel size if the frame's
differs -> the engine (padding to the stride and tiling large frames: engines.tiling.infer_frame) -> fuse with the
input under the optics' bounds (model/fusion.py; engine.physics_fusion), mixed near focus with Wiener deconvolution
at the estimated |d| where the weights' calibration says so, for frames inside the model's envelope
(model/physics_path.py; engine.physics_path) ->
resample back to the exact original shape -> undo the normalisation, so `image` is in the frame's own intensity
units.

defocus_um follows the project convention: stage Z now minus stage Z in focus; moving the focus stage by
-defocus_um restores focus. defocus_magnitude_um is the network's unsigned estimate |defocus|: with optics whose blur
looks alike above and below focus the sign is a guess (and defocus_um shrinks towards 0 with it), while the
magnitude still holds; the focus controller can work from it alone (focus.sign_source: probe).

confidence = exp(-sigma_um / CONFIDENCE_SIGMA_SCALE_UM), where sigma_um is the network's predicted standard
deviation of its defocus estimate (trained with a Gaussian likelihood on the actual errors): 1 for a certain
estimate, 0.61 at sigma = 1 um, 0.37 at sigma = 2 um, below 0.1 when sigma exceeds ~4.6 um (e.g. a field without
cells). A constant (or all-zero) frame has nothing to refocus or focus on: it is returned unchanged (as float32)
with defocus_um = 0.0 and confidence = 0.0, so closed-loop focus ignores it. A frame outside the model's envelope
(saturated, nearly empty, a brightness or pixel size the model never saw: model/envelope.py) is refocused but
carries `flags` and confidence 0.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError
from skimage.transform import resize

from acquire_refocus.config import EngineConfig
from acquire_refocus.errors import ConfigError, InputError, WeightsError
from acquire_refocus.logs import kv
from acquire_refocus.model.checkpoint import LoadedModel, load_weights
from acquire_refocus.model.envelope import DISTRUSTED, envelope_flags
from acquire_refocus.model.fusion import DEFAULT_MARGIN_UM, SHIPPED_REACH_UM, OpticalFusion
from acquire_refocus.model.normalization import denormalize, frame_scale, normalize
from acquire_refocus.model.physics_path import PhysicsPath, PhysicsPathCalibration

if TYPE_CHECKING:
    from acquire_refocus.engines.base import Engine

log = logging.getLogger(__name__)

MIN_FRAME_PX = 64
CONFIDENCE_SIGMA_SCALE_UM = 2.0
# Pixel sizes within this relative difference of the model's are used as they are (no resampling).
_PIXEL_SIZE_TOLERANCE = 0.01
# Frames are resampled to the model's pixel size; beyond this ratio the structures the model knows would be a few
# pixels, or larger than its field of view: the result would be meaningless (1e-9 um gave a constant image).
_MAX_PIXEL_SIZE_RATIO = 16.0


@dataclass(frozen=True)
class RefocusResult:
    image: np.ndarray  # float32, the frame's shape and intensity units
    defocus_um: float  # stage Z now - stage Z in focus
    confidence: float  # in [0, 1], from the predicted uncertainty
    sigma_um: float  # predicted standard deviation of defocus_um (inf for a constant frame)
    defocus_magnitude_um: float  # the unsigned estimate |defocus|; holds where the sign is ambiguous
    flags: tuple[str, ...] = ()  # why the frame lies outside the model's envelope (model/envelope.py)


def confidence_from_sigma(sigma_um: float) -> float:
    return float(min(1.0, max(0.0, math.exp(-sigma_um / CONFIDENCE_SIGMA_SCALE_UM))))


def _engine_config(engine: EngineConfig | str | None) -> EngineConfig:
    if engine is None:
        return EngineConfig(backend="auto")
    if isinstance(engine, EngineConfig):
        return engine
    if isinstance(engine, str):
        try:
            return EngineConfig.model_validate({"backend": engine})
        except ValidationError:
            raise ConfigError(f"unknown engine {engine!r}; choose one of auto, tensorrt, onnxruntime, torch") from None
    raise ConfigError(f"engine must be an EngineConfig or a backend name, got {type(engine).__name__}")


def check_frame(frame: object) -> np.ndarray:
    """The frame as an array, or InputError saying what is wrong with it."""
    if not isinstance(frame, np.ndarray):
        raise InputError(f"expected a 2-D numpy array, got {type(frame).__name__}")
    if frame.dtype.kind not in "uif":
        raise InputError(
            f"frame dtype {frame.dtype} is not supported; expected unsigned/signed integers (e.g. uint8, uint16) "
            "or floats"
        )
    if frame.ndim != 2:
        hint = " (squeeze the singleton axes first)" if frame.ndim > 2 and sum(s > 1 for s in frame.shape) == 2 else ""
        raise InputError(f"expected a 2-D frame (height, width), got shape {frame.shape}{hint}")
    if min(frame.shape) < MIN_FRAME_PX:
        raise InputError(
            f"frame {frame.shape[0]}x{frame.shape[1]} px is too small; at least "
            f"{MIN_FRAME_PX}x{MIN_FRAME_PX} px is needed"
        )
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        bad = int(np.count_nonzero(~np.isfinite(frame)))
        raise InputError(f"frame contains {bad} NaN or infinite value(s); replace them before refocusing")
    return frame


def check_pixel_size_um(pixel_size_um: float | None, model_pixel_size_um: float) -> None:
    """InputError for a pixel size frames cannot be resampled from: not a positive number, or more than
    _MAX_PIXEL_SIZE_RATIO times from the model's (None: frames are taken at the model's own)."""
    if pixel_size_um is None:
        return
    if isinstance(pixel_size_um, bool) or not isinstance(pixel_size_um, numbers.Real):
        raise InputError(f"pixel_size_um must be a number of micrometres, got {pixel_size_um!r}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise InputError(f"pixel_size_um must be a positive number of micrometres, got {pixel_size_um!r}")
    if not 1 / _MAX_PIXEL_SIZE_RATIO <= pixel_size_um / model_pixel_size_um <= _MAX_PIXEL_SIZE_RATIO:
        raise InputError(
            f"pixel_size_um {pixel_size_um:g} is more than {_MAX_PIXEL_SIZE_RATIO:g} times from the model's "
            f"{model_pixel_size_um:g} um: a typo, or optics this model was not trained for (train one on z-stacks "
            "taken with them)"
        )


class Refocuser:
    """Refocus frames and estimate their defocus with a loaded model on one engine. Thread-compatible: one
    Refocuser per thread, or calls serialised by the caller (the daemon runs it on one worker thread)."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: Engine,
        fusion: OpticalFusion | None = None,
        physics_path: PhysicsPath | None = None,
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.fusion = fusion
        self.physics_path = physics_path

    @classmethod
    def load(cls, path: str | Path | None = None, engine: EngineConfig | str | None = None) -> Refocuser:
        """Load weights (None: the shipped default model) on the best available engine, or the one named."""
        from acquire_refocus.engines import create_engine

        loaded = load_weights(path)
        engine_config = _engine_config(engine)
        built = create_engine(loaded, engine_config)
        fusion = physics_path = None
        if engine_config.physics_fusion:
            training = loaded.metadata.get("training") or {}
            calibration = training.get("focus_calibration") or {}
            reach_um = max((abs(float(d)) for d in training.get("defocus_range_um") or ()), default=SHIPPED_REACH_UM)
            fusion = OpticalFusion(
                loaded.optics, float(calibration.get("magnitude_margin_um", DEFAULT_MARGIN_UM)), reach_um
            )
            recorded_path = training.get("physics_path")
            if engine_config.physics_path and recorded_path is not None:
                try:
                    path_calibration = PhysicsPathCalibration.from_metadata(recorded_path)
                    path_calibration.check_margins(fusion.margin_um)
                except ValueError as exc:
                    raise WeightsError(
                        f"{loaded.path}: {exc}; recalibrate it (acquire-refocus calibrate-model) or load it with "
                        "engine.physics_path: false"
                    ) from None
                physics_path = PhysicsPath(fusion, path_calibration)
        log.info(
            kv(
                "refocuser_loaded",
                weights=loaded.path,
                sha256=loaded.sha256[:12],
                engine=built.name,
                precision=built.precision,
                device=built.device,
                model_pixel_size_um=loaded.pixel_size_um,
            )
        )
        return cls(loaded, built, fusion, physics_path)

    @property
    def engine_name(self) -> str:
        return str(self.engine.name)

    @property
    def pixel_size_um(self) -> float:
        """The pixel size (at the sample) the model was trained for."""
        return self.loaded.pixel_size_um

    @property
    def snr_range(self) -> tuple[float, float] | None:
        """The signal-to-noise range of the model's validation frames, if its training recorded it."""
        recorded = (self.loaded.metadata.get("training") or {}).get("envelope_snr_range")
        return (float(recorded[0]), float(recorded[1])) if recorded else None

    @property
    def model_sha256(self) -> str:
        return self.loaded.sha256

    def check_pixel_size_um(self, pixel_size_um: float | None) -> None:
        """InputError for a pixel size frames cannot be resampled from (see `check_pixel_size_um`)."""
        check_pixel_size_um(pixel_size_um, self.pixel_size_um)

    def __call__(self, frame: np.ndarray, pixel_size_um: float | None = None) -> RefocusResult:
        from acquire_refocus.engines.tiling import infer_frame

        frame = check_frame(frame)
        self.check_pixel_size_um(pixel_size_um)
        zoom = 1.0 if pixel_size_um is None else float(pixel_size_um) / self.pixel_size_um
        intensity = frame_scale(frame, self.loaded.normalization)
        flags = envelope_flags(frame, zoom, self.snr_range)
        if intensity.is_degenerate:  # a constant frame: nothing to refocus (envelope_flags says nearly_empty)
            return RefocusResult(frame.astype(np.float32, copy=True), 0.0, 0.0, math.inf, 0.0, flags)
        normalised = normalize(frame, intensity)
        resampled = abs(zoom - 1.0) > _PIXEL_SIZE_TOLERANCE
        if resampled:
            shape = (max(1, round(frame.shape[0] * zoom)), max(1, round(frame.shape[1] * zoom)))
            normalised = resize(
                normalised, shape, order=1, mode="reflect", anti_aliasing=zoom < 1.0, preserve_range=True
            ).astype(np.float32)
        image, focus = infer_frame(self.engine, normalised)
        distrusted = any(flag in DISTRUSTED for flag in flags)
        if self.fusion is not None:
            # a frame outside the model's envelope gets the optics' bounds alone: the physics path's Wiener filter
            # rests on a |d| estimate that such a frame does not support
            fuse = self.fusion if self.physics_path is None or distrusted else self.physics_path
            image = fuse(normalised, image, focus.magnitude_um, lambda window: infer_frame(self.engine, window)[0])
        if resampled:
            image = resize(
                image, frame.shape, order=1, mode="reflect", anti_aliasing=zoom > 1.0, preserve_range=True
            ).astype(np.float32)
        sigma_um = math.exp(focus.log_sigma_um)
        return RefocusResult(
            image=denormalize(image, intensity),
            defocus_um=focus.defocus_um,
            confidence=0.0 if distrusted else confidence_from_sigma(sigma_um),
            sigma_um=float(sigma_um),
            defocus_magnitude_um=focus.magnitude_um,
            flags=flags,
        )
