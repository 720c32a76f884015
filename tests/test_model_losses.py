"""Loss terms: image fidelity, multi-scale, VGG-16 feature loss from a local file, robust defocus loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from acquire_refocus.config import LossConfig
from acquire_refocus.errors import ConfigError
from acquire_refocus.model.losses import RefocusLoss, defocus_loss, psnr_gain_loss, structural_loss


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _images(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.rand(2, 1, size, size)
    return target + 0.2 * torch.randn_like(target), target


@pytest.mark.parametrize("size", [64, 128, 200])
def test_structural_loss_is_zero_for_a_perfect_image_and_positive_otherwise(size: int) -> None:
    noisy, target = _images(size)
    assert float(structural_loss(target, target)) == pytest.approx(0.0, abs=1e-5)
    assert float(structural_loss(noisy, target)) > 0.05


def test_defocus_loss_rewards_accurate_and_honest_estimates() -> None:
    truth = torch.tensor([5.0, -12.0, 0.5])
    good = torch.stack([truth + 0.1, torch.full_like(truth, -2.0)], dim=1)  # sigma ~0.14 um, error 0.1 um
    bad = torch.stack([truth + 4.0, torch.full_like(truth, -2.0)], dim=1)
    honest = torch.stack([truth + 4.0, torch.full_like(truth, 1.4)], dim=1)  # sigma ~4 um for a 4 um error
    assert float(defocus_loss(good, truth, 1.0)) < float(defocus_loss(bad, truth, 1.0))
    assert float(defocus_loss(honest, truth, 1.0)) < float(defocus_loss(bad, truth, 1.0))


def test_training_outputs_supervise_magnitude_and_sign() -> None:
    """Columns 3 and 4 (magnitude, sign logit): a right sign costs less than a wrong one at equal magnitude."""
    truth = torch.tensor([8.0, -8.0])
    right = torch.tensor([[0.0, 0.0, 8.0, 4.0], [0.0, 0.0, 8.0, -4.0]])
    wrong = torch.tensor([[0.0, 0.0, 8.0, -4.0], [0.0, 0.0, 8.0, 4.0]])
    assert float(defocus_loss(right, truth, 1.0)) + 1.0 < float(defocus_loss(wrong, truth, 1.0))


def test_log_magnitude_loss_weighs_an_error_near_focus_above_the_same_error_far_from_it() -> None:
    """log_l1: 1 um wrong in focus costs as much as 30 um wrong at 30 um would in relative terms, far more than
    1 um wrong at 30 um; the Huber loss prices both 1 um errors alike. Only the magnitude column differs."""

    def cost(magnitude_um: float, truth_um: float, kind: str) -> float:
        focus = torch.tensor([[truth_um, 0.0, magnitude_um, 10.0]])  # signed estimate exact, sign sure
        return float(defocus_loss(focus, torch.tensor([truth_um]), 1.0, kind))

    exact_near, exact_far = cost(0.0, 0.0, "log_l1"), cost(30.0, 30.0, "log_l1")
    near = cost(1.0, 0.0, "log_l1") - exact_near
    far = cost(31.0, 30.0, "log_l1") - exact_far
    assert near == pytest.approx(10.0 * math.log(2.0), rel=1e-4)
    assert far == pytest.approx(10.0 * math.log(32.0 / 31.0), rel=1e-4)
    assert near > 20 * far
    huber_near = cost(1.0, 0.0, "huber") - cost(0.0, 0.0, "huber")
    huber_far = cost(31.0, 30.0, "huber") - cost(30.0, 30.0, "huber")
    assert huber_near == pytest.approx(huber_far, rel=1e-4)


def test_defocus_loss_is_robust_to_one_wild_estimate() -> None:
    """Huber: a 100 um outlier pulls on the estimate no harder than a 1 um error (gradient bounded by delta / N);
    the likelihood term sees the estimate detached, so it only teaches sigma."""
    truth = torch.zeros(4)
    focus = torch.stack([torch.tensor([0.0, 0.0, 1.0, 100.0]), torch.zeros(4)], dim=1).requires_grad_(True)
    defocus_loss(focus, truth, 1.0).backward()
    grad = focus.grad[:, 0]
    assert float(grad[3]) == pytest.approx(float(grad[2])) == pytest.approx(1.0 / 4)
    assert float(focus.grad[3, 1]) < 0  # the wild sample asks for a larger sigma


def test_multiscale_term_uses_the_coarse_outputs() -> None:
    _, target = _images(64)
    criterion = RefocusLoss(LossConfig(multiscale_weight=1.0))
    coarse_good = torch.nn.functional.avg_pool2d(target, 2)
    focus = torch.zeros(2, 2)
    d = torch.zeros(2)
    good = criterion([coarse_good, target], focus, target, d, target)
    bad = criterion([coarse_good + 0.5, target], focus, target, d, target)
    assert bad.parts["multiscale"] > good.parts["multiscale"] + 0.1
    assert good.parts["l1"] == pytest.approx(0.0, abs=1e-6)


def test_l2_term_is_the_weighted_mean_squared_error() -> None:
    target = torch.zeros(2, 1, 32, 32)
    prediction = target + 0.1
    terms = RefocusLoss(LossConfig(l1_weight=0.0, ms_ssim_weight=0.0, l2_weight=20.0, defocus_weight=0.0))(
        [prediction], torch.zeros(2, 3), target, torch.zeros(2), target
    )
    assert terms.parts == {"l2": pytest.approx(20.0 * 0.01)}


def test_psnr_gain_term_is_minus_the_mean_gain_that_evaluation_reports() -> None:
    """Two patches: one restored to a tenth of its raw error (+20 dB), one left as it was (0 dB): -10 dB; the
    gain is that of skimage's PSNR with any data range (it cancels)."""
    from skimage.metrics import peak_signal_noise_ratio

    target = torch.rand(2, 1, 32, 32)
    raw = target + 0.3 * torch.randn_like(target)  # errors well above the term's 1e-6 MSE floor
    prediction = torch.stack([target[0] + 0.1 * (raw[0] - target[0]), raw[1]])
    terms = RefocusLoss(LossConfig(l1_weight=0.0, ms_ssim_weight=0.0, psnr_gain_weight=0.5, defocus_weight=0.0))(
        [prediction], torch.zeros(2, 3), target, torch.zeros(2), raw
    )
    assert terms.parts == {"psnr_gain": pytest.approx(0.5 * -10.0, abs=0.01)}
    truth, noisy, restored = (t[0, 0].double().numpy() for t in (target, raw, prediction))
    gain = peak_signal_noise_ratio(truth, restored, data_range=1.0) - peak_signal_noise_ratio(
        truth, noisy, data_range=1.0
    )
    assert gain == pytest.approx(20.0, abs=1e-3)


