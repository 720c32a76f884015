"""Software autofocus for useq `autofocus_plan`s: a short through-focus sweep, no hardware autofocus needed.

Why: Micro-Manager's image-based autofocus (OughtaFocus) sweeps the whole search range, 9-10 frames and seconds per
run. Here the network's unsigned estimate |defocus| seeds the search: frames at Z -+ |defocus| say which side
focus lies on (the sharper one), so the fine sweep only covers a few planes around it. The fine sweep's band-pass
sharpness (sharpness.py) is fitted with the log-parabola `fit_sharpness_curve` uses for calibration; where its
peak lies outside the swept planes, the sweep extends towards it. Without an estimate (no network, or it failed),
a coarse sweep at steps of `sharpness_range_um` replaces the seed.

The frames of the sweep are not part of the acquisition (they are not saved or published); each run is logged
(`software_autofocus`: frames, their Z and log sharpness, the fitted peak and width) and, with an output folder,
plotted (sharpness against Z with the fit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from acquire_refocus.config import AppConfig, FocusConfig, OpticsConfig, SoftwareAutofocusConfig
from acquire_refocus.logs import kv
from acquire_refocus.sharpness import BandPassSharpness, SharpnessCurve, fit_sharpness_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from acquire_refocus.pipeline import FrameCorrector

log = logging.getLogger(__name__)

MagnitudeEstimator = Callable[[np.ndarray, float | None], float]
"""(frame, pixel_size_um) -> the network's unsigned |defocus| in um (NaN when it has none)."""

_MAX_EXTENSIONS = 6  # planes added towards a peak outside the fine sweep
# A peak is trusted only where the frames' log sharpness falls by at least this much from it (10%: 2 um from focus
# with the default optics; photon noise repeats to 0.8%; an empty simulated field spans 4% over +-8 um) and the
# fitted width is at most this many times the configured sharpness_width_um (the empty field fitted 18 um, 4.6x).
_MIN_LOG_FALL = 0.1
_MAX_WIDTH_RATIO = 3.0


class FocusCore(Protocol):
    """The part of a Micro-Manager core (pymmcore-plus's CMMCorePlus) the autofocus uses."""

    def setZPosition(self, z: float, /) -> None: ...  # noqa: N802 - Micro-Manager's name

    def waitForSystem(self) -> None: ...  # noqa: N802 - Micro-Manager's name

    def snapImage(self) -> None: ...  # noqa: N802 - Micro-Manager's name

    def getImage(self) -> npt.NDArray[Any]: ...  # noqa: N802 - Micro-Manager's name


class FocusDrive:
    """What the autofocus moves and images with: a Micro-Manager core's focus stage and camera."""

    def __init__(self, core: FocusCore) -> None:
        self._core = core

    def snap_at(self, z_um: float) -> np.ndarray:
        core = self._core
        core.setZPosition(z_um)
        core.waitForSystem()
        core.snapImage()
        return np.asarray(core.getImage())

    def move_to(self, z_um: float) -> None:
        self._core.setZPosition(z_um)
        self._core.waitForSystem()


@dataclass
class AutofocusResult:
    """One software autofocus run."""

    start_z_um: float
    focus_z_um: float  # where it left the stage (start_z_um when it failed)
    succeeded: bool
    reason: str
    seed_magnitude_um: float | None
    z_um: list[float] = field(default_factory=list)  # every frame it took, in order
    log_sharpness: list[float] = field(default_factory=list)
    curve: SharpnessCurve | None = None

    @property
    def frames(self) -> int:
        return len(self.z_um)


