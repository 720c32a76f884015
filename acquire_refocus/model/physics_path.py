"""Wiener deconvolution beside the network, at the distances where the model's validation frames say it restores
better.

Why: at a known |d| the blur of these optics is known too (the PSF bank the fusion already holds; the PSFs at +d
and -d nearly agree, so the unsigned estimate is enough). A linear deconvolution with it has learnt no specimen
and no brightness, so it cannot be fooled by an unseen one the way a network can; it is limited instead by the
noise and by how far off the |d| estimate is. Passed through the same fusion as the network's image (amplitude
bound, blend towards the raw frame, with its own noise probe: model/fusion.py), it beat the shipped network within
10 um on nine of the ten out-of-distribution sets and lost to it beyond 14 um (tools/compare_physics_path.py).
With 20x / 0.45 optics most of what it adds near focus is noise removed: defocus beyond a few um erases
frequencies that no linear filter restores.

Per frame: the network's unsigned estimate picks a bin of |d|; the bin's calibration gives the Wiener balance and
the share of the fused Wiener image in the result (share x fused Wiener + (1 - share) x fused network; a share of 0
leaves the network's path exactly as it was and costs nothing, 1 skips the network's noise probe). The balance and
share per bin are chosen by `calibrate` on validation frames of the model's own training envelope (its validation
specimen seeds, never the test ones; model/data.py), and stored in the weights' metadata (`training.physics_path`).
The same frames also choose the fusion's margin per bin (MARGIN_FRACTIONS): near focus the model's one margin,
further out the one under which the network's path gains most. Weights without a calibration run the network's path
alone, with the one margin; so do frames the Refocuser distrusts (outside the model's envelope). (The network's
image without the fusion, mixed in far from focus the same way, was measured and not kept: the model README,
2026-12-07.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import scipy.fft
from skimage.metrics import peak_signal_noise_ratio
from tqdm import tqdm

from acquire_refocus.logs import kv
from acquire_refocus.model.baselines import WIENER_BALANCES
from acquire_refocus.model.held_out import crop_psf

if TYPE_CHECKING:
    from acquire_refocus.config import AppConfig
    from acquire_refocus.model.data import Window
    from acquire_refocus.model.fusion import MeasuredFrame, OpticalFusion
    from acquire_refocus.refocuser import Refocuser

log = logging.getLogger(__name__)
Choice = TypeVar("Choice")  # what a bin's calibration chooses: a (balance, share) mixture, a margin

# Upper edges of the |d| bins as fractions of the model's training reach (35 um for the shipped model: 1.05, 2.1,
# 3.5, 5.25, 7.7, 10.5, 15.75 and 24.5 um; the last bin is open): fine near focus, where the choice matters most.
BIN_FRACTIONS = (0.03, 0.06, 0.1, 0.15, 0.22, 0.3, 0.45, 0.7)
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
# Balances a calibration may hold: around the baselines' grid (0.003-3,000); far below it the filter divides by
# nearly zero where the OTF does (1e-300 turned a frame of 65-974 into -2,800-4,650).
BALANCE_RANGE = (1e-4, 1e5)
# True |d| of the calibration frames as fractions of the reach (sign drawn per frame): dense near focus, where a
# closed loop keeps most frames, then evenly spaced to the reach, so that a bin holds the far frames the head
# misreads into it as often as they come (with 0.4, 0.55, 0.75 and 1.0 beyond 0.3, frames 12-20 um out were too
# few, and the 7.7-15.75 um bins took Wiener shares that cost such frames 0.5-3.7 dB in a black-box test).
CALIBRATION_FRACTIONS = (
    *(0.0, 0.015, 0.03, 0.05, 0.08, 0.12, 0.17, 0.23),
    *(0.3, 0.37, 0.44, 0.51, 0.58, 0.65, 0.72, 0.79, 0.86, 0.93, 1.0),
)
_TRANSFER_CACHE_ENTRIES = 32  # (PSF, balance, padded shape): a run's frames and probe windows share a few
MIN_BIN_FRAMES = 12  # fewer validation frames in a bin than this say too little: the bin keeps the network
MIN_ADVANTAGE_DB = 0.05  # a share above 0 must beat the network's path by this much on the bin's mean PSNR gain,
ADVANTAGE_STANDARD_ERRORS = 2.0  # and by this many standard errors of the frames' paired differences: a bin of 15
# frames from 4 specimens is a small sample, and a share that wins on it by chance costs every user's frames there
# No more than TAIL_FRACTION of a bin's frames may lose over TAIL_LOSS_DB against the network's path: a share that
# wins on average but costs some frames 1-4 dB (a Wiener filter at a |d| the head misread) is not taken. Without
# it the shipped calibration mixed Wiener in at 7.7-15.75 um, where a black-box test on the simulator's nuclei at
# 50-5,000 photons found 18 % of frames 0.5 dB or more worse than the network's path (worst -3.7 dB).
TAIL_FRACTION = 0.1
TAIL_LOSS_DB = 0.3
# Nor may it lose on average on any specimen family, or any decade of brightness, among the bin's frames (groups of
# MIN_GROUP_FRAMES or more): the envelope mixes nuclei, cytoplasm, filaments, puncta and mixtures at 20-5,000
# photons, a user images one family at one brightness, and a share that wins on the mix can lose on one of them.
# Without the family rule the shipped model's real-image gain in focus fell 0.9 dB (balance 100 near focus). The
# brightness rule came after the 10x preset took a share that cost the OOD suite's bright frames 0.5-1.2 dB near
# focus; its validation frames' bright decade did not lose, so the rule did not change that choice.
MIN_GROUP_FRAMES = 6
# Beyond this fraction of the reach (5.25 um for the shipped model) every bin keeps the network. Near focus what the
# Wiener path adds is mostly noise removed, which held on every set we have; further out its gain rests on a |d|
# reading right to within a depth of field (the shipped head is 2-5 um off at 6-14 um on the OOD sets). There the
# validation frames, every family included, still chose shares of 0.5-0.75 at 7.7-15.75 um, while the OOD suite's
# nuclei sets lost 0.08-0.22 dB at 14 um and a nuclei sweep (50-5,000 photons) 0.2-0.55 dB on average at 7-15 um,
# single frames up to 3.2 dB. The limit was set after those measurements. A head that reads every frame beyond it
# (the 60x and 100x presets read 1.3-4.2 um whatever the distance) gets no physics path.
MAX_REACH_FRACTION = 0.15
# The fusion's margin (model/fusion.py: what it takes off the estimated |d| before bounding the image) per bin, chosen
# like the shares, by the network path's gain on the bin's validation frames, among these fractions of the model's
# one margin (the 90th percentile of the head's excess over every validation frame within 10 um of focus). Bins that
# end within NEAR_MARGIN_FRACTION of the reach (10.5 um for the shipped model; NEAR_MARGIN_BINS) keep the one
# margin: there the bound is what stops an in-focus frame the head over-reads from being sharpened. Further out the
# head reads short, and the one margin, taken off estimates already short, bounded frames 14-30 um out at the OTF of
# a distance 3-6 um nearer: the shipped model lost 0.2-1.2 dB there against a margin of 0 on every OOD set but the
# beads. (The 90th percentile of each far bin's own excess was tried first and not kept: on the validation frames it
# came to 2.4, 4.6 and 3.6 um, no smaller than the one margin; 2026-12-07, session 16.)
NEAR_MARGIN_FRACTION = 0.3
NEAR_MARGIN_BINS = BIN_FRACTIONS.index(NEAR_MARGIN_FRACTION) + 1  # the bins that end there or nearer: 0-5
MARGIN_FRACTIONS = (1.0, 0.5, 0.25, 0.0)
_MARGIN_ROUNDING_UM = 1e-3  # margins are recorded to 3 decimals


@dataclass(frozen=True)
class PhysicsPathCalibration:
    """Per bin of estimated |d| (upper edges in um; the last bin open): the Wiener balance and its share."""

    bin_edges_um: tuple[float, ...]
    balances: tuple[float, ...]
    shares: tuple[float, ...]
    mean_gain_db: tuple[float, ...]  # the chosen mixture's mean PSNR gain over the raw frame on the bin's frames
    network_gain_db: tuple[float, ...]  # the network's path alone on the same frames
    frames: tuple[int, ...]
    source: str  # what the frames were
    # the fusion's margin per bin (NEAR_MARGIN_FRACTION); () in calibrations made before 2026-12-07: the one margin
    margins_um: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        bins = len(self.bin_edges_um) + 1
        lengths = {len(self.balances), len(self.shares), len(self.mean_gain_db), len(self.network_gain_db)}
        if lengths != {bins} or len(self.frames) != bins or len(self.margins_um) not in (0, bins):
            raise ValueError(f"a physics-path calibration needs {bins} values per bin for {bins - 1} edges")
        if any(not 0.0 <= share <= 1.0 for share in self.shares):
            raise ValueError("physics-path shares must lie in [0, 1]")
        if any(not BALANCE_RANGE[0] <= b <= BALANCE_RANGE[1] for b in self.balances):
            raise ValueError(f"physics-path balances must lie in [{BALANCE_RANGE[0]:g}, {BALANCE_RANGE[1]:g}]")
        if any(not 0.0 <= margin < math.inf for margin in self.margins_um):
            raise ValueError("physics-path margins must be finite and 0 or more (um)")

    def bin_of(self, magnitude_um: float) -> int:
        return int(np.searchsorted(np.asarray(self.bin_edges_um), magnitude_um, side="right"))

    def check_margins(self, margin_um: float) -> None:
        """ValueError unless the per-bin margins are what `calibrate` writes for a model whose one margin is
        `margin_um`: bins of BIN_FRACTIONS, that margin in the NEAR_MARGIN_BINS, none larger anywhere. Smaller near
        focus would let the fusion sharpen in-focus frames the head over-reads; larger would loosen the bound
        wherever the head reads short."""
        if self.margins_um and len(self.bin_edges_um) != len(BIN_FRACTIONS):
            raise ValueError(f"its fusion margins need {len(BIN_FRACTIONS) + 1} bins, not {len(self.margins_um)}")
        for index, margin in enumerate(self.margins_um):
            near = index < NEAR_MARGIN_BINS
            if margin > margin_um + _MARGIN_ROUNDING_UM or (near and margin < margin_um - _MARGIN_ROUNDING_UM):
                where = "near focus must be" if near else "may not exceed"
                raise ValueError(
                    f"its fusion margin of {margin:g} um in bin {index} {where} the model's margin ({margin_um:g} um)"
                )

    def margin_of(self, index: int) -> float | None:
        """The fusion's margin for bin `index`; None: the model's one margin (an older calibration)."""
        return self.margins_um[index] if self.margins_um else None

    def to_metadata(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, recorded: object) -> PhysicsPathCalibration:
        """The calibration a weights file records; ValueError saying what is wrong with a damaged one."""
        try:
            if not isinstance(recorded, dict):
                raise TypeError(f"a {type(recorded).__name__}, not a table")
            calibration = cls(
                bin_edges_um=_numbers(recorded, "bin_edges_um"),
                balances=_numbers(recorded, "balances"),
                shares=_numbers(recorded, "shares"),
                mean_gain_db=_numbers(recorded, "mean_gain_db"),
                network_gain_db=_numbers(recorded, "network_gain_db"),
                frames=_counts(recorded, "frames"),
                source=str(recorded["source"]),
                margins_um=_numbers(recorded, "margins_um") if "margins_um" in recorded else (),
            )
        except KeyError as exc:
            raise ValueError(f"its physics-path calibration lacks {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"its physics-path calibration is damaged: {exc}") from None
        edges = calibration.bin_edges_um
        if any(not math.isfinite(edge) for edge in edges) or list(edges) != sorted(edges):
            raise ValueError("its physics-path calibration is damaged: bin edges must rise and be finite")
        return calibration


def _numbers(recorded: dict[str, Any], key: str) -> tuple[float, ...]:
    """recorded[key] as floats: a list of numbers (not text, not true / false, which float() would take)."""
    values = recorded[key]
    if not isinstance(values, list | tuple):
        raise TypeError(f"{key} is a {type(values).__name__}, not a list of numbers")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise TypeError(f"{key} holds something other than numbers")
    return tuple(float(v) for v in values)


def _counts(recorded: dict[str, Any], key: str) -> tuple[int, ...]:
    """recorded[key] as whole numbers of 0 or more (frame counts)."""
    values = _numbers(recorded, key)
    if any(not value.is_integer() or value < 0 for value in values):
        raise ValueError(f"{key} must be whole numbers of 0 or more")
    return tuple(int(value) for value in values)


class WienerFilter:
    """Wiener deconvolution with the fusion's PSF bank at a |d|, re-blurred with the in-focus PSF (the target is the
    in-focus image, not the object), in the frame's own units: the same filter as model/baselines.py `deconvolve`
    (skimage's Laplacian-regularised Wiener, reflect padding by the PSF radius), with the deconvolution and the
    re-blur folded into one transfer function cached per PSF, balance and padded shape, so a frame costs one FFT
    pair, in float32 like the network's image (the transfer function is computed in float64). (The re-blur is
    circular here and linear there; they differ only within the padding, which is cropped.)"""

    def __init__(self, fusion: OpticalFusion) -> None:
        self.bank = fusion.bank
        self._psf = lru_cache(maxsize=64)(self._cropped_psf)
        self._transfer = lru_cache(maxsize=_TRANSFER_CACHE_ENTRIES)(self._transfer_function)
        self._in_focus_index = int(self.bank.index(0.0))

    def _cropped_psf(self, index: int) -> np.ndarray:
        return crop_psf(self.bank.plane(index).astype(np.float64))

    def _transfer_function(self, index: int, balance: float, shape: tuple[int, int]) -> np.ndarray:
        from skimage.restoration import uft

        blur = uft.ir2tf(self._psf(index), shape)
        regulariser, _ = uft.laplacian(2, shape)
        in_focus = uft.ir2tf(self._psf(self._in_focus_index), shape)
        transfer = np.conj(blur) / (np.abs(blur) ** 2 + balance * np.abs(regulariser) ** 2) * in_focus
        single: np.ndarray = transfer.astype(np.complex64)  # computed in float64, applied in float32
        single.flags.writeable = False
        return single

    def at(self, magnitude_um: float, balance: float) -> Callable[[np.ndarray], np.ndarray]:
        index = int(self.bank.index(magnitude_um))
        pad = max(self._psf(index).shape[0], self._psf(self._in_focus_index).shape[0]) // 2

        def run(frame: np.ndarray) -> np.ndarray:
            offset = float(np.percentile(frame, 0.5))
            image = np.clip(np.asarray(frame, dtype=np.float32) - np.float32(offset), 0.0, None)
            scale = max(float(image.max()), 1.0)
            padded = np.pad(image / np.float32(scale), pad, mode="reflect")
            shape = (int(padded.shape[0]), int(padded.shape[1]))
            spectrum = scipy.fft.rfft2(padded, workers=-1) * self._transfer(index, balance, shape)
            restored = scipy.fft.irfft2(spectrum, s=shape, workers=-1)[
                pad : pad + frame.shape[0], pad : pad + frame.shape[1]
            ]
            return np.asarray(restored * scale + offset, dtype=np.float32)

        return run


class PhysicsPath:
    """The fused network image mixed with the fused Wiener image per the calibration (module docstring); called
    like OpticalFusion."""

    def __init__(self, fusion: OpticalFusion, calibration: PhysicsPathCalibration) -> None:
        self.fusion = fusion
        self.calibration = calibration
        self.wiener = WienerFilter(fusion)

    def __call__(
        self,
        raw: np.ndarray,
        output: np.ndarray,
        magnitude_um: float,
        network: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        if not math.isfinite(magnitude_um):
            return self.fusion(raw, output, magnitude_um, network)
        index = self.calibration.bin_of(magnitude_um)
        share, margin_um = self.calibration.shares[index], self.calibration.margin_of(index)
        if share <= 0.0:
            return self.fusion(raw, output, magnitude_um, network, margin_um)
        wiener = self.wiener.at(magnitude_um, self.calibration.balances[index])
        measured = self.fusion.measure(raw)  # once for both paths: the frame's spectrum and noise
        spectrum = self.fusion.fused_spectrum(raw, measured, wiener(raw), magnitude_um, wiener, margin_um)
        if share < 1.0:  # mixed as spectra: one inverse FFT for both
            by_network = self.fusion.fused_spectrum(raw, measured, output, magnitude_um, network, margin_um)
            spectrum = share * spectrum + (1.0 - share) * by_network
        return self.fusion.image(measured, spectrum)


def bin_edges_um(reach_um: float) -> tuple[float, ...]:
    return tuple(round(reach_um * fraction, 3) for fraction in BIN_FRACTIONS)


def choose_candidate(
    baseline_db: np.ndarray,
    candidates: dict[Choice, np.ndarray],
    default: Choice,
    groupings: Sequence[Sequence[str]] = (),
) -> tuple[Choice, float]:
    """(choice, mean gain) for one bin, from the per-frame PSNR gains of the baseline (the network's path as it
    stands) and of each candidate on the same frames (`groupings`: per-frame labels, e.g. each frame's specimen
    family, its brightness decade): the best candidate by mean gain that passes every rule of `calibrate`, else
    (default, the baseline's mean gain)."""
    count = baseline_db.size
    groups = []
    for labels in groupings:
        if len(labels) == count:
            array = np.asarray(labels)
            groups += [array == label for label in set(array.tolist())]
    groups = [members for members in groups if members.sum() >= MIN_GROUP_FRAMES]
    best = (default, float(baseline_db.mean()) if count else math.nan)
    if count < MIN_BIN_FRAMES:
        return best
    for choice, candidate_db in candidates.items():
        advantage = candidate_db - baseline_db
        standard_error = float(advantage.std(ddof=1)) / math.sqrt(count)
        margin = max(MIN_ADVANTAGE_DB, ADVANTAGE_STANDARD_ERRORS * standard_error)
        tail_ok = float(np.quantile(advantage, TAIL_FRACTION)) >= -TAIL_LOSS_DB
        every_group_ok = all(float(advantage[members].mean()) >= 0.0 for members in groups)
        gain = float(baseline_db.mean() + advantage.mean())
        if gain > best[1] and advantage.mean() >= margin and tail_ok and every_group_ok:
            best = (choice, gain)
    return best


def calibrate(
    refocuser: Refocuser,
    windows: Sequence[Window],
    reach_um: float,
    source: str,
    balances: Sequence[float] = WIENER_BALANCES,
    progress: bool = False,
) -> PhysicsPathCalibration:
    """Choose each bin's balance and share on `windows` (validation frames with their in-focus truth): the pair
    with the highest mean PSNR gain over the raw frame, where it beats the network's path alone by
    MIN_ADVANTAGE_DB and by ADVANTAGE_STANDARD_ERRORS standard errors of the per-frame paired differences, loses
    more than TAIL_LOSS_DB on at most TAIL_FRACTION of the frames, loses on average on no specimen family and no
    decade of brightness with MIN_GROUP_FRAMES frames or more, the bin has at least MIN_BIN_FRAMES frames and ends
    within MAX_REACH_FRACTION of the reach; otherwise the bin keeps the network (share 0). First, in each bin beyond
    NEAR_MARGIN_FRACTION of the reach, the fusion's margin: the fraction of the model's one margin (MARGIN_FRACTIONS)
    under which the network's path gains most by the same rules; both paths are then scored with the bin's margin."""
    from acquire_refocus.engines.tiling import infer_frame
    from acquire_refocus.model.fusion import passed_noise_share
    from acquire_refocus.model.normalization import frame_scale, normalize

    fusion = refocuser.fusion
    if fusion is None:
        raise ValueError("the physics path goes through the fusion: load the Refocuser with physics_fusion on")
    wiener = WienerFilter(fusion)
    edges = bin_edges_um(reach_um)
    bins = len(edges) + 1
    # bins a share may be chosen in: those that end within MAX_REACH_FRACTION of the reach
    near_focus = {index for index, edge in enumerate(edges) if edge <= MAX_REACH_FRACTION * reach_um + 1e-9}
    # gains[bin][balance index][share index]: PSNR gains of the mixtures on every frame of a near-focus bin
    gains: list[list[list[list[float]]]] = [[[[] for _ in SHARES] for _ in balances] for _ in range(bins)]
    network_gains_db: list[list[float]] = [[] for _ in range(bins)]  # the network's path, on every bin's frames
    families: list[list[str]] = [[] for _ in range(bins)]
    brightness: list[list[str]] = [[] for _ in range(bins)]

    def network(window: np.ndarray) -> np.ndarray:
        return infer_frame(refocuser.engine, window)[0]

    def prepared(window: Window, plane: int) -> Prepared | None:
        """A plane normalised, its truth likewise, the network's image and |d|; None for a frame with nothing in it.
        Run again wherever a pass needs them, rather than kept for every frame (a stored dataset's validation
        sites can hold thousands of large planes); the engine gives the same output for the same frame."""
        raw = window.planes[plane]
        intensity = frame_scale(raw, refocuser.loaded.normalization)
        if intensity.is_degenerate:
            return None
        frame, truth = normalize(raw, intensity), normalize(window.truth, intensity)
        if float(truth.max() - truth.min()) <= 0:
            return None
        image, focus = infer_frame(refocuser.engine, frame)
        return frame, truth, image, focus.magnitude_um

    readings: list[_Reading] = []  # every frame's |d| first: the far bins' margins need all of a bin's frames
    for window in tqdm(windows, desc="calibrate: |d| readings", unit="window", disable=not progress):
        decade = f"1e{math.floor(math.log10(window.peak_photons))}" if window.peak_photons > 0 else ""
        for plane in range(len(window.planes)):
            if (inferred := prepared(window, plane)) is not None:
                index = int(np.searchsorted(np.asarray(edges), inferred[3], side="right"))
                readings.append(_Reading(window, plane, index, window.family, decade))

    def fused_by_margin(
        frame: np.ndarray, measured: MeasuredFrame, image: np.ndarray, magnitude_um: float, margins_um: Sequence[float]
    ) -> list[np.ndarray]:
        """The network's image fused with `frame` under each margin, its noise probe run once for all of them."""
        passed_share = passed_noise_share(frame, network, measured.noise)
        return [
            fusion.image(
                measured,
                fusion.fused_spectrum(frame, measured, image, magnitude_um, margin_um=m, passed_share=passed_share),
            )
            for m in margins_um
        ]

    margins = [fusion.margin_um] * bins
    far = range(NEAR_MARGIN_BINS, bins)
    for index in tqdm(far, desc="calibrate: margins", unit="bin", disable=not progress):
        members = [reading for reading in readings if reading.index == index]
        if len(members) < MIN_BIN_FRAMES:
            continue
        by_margin: dict[float, list[float]] = {round(f * fusion.margin_um, 3): [] for f in MARGIN_FRACTIONS}
        for reading in members:
            frame, truth, image, magnitude_um = cast(Prepared, prepared(reading.window, reading.plane))
            raw_psnr_db = _psnr_db(truth, frame)
            fused = fused_by_margin(frame, fusion.measure(frame), image, magnitude_um, list(by_margin))
            for gains_db, by_network in zip(by_margin.values(), fused, strict=True):
                gains_db.append(_psnr_db(truth, by_network) - raw_psnr_db)
        baseline = np.array(by_margin.pop(round(fusion.margin_um, 3)))
        smaller = {margin_um: np.array(gains_db) for margin_um, gains_db in by_margin.items()}
        groupings = ([reading.family for reading in members], [reading.brightness for reading in members])
        margins[index], _ = choose_candidate(baseline, smaller, fusion.margin_um, groupings)
    for reading in tqdm(readings, desc="calibrate: physics path", unit="frame", disable=not progress):
        frame, truth, image, magnitude_um = cast(Prepared, prepared(reading.window, reading.plane))
        index, margin_um = reading.index, margins[reading.index]
        measured, raw_psnr_db = fusion.measure(frame), _psnr_db(truth, frame)
        (by_network,) = fused_by_margin(frame, measured, image, magnitude_um, [margin_um])
        families[index].append(reading.family)
        brightness[index].append(reading.brightness)
        network_gains_db[index].append(_psnr_db(truth, by_network) - raw_psnr_db)
        if index not in near_focus:  # no share can be chosen there: the Wiener path is not scored
            continue
        for b, balance in enumerate(balances):
            deconvolved = wiener.at(magnitude_um, balance)
            by_wiener = fusion.image(
                measured,
                fusion.fused_spectrum(frame, measured, deconvolved(frame), magnitude_um, deconvolved, margin_um),
            )
            for s, share in enumerate(SHARES[1:], start=1):
                mixed = share * by_wiener + (1.0 - share) * by_network
                gains[index][b][s].append(_psnr_db(truth, mixed) - raw_psnr_db)
    chosen_balances, chosen_shares, mean_gains, network_gains, frames = [], [], [], [], []
    for index in range(bins):
        network_db = np.asarray(network_gains_db[index])
        candidates = {
            (balance, share): np.asarray(gains[index][b][s])
            for b, balance in enumerate(balances)
            for s, share in enumerate(SHARES)
            if share > 0 and index in near_focus
        }
        (balance, share), gain = choose_candidate(
            network_db, candidates, (balances[0], 0.0), (families[index], brightness[index])
        )
        chosen_balances.append(float(balance))
        chosen_shares.append(share)
        mean_gains.append(round(gain, 3))
        network_gains.append(round(float(network_db.mean()), 3) if network_db.size else math.nan)
        frames.append(int(network_db.size))
    calibration = PhysicsPathCalibration(
        bin_edges_um=edges,
        balances=tuple(chosen_balances),
        shares=tuple(chosen_shares),
        mean_gain_db=tuple(mean_gains),
        network_gain_db=tuple(network_gains),
        frames=tuple(frames),
        source=source,
        margins_um=tuple(margins),
    )
    log.info(
        kv(
            "physics_path_calibrated",
            **{
                f"bin{i}": f"{s:g}@{b:g}/margin={m:g}"
                for i, (s, b, m) in enumerate(zip(calibration.shares, calibration.balances, margins, strict=True))
            },
        )
    )
    return calibration


Prepared = tuple[np.ndarray, np.ndarray, np.ndarray, float]  # a calibration frame: frame, truth, image, |d|


@dataclass(frozen=True)
class _Reading:
    """Where a calibration frame is (its window and plane), the bin its |d| reading falls in, and its groups."""

    window: Window
    plane: int
    index: int
    family: str
    brightness: str  # the decade of its peak photons ("" unknown)


def _psnr_db(truth: np.ndarray, image: np.ndarray) -> float:
    """PSNR against the truth with its own range (a frame's gain is this of the output less this of the raw frame)."""
    return float(peak_signal_noise_ratio(truth, image, data_range=float(truth.max() - truth.min())))


def calibrate_weights(
    config: AppConfig, weights: Path | None, out: Path, fields: int, window_px: int = 256, progress: bool = True
) -> PhysicsPathCalibration:
    """Calibrate the physics path of `weights` (None: the shipped default) on validation frames of `config`'s
    training data and write the weights, with the calibration in their metadata, to `out`. Simulated envelopes:
    `fields` windows of the validation specimens at CALIBRATION_FRACTIONS of the reach; a stored dataset: the
    validation sites of training's split, every plane."""
    from acquire_refocus.config import EngineConfig, StoredTrainingConfig
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS, TENSORS_SHA256, read_payload, write_payload
    from acquire_refocus.model.data import VALIDATION_SEED_BASE, calibration_windows, stored_sources
    from acquire_refocus.refocuser import Refocuser

    source = weights if weights is not None else DEFAULT_WEIGHTS
    refocuser = Refocuser.load(
        source, EngineConfig(backend="torch", precision="fp32", physics_fusion=True, physics_path=False)
    )
    reach_um = max(abs(d) for d in config.training.defocus_range_um)
    if isinstance(config.training, StoredTrainingConfig):
        _, windows = stored_sources(config)
        description = (
            f"{sum(len(w.planes) for w in windows)} frames of the {len(windows)} validation sites of "
            f"{config.training.dataset_dir} (training's split by site), truth: each site's in-focus plane"
        )
    else:
        magnitudes_um = [round(reach_um * fraction, 3) for fraction in CALIBRATION_FRACTIONS]
        windows = calibration_windows(config, fields, window_px, magnitudes_um)
        description = (
            f"{len(windows)} validation windows ({window_px} px, specimen seeds from {VALIDATION_SEED_BASE}) of the "
            f"training envelope of the given config, |d| = {', '.join(f'{m:g}' for m in magnitudes_um)} um"
        )
    calibration = calibrate(refocuser, windows, reach_um, description, progress=progress)
    payload, _ = read_payload(source)
    payload.pop(TENSORS_SHA256, None)
    metadata = payload.setdefault("metadata", {})
    metadata.setdefault("training", {})["physics_path"] = calibration.to_metadata()
    write_payload(out, payload)
    return calibration
