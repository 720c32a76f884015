"""The physics path: Wiener deconvolution at the estimated |d|, mixed with the network's fused image per bin of |d|
as the weights' calibration says (model/physics_path.py), and `acquire-refocus calibrate-model`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from acquire_refocus.cli import main
from acquire_refocus.config import EngineConfig, OpticsConfig, parse_config
from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS
from acquire_refocus.model.physics_path import (
    CALIBRATION_FRACTIONS,
    PhysicsPath,
    PhysicsPathCalibration,
    WienerFilter,
    bin_edges_um,
    calibrate,
)

SMALL_SIMULATOR = {"specimen": {"field_size_um": [120, 120], "nuclei_per_mm2": 6000}}


@pytest.fixture(scope="module")
def fusion() -> Any:
    from acquire_refocus.model.fusion import OpticalFusion

    return OpticalFusion(OpticsConfig(), margin_um=2.0)


def _calibration(shares: tuple[float, ...], balance: float = 0.1) -> PhysicsPathCalibration:
    edges = bin_edges_um(35.0)
    bins = len(edges) + 1
    shares = shares + (0.0,) * (bins - len(shares))
    return PhysicsPathCalibration(edges, (balance,) * bins, shares, (1.0,) * bins, (0.5,) * bins, (20,) * bins, "test")


def _frames(defocus_um: float, peak_photons: float = 2000.0) -> tuple[np.ndarray, np.ndarray]:
    """The noiseless in-focus image of the simulator's nuclei and a Poisson frame at `defocus_um`, in photons."""
    from acquire_refocus.sim.microscope import SimulatedMicroscope

    config = parse_config({"simulator": SMALL_SIMULATOR})
    scope = SimulatedMicroscope(config.optics, config.simulator)
    stack, truth = scope.photon_stack([defocus_um], (60.0, 60.0), (128, 128))
    scale = peak_photons / truth.max()
    noisy = np.random.default_rng(3).poisson(stack[0] * scale)
    return (truth * scale).astype(np.float32), noisy.astype(np.float32)


def _rms(image: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((image.astype(np.float64) - truth) ** 2)))


def test_wiener_at_the_estimated_distance_restores_a_noisy_defocused_frame(fusion: Any) -> None:
    """At 100 photons peak, 3 um from focus, Wiener with the bank's PSF at 3 um halves the error to the in-focus
    image (measured 3.6 -> 1.5 photons RMS; most of it is noise removed: with these optics the in-focus PSF does
    nearly as well), and with the PSF of 14 um, far wider than the blur, it ruins the frame (44.7)."""
    truth, blurred = _frames(3.0, peak_photons=100.0)
    wiener = WienerFilter(fusion)
    assert _rms(wiener.at(3.0, 1.0)(blurred), truth) < 0.6 * _rms(blurred, truth)
    assert _rms(wiener.at(14.0, 1.0)(blurred), truth) > 3.0 * _rms(blurred, truth)


@pytest.mark.parametrize("shape", [(65, 97), (128, 128)])
def test_the_wiener_filter_is_the_evaluations_wiener_in_one_fft_pair(fusion: Any, shape: tuple[int, int]) -> None:
    """Folding deconvolution and re-blur into one cached transfer function changes nothing against
    model/baselines.py `deconvolve` (skimage's Wiener, then the in-focus re-blur), at any distance and balance."""
    from acquire_refocus.model.baselines import deconvolve
    from acquire_refocus.model.held_out import Sample, crop_psf

    frame = (np.random.default_rng(4).poisson(50.0, shape) + 100).astype(np.float32)
    frame[10:40, 20:60] += 300
    wiener = WienerFilter(fusion)
    in_focus = crop_psf(fusion.bank.plane(int(fusion.bank.index(0.0))).astype(np.float64))
    for magnitude_um, balance in [(0.0, 0.003), (3.0, 10.0), (30.0, 3000.0)]:
        psf = crop_psf(fusion.bank.plane(int(fusion.bank.index(magnitude_um))).astype(np.float64))
        offset = float(np.percentile(frame, 0.5))
        expected = deconvolve(Sample("w", "w", 0.0, frame, frame), psf, in_focus, offset, "wiener", balance)
        np.testing.assert_allclose(wiener.at(magnitude_um, balance)(frame), expected, rtol=1e-5, atol=1e-3)