class SoftwareAutofocus:
    """Find the sharpest Z near a start Z with as few frames as the seed allows (module docstring)."""

    def __init__(
        self,
        config: SoftwareAutofocusConfig,
        sharpness: BandPassSharpness,
        range_fit_um: float,
        width_um: float,
        magnitude: MagnitudeEstimator | None = None,
        pixel_size_um: float | None = None,
        plot_dir: Path | None = None,
    ) -> None:
        self.config = config
        self._sharpness = sharpness
        self._range_fit_um = range_fit_um  # where the log-parabola model holds (sharpness_range_um)
        self._width_um = width_um  # the expected width of the sharpness curve (sharpness_width_um)
        self._magnitude = magnitude
        self._pixel_size_um = pixel_size_um
        self._plot_dir = plot_dir
        self.runs: list[AutofocusResult] = []

    @classmethod
    def for_config(
        cls,
        focus: FocusConfig,
        optics: OpticsConfig,
        magnitude: MagnitudeEstimator | None = None,
        pixel_size_um: float | None = None,
        plot_dir: Path | None = None,
    ) -> SoftwareAutofocus:
        _, width_um, range_um = focus.sharpness_settings_um(optics)
        return cls(
            focus.autofocus,
            BandPassSharpness.for_optics(optics, focus.sharpness_band_um),
            range_um,
            width_um,
            magnitude,
            pixel_size_um,
            plot_dir,
        )

    def run(self, drive: FocusDrive, start_z_um: float, label: str = "") -> AutofocusResult:
        """Sweep around `start_z_um`, leave the stage at the focus found (or at the start when none is found)."""
        cfg = self.config
        taken: dict[float, float] = {}
        result = AutofocusResult(start_z_um, start_z_um, False, "", None)

        def measure(z_um: float) -> float:
            z_um = round(z_um, 3)
            if z_um not in taken:
                frame = drive.snap_at(z_um)
                value = self._sharpness(frame, self._pixel_size_um)
                taken[z_um] = math.log(value) if math.isfinite(value) and value > 0 else -math.inf
                result.z_um.append(z_um)
                result.log_sharpness.append(taken[z_um])
                if len(result.z_um) == 1 and self._magnitude is not None:
                    seed = float(self._magnitude(frame, self._pixel_size_um))
                    result.seed_magnitude_um = seed if math.isfinite(seed) else None
            return taken[z_um]

        lo, hi = start_z_um - cfg.range_um, start_z_um + cfg.range_um
        coarse_um = max(cfg.step_um, self._range_fit_um)  # the sharpness model holds over this distance
        measure(start_z_um)
        seed = result.seed_magnitude_um
        distance_um = coarse_um if seed is None else min(cfg.range_um, max(cfg.step_um, seed))
        sides = [z for z in (start_z_um - distance_um, start_z_um + distance_um) if lo <= z <= hi]
        best = max([start_z_um, *sides], key=measure)
        if best != start_z_um:  # climb on in coarse steps while it gets sharper (a seed that reads short)
            direction = 1.0 if best > start_z_um else -1.0
            while (
                lo <= best + direction * coarse_um <= hi
                and measure(best + direction * coarse_um) > taken[round(best, 3)]
            ):
                best = round(best + direction * coarse_um, 3)
        half = cfg.fine_planes // 2
        for z in (best + k * cfg.step_um for k in range(-half, half + 1)):
            if lo <= z <= hi:
                measure(z)
        curve = self._fit(taken)
        for _ in range(_MAX_EXTENSIONS):  # a peak beyond the fine planes: one more plane towards it
            fine = [z for z in taken if abs(z - best) <= half * cfg.step_um + 1e-6]
            if curve is not None and min(fine) <= curve.peak_z_um <= max(fine):
                break
            towards = curve.peak_z_um if curve is not None else max(taken, key=taken.__getitem__)
            nxt = (max(fine) + cfg.step_um) if towards > best else (min(fine) - cfg.step_um)
            if not lo <= nxt <= hi:
                break
            measure(nxt)
            best = max(taken, key=taken.__getitem__)
            curve = self._fit(taken)
        result.curve = curve
        values = [v for v in taken.values() if math.isfinite(v)]
        fall = max(values) - min(values) if values else 0.0
        if curve is None or not lo <= curve.peak_z_um <= hi:
            result.reason = "no sharpness peak within the search range (an empty field, or focus beyond range_um)"
            drive.move_to(start_z_um)
        elif fall < _MIN_LOG_FALL or curve.width_um > _MAX_WIDTH_RATIO * self._width_um:
            result.reason = (
                f"no sharpness peak: too little structure (sharpness varies {fall:.3f} in log, fitted "
                f"width {curve.width_um:.1f} um): a blank field, or one changing while it was swept"
            )
            drive.move_to(start_z_um)
        else:
            result.focus_z_um, result.succeeded, result.reason = curve.peak_z_um, True, "fitted"
            drive.move_to(curve.peak_z_um)
        self.runs.append(result)
        log.log(
            logging.INFO if result.succeeded else logging.WARNING,
            kv(
                "software_autofocus",
                at=label or "-",
                start_z_um=f"{start_z_um:.3f}",
                focus_z_um=f"{result.focus_z_um:.3f}",
                succeeded=result.succeeded,
                frames=result.frames,
                seed_magnitude_um=f"{seed:.2f}" if seed is not None else "none",
                width_um=f"{curve.width_um:.2f}" if curve else "none",
                curve=";".join(f"{z:.2f}:{s:.4f}" for z, s in zip(result.z_um, result.log_sharpness, strict=True)),
                reason=result.reason,
            ),
        )
        if self._plot_dir is not None:
            plot_focus_curve(self._plot_dir / f"autofocus_{label or len(self.runs)}.png", result)
        return result

    def _fit(self, taken: dict[float, float]) -> SharpnessCurve | None:
        """The log-parabola through the frames within the model's range of the sharpest one."""
        z = np.array(list(taken))
        s = np.array(list(taken.values()))
        return fit_sharpness_curve(z, s, self._range_fit_um)

    def plain_sweep(self, drive: FocusDrive, start_z_um: float) -> AutofocusResult:
        """The baseline a seeded run is measured against: every plane of the search range at `step_um`, fitted
        the same way (what Micro-Manager's sweep-based autofocus does). Leaves the stage at the focus found."""
        cfg = self.config
        result = AutofocusResult(start_z_um, start_z_um, False, "", None)
        for z in np.arange(start_z_um - cfg.range_um, start_z_um + cfg.range_um + 1e-9, cfg.step_um):
            value = self._sharpness(drive.snap_at(float(z)), self._pixel_size_um)
            result.z_um.append(float(z))
            result.log_sharpness.append(math.log(value) if math.isfinite(value) and value > 0 else -math.inf)
        result.curve = fit_sharpness_curve(np.array(result.z_um), np.array(result.log_sharpness), self._range_fit_um)
        if result.curve is not None:
            result.focus_z_um, result.succeeded, result.reason = result.curve.peak_z_um, True, "fitted"
        drive.move_to(result.focus_z_um)
        return result


