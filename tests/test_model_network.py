"""The refocus networks: shapes at any stride multiple, the export contract, the multi-scale outputs, ResNet-34
weight loading by torchvision names, and the intensity normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acquire_refocus.config import MultiScaleModelConfig, ResNet34ModelConfig, UNetModelConfig
from acquire_refocus.errors import ConfigError
from acquire_refocus.model.network import MultiScaleUNet, ResNet34Encoder, build_network
from acquire_refocus.model.normalization import NormalizationParams, denormalize, frame_scale, normalize

ARCHITECTURES = {
    "unet": UNetModelConfig(base_channels=4, depth=3),
    "multiscale-sum": MultiScaleModelConfig(base_channels=4, depth=2, scales=3, fusion="sum"),
    "multiscale-concat": MultiScaleModelConfig(base_channels=4, depth=2, scales=2, fusion="concat"),
    "resnet34": ResNet34ModelConfig(base_channels=4),
    "unet, image focus head": UNetModelConfig(base_channels=4, depth=3, focus_input="image"),
    "multiscale, image focus head": MultiScaleModelConfig(base_channels=4, depth=2, scales=2, focus_input="image"),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_eval_forward_returns_image_and_focus_at_odd_multiples_of_the_stride(name: str) -> None:
    network = build_network(ARCHITECTURES[name]).eval()
    stride = network.stride
    for height, width in ((3 * stride, 5 * stride), (max(64, stride), max(64, stride) + stride)):
        x = torch.rand(2, 1, height, width)
        with torch.no_grad():
            outputs = network(x)
        assert isinstance(outputs, tuple) and len(outputs) == 2
        image, focus = outputs
        assert isinstance(image, torch.Tensor) and isinstance(focus, torch.Tensor)
        assert image.shape == (2, 1, height, width)
        assert focus.shape == (2, 3)  # defocus_um, log_sigma_um, magnitude_um
        assert torch.isfinite(image).all() and torch.isfinite(focus).all()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_focus_head_alone_sees_what_the_full_forward_gives_it(name: str) -> None:
    """forward_focus (head-only training skips the decoder) must feed the head the same features as forward."""
    network = build_network(ARCHITECTURES[name]).eval()
    x = torch.rand(2, 1, 2 * network.stride, 3 * network.stride)
    with torch.no_grad():
        _, focus = network(x)
        alone = network.forward_focus(x)
    assert alone.shape == (2, 4)  # defocus_um, log_sigma_um, magnitude_um, sign_logit
    torch.testing.assert_close(alone[:, :3], focus)
    torch.testing.assert_close(alone[:, 0], alone[:, 2] * torch.tanh(0.5 * alone[:, 3]))


@pytest.mark.parametrize("name", ["unet, image focus head", "multiscale, image focus head"])
def test_image_focus_head_reads_the_frame_not_the_unet(name: str) -> None:
    """focus_input: image: changing every U-Net weight leaves the focus outputs as they were and changes the image;
    changing the frame changes them."""
    network = build_network(ARCHITECTURES[name]).eval()
    x = torch.rand(1, 1, 2 * network.stride, 2 * network.stride)
    with torch.no_grad():
        image, focus = network(x)
        for parameter_name, parameter in network.named_parameters():
            if not parameter_name.startswith("focus_head."):
                parameter.add_(0.3)
        image_after, focus_after = network(x)
        _, focus_other_frame = network(x.flip(-1) ** 2)
    torch.testing.assert_close(focus_after, focus)
    assert not torch.allclose(image_after, image)
    assert not torch.allclose(focus_other_frame, focus)


def test_parameter_count_of_the_default_unet_suits_real_time() -> None:
    count = sum(p.numel() for p in build_network(UNetModelConfig()).parameters())
    assert 500_000 <= count <= 2_000_000


def test_multiscale_training_outputs_every_scale_and_eval_returns_the_finest() -> None:
    network = build_network(ARCHITECTURES["multiscale-sum"]).eval()
    assert isinstance(network, MultiScaleUNet)
    x = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        outputs, focus = network.forward_train(x)
        image, focus_eval = network(x)
    assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 24), (32, 48), (64, 96)]
    torch.testing.assert_close(outputs[-1], image)
    assert focus.shape == (1, 4)  # training adds magnitude and sign logit
    torch.testing.assert_close(focus[:, :3], focus_eval)


def test_multiscale_fusion_feeds_the_coarse_scale_into_the_fine_one() -> None:
    """Head-to-tail: changing only the coarsest scale's weights changes the finest output."""
    network = build_network(ARCHITECTURES["multiscale-sum"]).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before, _ = network(x)
        for parameter in network.cores[0].parameters():
            parameter.add_(0.5)
        after, _ = network(x)
    assert not torch.allclose(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multiscale-sum", "unet, image focus head"])
def test_network_exports_to_onnx_with_dynamic_size(name: str, tmp_path: Path) -> None:
    """Through the engines' own exporter, then ONNX Runtime at a size and batch other than the export example."""
    import onnxruntime

    from acquire_refocus.engines.onnx_engine import export_onnx

    network = build_network(ARCHITECTURES[name]).eval()
    path = export_onnx(network, tmp_path / "network.onnx", "0" * 64, example_size_px=64)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 1, 96, 160), dtype=np.float32)
    image, focus = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected_image, expected_focus = network(torch.from_numpy(x))
    np.testing.assert_allclose(image, expected_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(focus, expected_focus.numpy(), atol=1e-4)


def _torchvision_style_resnet34_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {
        k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v
        for k, v in ResNet34Encoder().state_dict().items()
    }
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_resnet34_encoder_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    state = _torchvision_style_resnet34_state(1)
    assert "layer2.0.downsample.0.weight" in state and "layer4.2.bn2.running_var" in state
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    network = build_network(ResNet34ModelConfig(base_channels=4, pretrained_encoder=path))
    torch.testing.assert_close(network.encoder.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(network.encoder.layer4[2].bn2.running_var, state["layer4.2.bn2.running_var"])


def test_resnet34_rejects_a_file_that_is_not_a_resnet34(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ConfigError, match="not a torchvision ResNet-34"):
        build_network(ResNet34ModelConfig(pretrained_encoder=path))
    with pytest.raises(ConfigError, match="not found"):
        build_network(ResNet34ModelConfig(pretrained_encoder=tmp_path / "missing.pth"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int32])
def test_normalisation_round_trip_for_any_offset_and_brightness(dtype: type) -> None:
    rng = np.random.default_rng(3)
    high = 200 if dtype == np.uint8 else 40_000
    frame = (rng.random((70, 90)) * high + 7).astype(dtype)
    intensity = frame_scale(frame)
    normalised = normalize(frame, intensity)
    assert normalised.dtype == np.float32
    low, top = np.percentile(normalised, [1.0, 99.8])
    assert abs(low) < 1e-5 and abs(top - 1.0) < 1e-5
    np.testing.assert_allclose(denormalize(normalised, intensity), frame.astype(np.float64), rtol=1e-6, atol=1e-3)


def test_normalisation_is_invariant_to_camera_offset_and_gain() -> None:
    frame = np.random.default_rng(4).random((80, 80)) * 1000
    shifted = 3.5 * frame + 100
    np.testing.assert_allclose(
        normalize(frame, frame_scale(frame)), normalize(shifted, frame_scale(shifted)), atol=1e-5
    )


def test_constant_frame_has_a_degenerate_scale() -> None:
    assert frame_scale(np.full((64, 64), 12, np.uint16)).is_degenerate
    nearly = np.zeros((64, 64))
    nearly[3, 3] = 5.0  # constant but for one pixel: the full range is used rather than a zero scale
    intensity = frame_scale(nearly, NormalizationParams())
    assert not intensity.is_degenerate and intensity.scale == pytest.approx(5.0)
