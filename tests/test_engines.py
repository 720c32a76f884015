"""Engines: interface, parity with PyTorch, padding and tiling, the ONNX cache, backend selection and fallbacks.

Relative error, as used throughout: max|a - b| / max|b| with b the PyTorch FP32 reference (for images, of the
residual image - input, the part the network computes; the input itself would dilute any error).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from acquire_refocus.config import EngineConfig, UNetModelConfig
from acquire_refocus.engines import (
    Engine,
    EngineOutOfMemoryError,
    ShapeOutOfRangeError,
    create_engine,
)
from acquire_refocus.engines.onnx_engine import onnx_path
from acquire_refocus.engines.tiling import combine_focus, infer_frame, run_batched
from acquire_refocus.engines.torch_engine import TorchEngine
from acquire_refocus.model.network import FOCUS_CONTRACT_VERSION, build_network

FP32_RELATIVE_TOLERANCE = 1e-4


@dataclass
class Loaded:
    """The two things an engine takes from acquire_refocus.model.checkpoint.LoadedModel."""

    network: torch.nn.Module
    sha256: str


def small_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network(UNetModelConfig(base_channels=8, depth=3)).eval()
    # Non-trivial batch-norm statistics, so the network is not close to its initial identity-like state.
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return network


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return Loaded(small_network(), "1f2e3d4c5b6a" + "0" * 52)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


def engine_config(cache_dir: Path, backend: str = "auto", **changes: object) -> EngineConfig:
    values: dict[str, object] = dict(
        backend=backend,
        precision="fp32",
        cache_dir=cache_dir,
        min_size_px=16,
        opt_size_px=64,
        max_size_px=64,
        max_batch=4,
        tile_overlap_px=16,
        num_threads=1,
    )
    values.update(changes)
    return EngineConfig.model_validate(values)


@pytest.fixture(scope="module")
def torch_engine(loaded: Loaded, cache_dir: Path) -> Engine:
    return create_engine(loaded, engine_config(cache_dir, "torch"))


@pytest.fixture(scope="module")
def ort_engine(loaded: Loaded, cache_dir: Path) -> Engine:
    engine = create_engine(loaded, engine_config(cache_dir, "onnxruntime"))
    assert engine.name == "onnxruntime", "onnxruntime is a dependency; its engine must build here"
    return engine


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def frames(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Blurred noise, normalised like real frames (mostly in 0..1)."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32)
    return np.cumsum(np.cumsum(data, axis=-1), axis=-2).astype(np.float32) / (shape[-1] * shape[-2] / 4)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_honours_the_interface(backend: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue("torch_engine" if backend == "torch" else "ort_engine")
    assert isinstance(engine, Engine)
    assert engine.name == backend
    assert engine.precision == "fp32"  # CPU: FP32 whatever is asked
    assert engine.device == "cpu"
    assert engine.stride == 8
    assert (engine.min_size_px, engine.max_size_px, engine.max_batch) == (16, 64, 4)
    images, focus = engine.run(frames((3, 1, 32, 48)))
    assert images.shape == (3, 1, 32, 48) and images.dtype == np.float32
    assert focus.shape == (3, 3) and focus.dtype == np.float32
    assert np.all(focus[:, 2] >= 0.0)  # the unsigned |defocus|
    for bad in (frames((1, 1, 36, 32)), frames((1, 1, 72, 64)), frames((5, 1, 32, 32)), frames((1, 32, 32))):
        with pytest.raises(ShapeOutOfRangeError, match=backend):
            engine.run(bad)


def test_onnxruntime_agrees_with_pytorch(torch_engine: Engine, ort_engine: Engine) -> None:
    batch = frames((4, 1, 64, 48), seed=3)
    reference_images, reference_focus = torch_engine.run(batch)
    images, focus = ort_engine.run(batch)
    assert relative_error(images - batch, reference_images - batch) <= FP32_RELATIVE_TOLERANCE
    assert relative_error(focus, reference_focus) <= FP32_RELATIVE_TOLERANCE
    assert np.max(np.abs(focus[:, 0] - reference_focus[:, 0])) <= 0.05


@pytest.mark.parametrize("shape", [(67, 101), (64, 64), (9, 130), (1, 1)])
def test_padding_crops_back_exactly(torch_engine: Engine, shape: tuple[int, int]) -> None:
    frame = frames(shape, seed=4)
    image, focus_estimate = infer_frame(torch_engine, frame)
    assert image.shape == shape and image.dtype == np.float32
    height = max(16, -(-shape[0] // 8) * 8)
    width = max(16, -(-shape[1] // 8) * 8)
    if max(height, width) <= 64:  # one pass: identical to running the reflect-padded frame and cropping
        padded = np.pad(frame, ((0, height - shape[0]), (0, width - shape[1])), mode="reflect")
        images, focus = torch_engine.run(padded[None, None])
        np.testing.assert_array_equal(image, images[0, 0, : shape[0], : shape[1]])
        assert (focus_estimate.defocus_um, focus_estimate.log_sigma_um, focus_estimate.magnitude_um) == tuple(
            float(v) for v in focus[0]
        )


def test_tiled_frame_matches_untiled(loaded: Loaded, cache_dir: Path, engine_log: pytest.LogCaptureFixture) -> None:
    frame = frames((150, 203), seed=5)
    whole = TorchEngine(loaded.network, engine_config(cache_dir, max_size_px=256, opt_size_px=256))
    tiled_engine = TorchEngine(loaded.network, engine_config(cache_dir, max_size_px=96, tile_overlap_px=32))
    reference, reference_focus = infer_frame(whole, frame)
    image, focus = infer_frame(tiled_engine, frame)
    assert "event=tiling" in engine_log.text
    assert image.shape == frame.shape
    assert relative_error(image - frame, reference - frame) <= 2e-3
    assert abs(focus.defocus_um - reference_focus.defocus_um) <= 0.05
    assert np.isfinite(focus.log_sigma_um) and focus.magnitude_um >= 0.0


def test_tile_seams_are_invisible(loaded: Loaded, cache_dir: Path) -> None:
    """A flat frame, tiled 3x3, matches the untiled result everywhere and gains no step where tiles meet."""
    flat = np.full((160, 160), 0.5, dtype=np.float32)
    whole = TorchEngine(loaded.network, engine_config(cache_dir, max_size_px=256, opt_size_px=256))
    tiled = TorchEngine(loaded.network, engine_config(cache_dir, max_size_px=64, tile_overlap_px=24))
    reference, _ = infer_frame(whole, flat)
    image, _ = infer_frame(tiled, flat)
    assert np.max(np.abs(image - reference)) <= 1e-3  # a visible seam would be ~1e-2 on this 0..1 scale
    for axis in (0, 1):
        tiled_step = np.max(np.abs(np.diff(image, axis=axis)))
        assert tiled_step <= 1.01 * np.max(np.abs(np.diff(reference, axis=axis)))


def test_frame_outside_the_compiled_range_is_tiled(ort_engine: Engine) -> None:
    frame = frames((130, 75), seed=6)
    with pytest.raises(ShapeOutOfRangeError, match="outside the built range"):
        ort_engine.run(np.pad(frame, ((0, 6), (0, 5)), mode="reflect")[None, None])
    image, focus = infer_frame(ort_engine, frame)
    assert image.shape == frame.shape and np.all(np.isfinite(image))
    assert np.all(np.isfinite([focus.defocus_um, focus.log_sigma_um, focus.magnitude_um]))


def test_batches_match_one_by_one(torch_engine: Engine) -> None:
    batch = frames((6, 1, 32, 64), seed=7)
    images, focus = run_batched(torch_engine, batch)  # 6 frames: batches of 4 and 2
    assert images.shape == batch.shape and focus.shape == (6, 3)
    for k in range(len(batch)):
        image, one = torch_engine.run(batch[k : k + 1])
        np.testing.assert_allclose(images[k], image[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(focus[k], one[0], rtol=0, atol=1e-4)


def test_inverse_variance_focus_combination() -> None:
    combined = combine_focus(np.array([[1.0, np.log(0.1), 1.5], [3.0, np.log(1.0), 3.5]]))
    weights = (1 / 0.01, 1 / 1.0)
    assert combined.defocus_um == pytest.approx((1.0 * weights[0] + 3.0 * weights[1]) / sum(weights))
    assert combined.magnitude_um == pytest.approx((1.5 * weights[0] + 3.5 * weights[1]) / sum(weights))
    # Equal tiles: the uncertainty of one tile (tiles share the specimen, their errors are not independent).
    same = combine_focus(np.array([[2.0, np.log(0.5), 2.0]] * 3))
    assert same.defocus_um == pytest.approx(2.0) and same.log_sigma_um == pytest.approx(np.log(0.5))


class MemoryLimitedEngine:
    """A torch engine on a device that holds at most `budget_px` input pixels per run, as a small GPU would."""

    def __init__(self, inner: Engine, budget_px: int) -> None:
        self.inner, self.budget_px = inner, budget_px
        self.name, self.precision, self.device = inner.name, inner.precision, inner.device
        self.min_size_px, self.max_size_px, self.max_batch = inner.min_size_px, inner.max_size_px, inner.max_batch
        self.stride, self.tile_overlap_px = inner.stride, inner.tile_overlap_px

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if batch.size > self.budget_px:
            raise EngineOutOfMemoryError(f"{batch.size} px do not fit in {self.budget_px}")
        return self.inner.run(batch)


def test_out_of_memory_splits_batches_then_tiles(torch_engine: Engine, engine_log: pytest.LogCaptureFixture) -> None:
    limited = MemoryLimitedEngine(torch_engine, budget_px=32 * 32)
    frame = frames((64, 64), seed=8)
    image, focus = infer_frame(limited, frame)
    assert image.shape == frame.shape and np.isfinite(focus.defocus_um)
    assert "retry_tile_px=32" in engine_log.text
    batch = frames((3, 1, 32, 32), seed=9)
    images, _ = run_batched(limited, batch)
    np.testing.assert_allclose(images, torch_engine.run(batch)[0], rtol=0, atol=1e-5)
    assert "retry_batch=" in engine_log.text


def test_onnx_export_is_cached_and_reused(
    loaded: Loaded, cache_dir: Path, ort_engine: Engine, engine_log: pytest.LogCaptureFixture
) -> None:
    path = onnx_path(cache_dir, loaded.sha256)
    assert path.is_file() and path.name == f"1f2e3d4c5b6a-f{FOCUS_CONTRACT_VERSION}.onnx"  # hash and output contract
    before = path.stat().st_mtime_ns
    again = create_engine(loaded, engine_config(cache_dir, "onnxruntime"))
    assert again.name == "onnxruntime"
    assert path.stat().st_mtime_ns == before
    assert "event=onnx_cache_hit" in engine_log.text and "event=onnx_exported" not in engine_log.text
    assert not list(cache_dir.glob(".*"))  # no temporary files left behind


def test_corrupt_onnx_cache_is_rebuilt(loaded: Loaded, tmp_path: Path, engine_log: pytest.LogCaptureFixture) -> None:
    config = engine_config(tmp_path, "onnxruntime")
    reference = create_engine(loaded, config)
    path = onnx_path(tmp_path, loaded.sha256)
    batch = frames((1, 1, 32, 32), seed=10)
    expected = reference.run(batch)

    path.write_bytes(b"this is not an ONNX model")  # garbage: the checksum no longer matches
    engine = create_engine(loaded, config)
    assert engine.name == "onnxruntime"
    assert "event=onnx_cache_invalid" in engine_log.text and "checksum mismatch" in engine_log.text
    np.testing.assert_array_equal(engine.run(batch)[0], expected[0])

    # Garbage whose checksum was recorded (a file that was broken when written): loading fails, rebuilt.
    engine_log.clear()
    path.write_bytes(b"\x08\x07garbage")
    sidecar = path.with_name(path.name + ".json")
    record = json.loads(sidecar.read_text())
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(record))
    engine = create_engine(loaded, config)
    assert engine.name == "onnxruntime"
    assert "onnxruntime cannot load it" in engine_log.text
    np.testing.assert_array_equal(engine.run(batch)[0], expected[0])


def test_cached_export_of_another_network_is_replaced(
    cache_dir: Path, ort_engine: Engine, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    """A sound file with a valid checksum that does not compute this network is caught by the build-time check."""
    other = Loaded(small_network(seed=1), "abcdef012345" + "0" * 52)
    source = onnx_path(cache_dir, "1f2e3d4c5b6a")
    target = onnx_path(tmp_path, other.sha256)
    target.write_bytes(source.read_bytes())
    sidecar = source.with_name(source.name + ".json")
    target.with_name(target.name + ".json").write_text(sidecar.read_text())
    engine = create_engine(other, engine_config(tmp_path, "onnxruntime"))
    assert engine.name == "onnxruntime"
    assert "it does not reproduce the network" in engine_log.text and "event=onnx_exported" in engine_log.text
    batch = frames((1, 1, 32, 32), seed=11)
    reference = TorchEngine(other.network, engine_config(tmp_path)).run(batch)
    assert relative_error(engine.run(batch)[1], reference[1]) <= FP32_RELATIVE_TOLERANCE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice on a machine without CUDA")
def test_auto_without_cuda_picks_onnxruntime_and_says_why(
    loaded: Loaded, cache_dir: Path, ort_engine: Engine, engine_log: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(loaded, engine_config(cache_dir, "auto"))
    assert engine.name == "onnxruntime"
    passed = [r.getMessage() for r in engine_log.records if "event=engine_passed_over" in r.getMessage()]
    assert len(passed) == 1 and "engine=tensorrt" in passed[0] and "no CUDA device" in passed[0]
    assert "event=engine_selected requested=auto engine=onnxruntime" in engine_log.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_requested_tensorrt_without_cuda_falls_back(
    loaded: Loaded, cache_dir: Path, ort_engine: Engine, engine_log: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(loaded, engine_config(cache_dir, "tensorrt", precision="fp16"))
    assert engine.name == "onnxruntime" and engine.precision == "fp32"
    warning = [r for r in engine_log.records if "engine=tensorrt" in r.getMessage()]
    assert warning and warning[0].levelno == logging.WARNING and "next=onnxruntime" in warning[0].getMessage()


class DataDependent(torch.nn.Module):
    """Honours the output contract, but branches in Python on the frame's content: a traced graph can hold
    only one branch, so an ONNX export cannot reproduce it."""

    stride = 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3))
        scale = 2.0 if float(mean.max()) > 0.25 else 3.0
        return x * scale, torch.stack([mean, torch.zeros_like(mean), mean.abs()], dim=1)


def test_failed_onnx_export_falls_back_to_torch(tmp_path: Path, engine_log: pytest.LogCaptureFixture) -> None:
    engine = create_engine(Loaded(DataDependent().eval(), "9" * 64), engine_config(tmp_path, "auto"))
    assert engine.name == "torch"
    assert 'engine=onnxruntime reason="failed to build:' in engine_log.text
    assert "ONNX export of the network failed: TorchExportError" in engine_log.text
    assert not list(tmp_path.iterdir())  # the unusable export is not left behind
    images, focus = engine.run(np.ones((1, 1, 16, 16), dtype=np.float32))
    assert float(images.max()) == 2.0 and float(focus[0, 0]) == 1.0


def test_shipped_model_runs_alike_on_onnxruntime_and_pytorch(tmp_path: Path) -> None:
    """The real artefact: the shipped weights, loaded as the daemon loads them, exported and run by both."""
    from acquire_refocus.model.checkpoint import load_weights

    shipped = load_weights(None)
    config = engine_config(tmp_path, min_size_px=64, opt_size_px=128, max_size_px=128, max_batch=2)
    ort_engine = create_engine(shipped, config.model_copy(update={"backend": "onnxruntime"}))
    reference = create_engine(shipped, config.model_copy(update={"backend": "torch"}))
    assert (ort_engine.name, reference.name) == ("onnxruntime", "torch")
    assert ort_engine.path.name == f"{shipped.sha256[:12]}-f{FOCUS_CONTRACT_VERSION}.onnx"  # type: ignore[attr-defined]
    batch = frames((2, 1, 64, 96), seed=12)
    images, focus = ort_engine.run(batch)
    expected_images, expected_focus = reference.run(batch)
    assert relative_error(images - batch, expected_images - batch) <= FP32_RELATIVE_TOLERANCE
    assert relative_error(focus, expected_focus) <= FP32_RELATIVE_TOLERANCE
    assert np.max(np.abs(focus[:, 0] - expected_focus[:, 0])) <= 0.05