def _draw_curve(
    ax: Axes, z: npt.NDArray[np.float64], s: npt.NDArray[np.float64], curve: SharpnessCurve | None, label: str
) -> None:
    """Frames' log sharpness against Z, and the fitted log-parabola with its peak."""
    finite = np.isfinite(s)
    points = ax.plot(z[finite], s[finite], "o", ms=4, label=label)
    if curve is None:
        return
    near = finite & (np.abs(z - curve.peak_z_um) <= 2 * curve.width_um)
    peak_z_um, width_um = curve.peak_z_um, curve.width_um

    def shape(zz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return -((zz - peak_z_um) ** 2) / (2 * width_um**2)

    level = float(np.mean(s[near] - shape(z[near]))) if near.any() else float(s[finite].max())
    grid = np.linspace(
        max(z.min(), curve.peak_z_um - 2 * curve.width_um), min(z.max(), curve.peak_z_um + 2 * curve.width_um), 200
    )
    colour = points[0].get_color()
    ax.plot(
        grid,
        level + shape(grid),
        "-",
        lw=1,
        color=colour,
        label=f"fit: peak {curve.peak_z_um:.2f} um, width {curve.width_um:.2f} um",
    )
    ax.axvline(curve.peak_z_um, color=colour, lw=0.6)


def plot_sharpness_curves(
    path: Path,
    curves: list[tuple[str, np.ndarray, np.ndarray, SharpnessCurve | None]],
    title: str,
    start_z_um: float | None = None,
) -> None:
    """One focus-curve plot: per field (name, Z, log sharpness, fit or None), the points and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, z, s, curve in curves:
        _draw_curve(ax, np.asarray(z, dtype=float), np.asarray(s, dtype=float), curve, name)
    if start_z_um is not None:
        ax.axvline(start_z_um, color="grey", ls="--", lw=0.6, label="start")
    ax.set_xlabel("stage Z (um)")
    ax.set_ylabel("log band-pass sharpness")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_focus_curve(path: Path, result: AutofocusResult) -> None:
    """What one software autofocus run saw: its frames' sharpness against Z, the fit and the focus found."""
    plot_sharpness_curves(
        path,
        [(f"{result.frames} frames", np.array(result.z_um), np.array(result.log_sharpness), result.curve)],
        f"software autofocus: {result.reason}",
        result.start_z_um,
    )


def software_autofocus(
    config: AppConfig, corrector: FrameCorrector, controller: object | None, output_dir: Path | None
) -> SoftwareAutofocus:
    """The daemon's software autofocus: on the optics of the channel that drives the loop, seeded by the
    corrector's unsigned estimate (`defocus_magnitude_um`), focus curves plotted into `output_dir/autofocus`."""
    channel = getattr(controller, "channel", None)

    def magnitude(frame: np.ndarray, pixel_size_um: float | None) -> float:
        try:
            return float(getattr(corrector(frame, pixel_size_um), "defocus_magnitude_um", math.nan))
        except Exception as exc:  # noqa: BLE001 - whatever the engine raises on a frame it refuses: no seed, logged
            log.warning(kv("software_autofocus_no_seed", error=repr(exc)))
            return math.nan

    return SoftwareAutofocus.for_config(
        config.focus,
        config.optics.for_channel(channel),
        magnitude,
        config.acquisition.pixel_size_um,
        output_dir / "autofocus" if output_dir is not None else None,
    )