def test_psnr_gain_term_weighs_a_bright_patch_by_its_relative_error() -> None:
    """A bright patch (raw error 0.01 in normalised units) and a dim one (0.1), each output as wrong as its raw
    frame: MSE pulls 10x harder on the dim patch, the gain term 10x harder on the bright one. With equal output
    errors both pull alike."""
    target = torch.zeros(2, 1, 16, 16)
    raw = torch.stack([target[0] + 0.01, target[1] + 0.1])
    prediction = (target + 0.01).requires_grad_(True)
    psnr_gain_loss(prediction, target, raw).backward()
    per_patch = prediction.grad.abs().sum(dim=(1, 2, 3))
    assert float(per_patch[0] / per_patch[1]) == pytest.approx(1.0, rel=1e-3)  # the same output error ...
    pulled = raw.clone().requires_grad_(True)  # ... and each patch as wrong as its raw frame
    psnr_gain_loss(pulled, target, raw).backward()
    gradient = pulled.grad.abs().sum(dim=(1, 2, 3))
    assert float(gradient[0] / gradient[1]) == pytest.approx(10.0, rel=0.02)  # 1 / error: 10x per pixel error
    mse = torch.nn.functional.mse_loss
    pulled.grad = None
    (mse(pulled[0], target[0]) + mse(pulled[1], target[1])).backward()
    assert float(pulled.grad[0].abs().sum() / pulled.grad[1].abs().sum()) == pytest.approx(0.1, rel=1e-3)


def test_feature_loss_without_a_weights_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="feature_network_weights"):
        RefocusLoss(LossConfig(perceptual_weight=0.1))


def _vgg_file(tmp_path: Path) -> Path:
    """A randomly initialised VGG-16 `features` stack saved with torchvision's key names."""
    layers, channels = [], 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512):
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU()]
            channels = item
    state = {f"features.{k}": v for k, v in torch.nn.Sequential(*layers).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a torchvision file has a classifier too; it is ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    return path


def test_feature_and_gram_loss_from_a_local_vgg16_file(tmp_path: Path) -> None:
    criterion = RefocusLoss(
        LossConfig(perceptual_weight=1.0, gram_weight=1.0, feature_network_weights=_vgg_file(tmp_path))
    )
    noisy, target = _images(64)
    focus, d = torch.zeros(2, 2), torch.zeros(2)
    same = criterion([target], focus, target, d, noisy)
    different = criterion([noisy], focus, target, d, noisy)
    assert same.parts["perceptual"] == pytest.approx(0.0, abs=1e-6)
    assert different.parts["perceptual"] > 0 and different.parts["gram"] > 0
    assert not any(p.requires_grad for p in criterion.features.parameters())


def test_feature_loss_rejects_a_file_that_is_not_vgg16(tmp_path: Path) -> None:
    path = tmp_path / "not-vgg.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ConfigError, match="not a torchvision VGG-16"):
        RefocusLoss(LossConfig(perceptual_weight=1.0, feature_network_weights=path))