def test_the_physics_path_mixes_by_the_share_of_the_estimated_distance_bin(fusion: Any) -> None:
    """Bin 0 (|d| < 1.05 um) all Wiener, bin 1 half and half, the rest the network's path exactly as before."""
    _, raw = _frames(1.5)
    output = raw * 1.05  # a network that stretches contrast
    path = PhysicsPath(fusion, _calibration((1.0, 0.5)))
    wiener = path.wiener.at(0.5, 0.1)
    np.testing.assert_array_equal(path(raw, output, 0.5), fusion(raw, wiener(raw), 0.5, wiener))
    wiener = path.wiener.at(1.5, 0.1)
    half = 0.5 * fusion(raw, wiener(raw), 1.5, wiener) + 0.5 * fusion(raw, output, 1.5)
    np.testing.assert_allclose(path(raw, output, 1.5), half, rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(path(raw, output, 30.0), fusion(raw, output, 30.0))
    assert not np.allclose(path(raw, output, 0.5), fusion(raw, output, 0.5), atol=1e-2)


def test_each_bin_bounds_the_fusion_with_its_own_margin(fusion: Any) -> None:
    """A calibration with margins hands the fusion its bin's margin (a network-only bin included); one made
    before margins were calibrated keeps the model's one margin."""
    _, raw = _frames(20.0)
    output = raw * 1.2  # a network that sharpens: the bound decides how much of that stays
    margins = (3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.5, 0.0)
    path = PhysicsPath(fusion, dataclasses.replace(_calibration(()), margins_um=margins))
    np.testing.assert_array_equal(path(raw, output, 20.0), fusion(raw, output, 20.0, margin_um=0.5))
    np.testing.assert_array_equal(path(raw, output, 30.0), fusion(raw, output, 30.0, margin_um=0.0))
    assert not np.allclose(path(raw, output, 20.0), fusion(raw, output, 20.0), atol=1e-2)
    np.testing.assert_array_equal(PhysicsPath(fusion, _calibration(()))(raw, output, 20.0), fusion(raw, output, 20.0))


def test_a_calibration_round_trips_through_metadata_and_refuses_nonsense() -> None:
    calibration = _calibration((1.0, 0.25))
    assert PhysicsPathCalibration.from_metadata(calibration.to_metadata()) == calibration
    with_margins = dataclasses.replace(calibration, margins_um=(3.0,) * 6 + (1.5, 0.5, 0.0))
    assert PhysicsPathCalibration.from_metadata(with_margins.to_metadata()) == with_margins
    older = calibration.to_metadata()
    older.pop("margins_um")
    assert PhysicsPathCalibration.from_metadata(older).margins_um == ()
    with pytest.raises(ValueError, match="values per bin"):
        dataclasses.replace(calibration, margins_um=(1.0,) * 8)
    with pytest.raises(ValueError, match="margins must be finite"):
        dataclasses.replace(calibration, margins_um=(-1.0,) + (1.0,) * 8)
    with pytest.raises(ValueError, match="values per bin"):
        dataclasses.replace(calibration, shares=calibration.shares[:-1])
    with pytest.raises(ValueError, match="shares must lie in"):
        dataclasses.replace(calibration, shares=(1.5, *calibration.shares[1:]))
    assert calibration.bin_of(0.0) == 0 and calibration.bin_of(1.05) == 1 and calibration.bin_of(99.0) == 8


def _with_calibration(weights: Path, out: Path, calibration: PhysicsPathCalibration) -> Path:
    from acquire_refocus.model.checkpoint import TENSORS_SHA256, read_payload, write_payload

    payload, _ = read_payload(weights)
    payload.pop(TENSORS_SHA256)
    payload["metadata"].setdefault("training", {})["physics_path"] = calibration.to_metadata()
    write_payload(out, payload)
    return out


def test_the_refocuser_runs_the_calibrated_physics_path(tiny_weights: Path, tmp_path: Path) -> None:
    """Weights that carry a calibration refocus through it (the engine's setting turns it off); the image of a
    frame whose estimate falls in an all-Wiener bin is the fused Wiener image, whatever the network made."""
    from acquire_refocus import Refocuser
    from acquire_refocus.engines.tiling import infer_frame
    from acquire_refocus.model.normalization import denormalize, frame_scale, normalize

    calibrated = _with_calibration(tiny_weights, tmp_path / "calibrated.pt", _calibration((1.0,) * 9))
    refocuser = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32"))
    assert refocuser.physics_path is not None and refocuser.fusion is not None
    off = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32", physics_path=False))
    assert off.physics_path is None and off.fusion is not None
    _, frame = _frames(3.0)
    intensity = frame_scale(frame, refocuser.loaded.normalization)
    normalised = normalize(frame, intensity)
    _, focus = infer_frame(refocuser.engine, normalised)
    wiener = refocuser.physics_path.wiener.at(focus.magnitude_um, 0.1)
    expected = denormalize(refocuser.fusion(normalised, wiener(normalised), focus.magnitude_um, wiener), intensity)
    result = refocuser(frame)
    np.testing.assert_allclose(result.image, expected, rtol=1e-5, atol=1e-2)
    assert float(np.abs(result.image - off(frame).image).max()) > 1.0


def test_a_frame_outside_the_envelope_takes_the_fusion_alone(tiny_weights: Path, tmp_path: Path) -> None:
    """With Wiener in every bin, a frame inside the envelope comes out as the fused Wiener image, a saturated one
    (flagged, distrusted) as the fusion bounds the network's image."""
    from acquire_refocus import Refocuser

    calibrated = _with_calibration(tiny_weights, tmp_path / "wiener.pt", _calibration((1.0,) * 9))
    refocuser = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32"))
    fused_only = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32", physics_path=False))
    _, frame = _frames(3.0)
    assert float(np.abs(refocuser(frame).image - fused_only(frame).image).max()) > 1.0
    saturated = frame.copy()
    saturated[:40] = 65535.0
    result = refocuser(saturated.astype(np.uint16))
    assert "saturated" in result.flags
    np.testing.assert_array_equal(result.image, fused_only(saturated.astype(np.uint16)).image)


@pytest.mark.parametrize("physics_path", [True, False])
def test_evaluations_score_the_candidate_with_the_engine_switches_of_their_config(
    tiny_weights: Path, tmp_path: Path, physics_path: bool
) -> None:
    """`evaluate` (simulated suites and --stack) scores a model as the daemon of the same config runs it: with
    engine.physics_path off it must not score the Wiener path the daemon would not run."""
    from types import SimpleNamespace

    from acquire_refocus import Refocuser
    from acquire_refocus.commands.evaluate import _refocuser_model
    from acquire_refocus.model.scoring import network_methods

    calibrated = _with_calibration(tiny_weights, tmp_path / "wiener.pt", _calibration((1.0,) * 9))
    config = parse_config({"engine": {"physics_path": physics_path}})
    _, frame = _frames(3.0)
    daemon = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32", physics_path=physics_path))
    expected = daemon(frame, pixel_size_um=config.optics.pixel_size_um).image
    other = Refocuser.load(calibrated, EngineConfig(backend="torch", precision="fp32", physics_path=not physics_path))
    assert float(np.abs(expected - other(frame, pixel_size_um=config.optics.pixel_size_um).image).max()) > 1.0
    methods, _ = network_methods(config, [("candidate", calibrated)])
    np.testing.assert_array_equal(methods["candidate"](SimpleNamespace(raw=frame))[0], expected)
    stack_model = _refocuser_model(calibrated, config.optics.pixel_size_um, config.engine)
    np.testing.assert_array_equal(stack_model(frame)[0], expected)


@pytest.fixture(scope="module")
def calibration_frames() -> list[Any]:
    from acquire_refocus.model.data import calibration_windows

    config = parse_config({"simulator": SMALL_SIMULATOR})
    return calibration_windows(config, 2, 96, [35.0 * f for f in CALIBRATION_FRACTIONS])


def test_calibration_windows_are_validation_specimens_at_the_asked_distances(calibration_frames: list[Any]) -> None:
    from acquire_refocus.model.data import VALIDATION_SEED_BASE

    assert len(calibration_frames) == 2
    for window in calibration_frames:
        assert window.name.startswith(f"seed{VALIDATION_SEED_BASE}")
        np.testing.assert_allclose(np.abs(window.defocus_um), [35.0 * f for f in CALIBRATION_FRACTIONS])
        assert window.planes.shape == (len(CALIBRATION_FRACTIONS), 96, 96)
    assert (np.sign(calibration_frames[0].defocus_um[1:]) < 0).any()  # both signs drawn


def test_calibration_keeps_the_network_where_frames_are_too_few_and_picks_the_best_mixture(
    tiny_refocuser: Any, calibration_frames: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from acquire_refocus.model import physics_path

    frames = 2 * len(CALIBRATION_FRACTIONS)
    reach_um = 100.0  # bins end at 3, 6, 10, 15 um near focus: the untrained network reads these frames ~6-7 um
    monkeypatch.setattr(physics_path, "MIN_BIN_FRAMES", frames + 1)
    sparse = calibrate(tiny_refocuser, calibration_frames, reach_um, "test", balances=(0.03, 1.0))
    assert sum(sparse.frames) == frames and sparse.shares == (0.0,) * 9  # no bin has enough frames
    assert sparse.margins_um == (tiny_refocuser.fusion.margin_um,) * 9  # nor enough to measure a margin
    monkeypatch.undo()
    chosen = calibrate(tiny_refocuser, calibration_frames, reach_um, "test", balances=(0.03, 1.0))
    assert chosen.frames == sparse.frames
    np.testing.assert_array_equal(np.isnan(chosen.network_gain_db), np.array(chosen.frames) == 0)  # NaN: no frames
    # every frame reads 6-10 um, near focus for a 100 um reach: that bin's margin is measured, never below the one
    assert chosen.margins_um[2] >= tiny_refocuser.fusion.margin_um and chosen.frames[2] == frames
    for share, gain, network_gain, count in zip(
        chosen.shares, chosen.mean_gain_db, chosen.network_gain_db, chosen.frames, strict=True
    ):
        if count < physics_path.MIN_BIN_FRAMES:
            assert share == 0.0
        elif share == 0.0:
            assert gain == pytest.approx(network_gain)
        else:  # the best mixture, and only where it beats the network's path by the margin asked
            assert gain >= network_gain + physics_path.MIN_ADVANTAGE_DB - 1e-3
    # an untrained network reads every frame alike and restores nothing: the Wiener path takes a share of its bin
    assert any(share > 0 for share in chosen.shares)
    # the same frames against a 35 um reach fall beyond MAX_REACH_FRACTION of it: every bin keeps the network
    far = calibrate(tiny_refocuser, calibration_frames, 35.0, "test", balances=(0.03, 1.0))
    assert sum(far.frames[4:]) == frames and far.shares == (0.0,) * 9  # all read beyond 5.25 um
    assert far.margins_um == (tiny_refocuser.fusion.margin_um,) * 9  # and within 10.5 um: near, the one margin


class _SpreadReadings:
    """The tiny network's engine with its |d| reading spread over 5 and 9 um by the input (it reads every frame
    alike), so that frames of two bins come interleaved; the images are the network's own."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, focus = self.engine.run(batch)
        focus[:, 2] = [5.0 if int(abs(float(b.sum())) * 1e3) % 2 else 9.0 for b in batch]
        return images, focus


def test_bins_far_from_focus_choose_the_margin_their_frames_gain_most_under(
    tiny_refocuser: Any, calibration_frames: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a 22 um reach, frames read 5 um keep the model's one margin (near focus: bins ending within 30 % of
    the reach, 6.6 um) and frames read 9 um take their bin's choice among fractions of it; each bin's recorded gain
    is the network path's under that bin's own margin, frame by frame, though the two bins' frames interleave."""
    from skimage.metrics import peak_signal_noise_ratio

    from acquire_refocus import Refocuser
    from acquire_refocus.engines.tiling import infer_frame
    from acquire_refocus.model import physics_path
    from acquire_refocus.model.normalization import frame_scale, normalize

    spread = Refocuser(tiny_refocuser.loaded, _SpreadReadings(tiny_refocuser.engine), tiny_refocuser.fusion)
    one_margin = tiny_refocuser.fusion.margin_um
    chosen = calibrate(spread, calibration_frames, 22.0, "test", balances=(0.03,))
    assert set(chosen.margins_um) <= {round(f * one_margin, 3) for f in physics_path.MARGIN_FRACTIONS}
    assert chosen.margins_um[:6] == (one_margin,) * 6

    real_choice = physics_path.choose_candidate

    def smallest_margin(baseline: Any, candidates: Any, default: Any, groupings: Any = ()) -> Any:
        if isinstance(default, float):  # a margin: the smallest, as if it gained most
            return min(candidates), math.nan
        return real_choice(baseline, candidates, default, groupings)

    monkeypatch.setattr(physics_path, "choose_candidate", smallest_margin)
    forced = calibrate(spread, calibration_frames, 22.0, "test", balances=(0.03,))
    assert forced.frames[5] >= 5 and forced.frames[6] >= physics_path.MIN_BIN_FRAMES  # read 5 and 9 um
    assert forced.margins_um[5] == one_margin and forced.margins_um[6] == 0.0

    def network(window: np.ndarray) -> np.ndarray:
        return infer_frame(spread.engine, window)[0]

    gains: dict[int, list[float]] = {5: [], 6: []}
    for window in calibration_frames:
        for raw in window.planes:
            intensity = frame_scale(raw, spread.loaded.normalization)
            frame, truth = normalize(raw, intensity), normalize(window.truth, intensity)
            image, focus = infer_frame(spread.engine, frame)
            index = forced.bin_of(focus.magnitude_um)
            fused = spread.fusion(frame, image, focus.magnitude_um, network, forced.margins_um[index])
            data_range = float(truth.max() - truth.min())
            gains[index].append(
                float(
                    peak_signal_noise_ratio(truth, fused, data_range=data_range)
                    - peak_signal_noise_ratio(truth, frame, data_range=data_range)
                )
            )
    for index, per_frame in gains.items():
        assert forced.network_gain_db[index] == pytest.approx(np.mean(per_frame), abs=2e-3)


def test_calibrate_model_refuses_bad_arguments_with_a_clear_message(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "stored.yaml"
    config.write_text(f"training:\n  data: stored\n  dataset_dir: {tmp_path / 'nowhere'}\n")
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"")
    before, shipped = tiny_weights.read_bytes(), DEFAULT_WEIGHTS.read_bytes()
    cases = [
        (["--config", str(config), "--out", str(tmp_path / "a.pt")], "z-stack folder not found"),
        (["--config", str(config), "--out", str(existing)], "exists; give --force"),
        (["--config", str(config), "--weights", str(tiny_weights), "--out", str(tiny_weights), "--force"], "differ"),
        (
            ["--config", str(config), "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b.pt")],
            "not found",
        ),
        (["--config", str(config), "--fields", "0", "--out", str(tmp_path / "c.pt")], "at least 1"),
        (["--config", str(config), "--out", str(DEFAULT_WEIGHTS), "--force"], "or the shipped model"),
        (["--config", str(config), "--out", str(tmp_path)], "is a folder"),
        (["--config", str(config), "--out", str(existing / "d.pt")], "cannot create the folder"),
    ]
    for arguments, message in cases:
        assert main(["calibrate-model", *arguments]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error
    assert tiny_weights.read_bytes() == before and DEFAULT_WEIGHTS.read_bytes() == shipped


def test_calibrate_model_on_a_stored_dataset_writes_weights_that_refocus_through_it(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The path a user's own z-stacks take: training's validation sites of the stored dataset, every plane."""
    from support import SMALL_FIELD_SIMULATOR

    from acquire_refocus import Refocuser
    from acquire_refocus.sim.dataset import write_simulated_dataset

    simulated = parse_config({"simulator": SMALL_FIELD_SIMULATOR})
    stacks = tmp_path / "stacks"
    write_simulated_dataset(
        stacks, simulated.optics, simulated.simulator, fields=2, defocus_um=np.arange(-8.0, 8.01, 1.0), seed=5
    )
    config = tmp_path / "stored.yaml"
    config.write_text(f"training:\n  data: stored\n  dataset_dir: {stacks}\n  defocus_range_um: [-8, 8]\n")
    before = tiny_weights.read_bytes()
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate-model", "--config", str(config), "--weights", str(tiny_weights), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"calibrated weights: {out}" in printed and "17 frames of the 1 validation sites" in printed
    assert tiny_weights.read_bytes() == before
    refocuser = Refocuser.load(out, "torch")
    assert refocuser.physics_path is not None
    assert sum(refocuser.physics_path.calibration.frames) == 17
    assert refocuser.physics_path.calibration.bin_edges_um == bin_edges_um(8.0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda recorded: recorded.pop("shares"), "lacks 'shares'"),
        (lambda recorded: recorded.update(shares=recorded["shares"][:-1]), "values per bin"),
        (lambda recorded: recorded.update(shares=[1.5] * 9), "shares must lie in"),
        (lambda recorded: recorded.update(balances=["a"] * 9), "damaged"),
        (lambda recorded: recorded.update(bin_edges_um=list(reversed(recorded["bin_edges_um"]))), "must rise"),
        (lambda recorded: recorded.update(balances=[math.inf] * 9), "balances must lie in"),
        (lambda recorded: recorded.update(balances=[1e-300] * 9), "balances must lie in"),
        (lambda recorded: recorded.clear(), "lacks 'bin_edges_um'"),
        (lambda recorded: recorded.update(shares=[10**400] + [0] * 8), "damaged"),  # beyond any float
        (lambda recorded: recorded.update(shares=["0.5"] * 9), "other than numbers"),
        (lambda recorded: recorded.update(shares="000000000"), "not a list of numbers"),
        (lambda recorded: recorded.update(shares=[True] + [False] * 8), "other than numbers"),
        (lambda recorded: recorded.update(frames=[1.5] * 9), "frames"),
        (lambda recorded: recorded.update(margins_um=[-1.0] * 9), "margins must be finite"),
        (lambda recorded: recorded.update(margins_um=["3"] * 9), "other than numbers"),
        (lambda recorded: recorded.update(margins_um=[0.0] * 9), "margin of 0 um in bin 0 near focus must be"),
        (lambda recorded: recorded.update(margins_um=[3.0] * 8 + [1e300]), "margin of 1e.300 um in bin 8 may not"),
    ],
)
def test_weights_with_a_damaged_calibration_are_refused_clearly(
    tiny_weights: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    """A clear WeightsError naming the fix, never a KeyError from deep inside; the network's path still loads."""
    from acquire_refocus import Refocuser
    from acquire_refocus.errors import WeightsError
    from acquire_refocus.model.checkpoint import TENSORS_SHA256, read_payload, write_payload

    payload, _ = read_payload(tiny_weights)
    payload.pop(TENSORS_SHA256)
    recorded = _calibration((1.0,)).to_metadata()
    damage(recorded)
    payload["metadata"]["training"] = {"physics_path": recorded}
    damaged = tmp_path / "damaged.pt"
    write_payload(damaged, payload)
    with pytest.raises(WeightsError, match=message) as raised:
        Refocuser.load(damaged, "torch")
    assert "calibrate-model" in str(raised.value)
    assert Refocuser.load(damaged, EngineConfig(backend="torch", physics_path=False)).physics_path is None


def test_a_mixture_is_chosen_only_when_it_wins_on_most_frames_and_beyond_chance() -> None:
    """The rules of `calibrate` on per-frame gains (dB) of 40 frames whose network path gains 2 dB."""
    from acquire_refocus.model.physics_path import choose_candidate

    def choose_mixture(
        network: np.ndarray, candidates: dict[tuple[float, float], np.ndarray], balance: float, *groupings: Any
    ) -> tuple[float, float, float]:
        (chosen_balance, share), gain = choose_candidate(network, candidates, (balance, 0.0), *groupings)
        return chosen_balance, share, gain

    network = np.full(40, 2.0)
    steady = network + 0.5  # +0.5 dB on every frame
    risky = network + np.where(np.arange(40) < 8, -1.0, 1.2)  # mean +0.76, but a fifth of the frames lose 1 dB
    noisy = network + np.random.default_rng(0).normal(0.06, 1.0, 40)  # +0.06 on average, within chance
    one_family_loses = network + np.where(np.arange(40) < 8, -0.2, 0.6)  # mean +0.44; filaments lose 0.2 dB
    families = ["filaments"] * 8 + ["nuclei"] * 32
    assert choose_mixture(network, {(3.0, 0.5): steady, (10.0, 1.0): risky}, 0.1) == pytest.approx((3.0, 0.5, 2.5))
    assert choose_mixture(network, {(10.0, 1.0): risky}, 0.1) == (0.1, 0.0, 2.0)
    assert choose_mixture(network, {(10.0, 1.0): noisy}, 0.1) == (0.1, 0.0, 2.0)
    assert choose_mixture(network, {(3.0, 0.5): one_family_loses}, 0.1, [families]) == (0.1, 0.0, 2.0)
    brightness = ["1e3"] * 8 + ["1e2"] * 32  # the same frames as one bright decade: vetoed as well
    assert choose_mixture(network, {(3.0, 0.5): one_family_loses}, 0.1, [["all"] * 40, brightness])[1] == 0
    assert choose_mixture(network, {(3.0, 0.5): one_family_loses}, 0.1)[1] == 0.5  # families unknown: taken
    few_filaments = ["filaments"] * 5 + ["nuclei"] * 35  # 5 frames of a family say too little to veto
    assert choose_mixture(network, {(3.0, 0.5): one_family_loses}, 0.1, [few_filaments])[1] == 0.5
    few = choose_mixture(network[:5], {(3.0, 0.5): steady[:5]}, 0.1)  # too few frames to say
    assert few == (0.1, 0.0, 2.0)


def test_the_report_names_the_shares_and_a_damaged_calibration() -> None:
    from acquire_refocus.model.report import physics_path_note

    calibration = _calibration((0.5, 0.0, 0.25))
    note = physics_path_note({"physics_path": calibration.to_metadata()})
    assert "Wiener share per estimated |d| 0.5 at 0-1.05 um, 0.25 at 2.1-3.5 um, calibrated on test." in note
    damaged = calibration.to_metadata() | {"shares": ["0.5"] * 9}
    assert "damaged" in physics_path_note({"physics_path": damaged})
    assert physics_path_note({}) == ""
    margins = dataclasses.replace(calibration, margins_um=(3.0,) * 6 + (0.0, 3.0, 0.0))
    assert "; fusion margin 3 um up to 10.5 um, 0 um at 10.5-15.75 um, 3 um at 15.75-24.5 um, 0 um beyond 24.5 um," in (
        physics_path_note({"physics_path": margins.to_metadata()})
    )


def test_the_report_says_how_each_network_was_run(tiny_weights: Path, tmp_path: Path) -> None:
    """A network scored without the fusion, or without the physics path, is not described by the calibration its
    weights carry."""
    from acquire_refocus.model.report import network_note
    from acquire_refocus.model.scoring import network_method

    training = {"physics_path": _calibration((1.0,)).to_metadata()}
    calibrated = _with_calibration(tiny_weights, tmp_path / "calibrated.pt", _calibration((1.0,)))
    for fusion, path, expected in [
        (True, True, "Physics path (with the fusion)"),
        (True, False, "with the model's one margin, without the physics path"),
        (False, True, "without the fusion"),
    ]:
        _, info = network_method(calibrated, 0.325, 1, physics_fusion=fusion, physics_path=path)
        assert expected in network_note(info, training)
