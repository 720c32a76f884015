"""Training losses: image fidelity (L1 + MS-SSIM, optionally L2 and the PSNR gain over the raw frame), the
multi-scale loss of the head-to-tail network, an optional VGG-16 feature (perceptual + gram) loss, and a robust
loss on the defocus estimate with a Gaussian NLL that teaches the head its own uncertainty.

All image terms work on normalised intensities (see normalization.py), where the in-focus target of a typical
frame spans about [0, 1]; SSIM uses data_range = 1.0 on that scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pytorch_msssim import ms_ssim, ssim
from torch import nn
from torch.nn import functional

from acquire_refocus.config import LossConfig, MagnitudeLoss
from acquire_refocus.errors import ConfigError

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Outputs of relu1_2, relu2_2, relu3_3, relu4_3 (indices into torchvision's vgg16().features).
_VGG16_TAPS = (3, 8, 15, 22)
# A wrong sign costs 2|d| in the final estimate; this weight makes the sign term comparable to the magnitude term.
DEFOCUS_SIGN_WEIGHT = 5.0
# The log-L1 magnitude term's weight: its gradient is this / (1 + |d| / um) per um, so 10 in focus (where the Huber
# terms give 1) and about 0.3 at 30 um.
LOG_MAGNITUDE_WEIGHT = 10.0
# Added to both MSEs of psnr_gain_loss: 60 dB below a target spanning [0, 1], so an empty or perfectly restored patch
# neither divides by zero nor takes the batch's gradient.
_PSNR_FLOOR_MSE = 1e-6
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def structural_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM with as many scales and as wide a window as the patch allows (pytorch-msssim needs the smaller
    side > (win - 1) * 16); plain SSIM below that. data_range = 1.0 (normalised intensities)."""
    side = min(prediction.shape[-2:])
    for win_size in (11, 9, 7, 5, 3):
        if side > (win_size - 1) * 16:
            levels = 5 if win_size == 11 else 3
            weights = list(_MS_SSIM_WEIGHTS[:levels])
            total = sum(weights)
            similarity: torch.Tensor = ms_ssim(  # pytorch_msssim is untyped
                prediction, target, data_range=1.0, win_size=win_size, weights=[w / total for w in weights]
            )
            return 1.0 - similarity
    similarity = ssim(prediction, target, data_range=1.0, win_size=7)
    return 1.0 - similarity


def psnr_gain_loss(prediction: torch.Tensor, target: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Minus the mean PSNR gain (dB) of `prediction` over `raw`, each patch against its `target`:
    10 log10(MSE(prediction) / MSE(raw)). Its gradient on a patch is that of its MSE divided by the MSE itself, so
    a bright patch whose errors are small in normalised units weighs as much as a dim one: with MSE or L1 alone,
    the dim patches' noise dominates the batch and bright ones, where the evaluation measures the least gain, are
    learnt least. The raw frame's MSE does not change the gradient; it makes the value read as a gain."""
    dims = tuple(range(1, target.ndim))
    output_mse = ((prediction - target) ** 2).mean(dim=dims)
    raw_mse = ((raw - target) ** 2).mean(dim=dims)
    return (10.0 * torch.log10((output_mse + _PSNR_FLOOR_MSE) / (raw_mse + _PSNR_FLOOR_MSE))).mean()


def defocus_loss(
    focus: torch.Tensor, defocus_um: torch.Tensor, huber_delta_um: float, magnitude_loss: MagnitudeLoss = "huber"
) -> torch.Tensor:
    """Huber loss on the defocus (robust to the occasional empty, unestimable patch) plus the Gaussian negative
    log-likelihood of the error under the predicted sigma. The NLL sees the defocus estimate detached, so the
    estimate itself is trained by the Huber terms alone and sigma learns to match the actual error.

    With the training outputs of a focus head (4 columns) the two factors are supervised too: the magnitude
    (Huber in um, or with `magnitude_loss` "log_l1" an L1 on log(1 + |d|), LOG_MAGNITUDE_WEIGHT times) and the
    sign (logistic loss, weighted down within 1 um of focus where the sign hardly matters).
    """
    estimate_um = focus[:, 0]
    log_sigma_um = focus[:, 1].clamp(-6.0, 6.0)
    loss = functional.huber_loss(estimate_um, defocus_um, delta=huber_delta_um)
    if focus.shape[1] >= 4:
        if magnitude_loss == "log_l1":
            loss = loss + LOG_MAGNITUDE_WEIGHT * functional.l1_loss(
                torch.log1p(focus[:, 2]), torch.log1p(defocus_um.abs())
            )
        else:
            loss = loss + functional.huber_loss(focus[:, 2], defocus_um.abs(), delta=huber_delta_um)
        sign_weight = defocus_um.abs().clamp(max=1.0)
        loss = loss + DEFOCUS_SIGN_WEIGHT * functional.binary_cross_entropy_with_logits(
            focus[:, 3], (defocus_um > 0).to(focus.dtype), weight=sign_weight
        )
    error = estimate_um.detach() - defocus_um
    nll = 0.5 * (error * torch.exp(-log_sigma_um)) ** 2 + log_sigma_um
    return loss + nll.mean()


class VGG16Features(nn.Module):
    """VGG-16 `features` built locally with torchvision's indices, loaded from a local state dict file."""

    mean: torch.Tensor  # ImageNet normalisation (registered buffers)
    std: torch.Tensor

    def __init__(self, weights_path: Path) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers[: _VGG16_TAPS[-1] + 1])  # nothing past relu4_3 is used
        self._load(Path(weights_path))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"loss.feature_network_weights: {path} not found (a local torchvision VGG-16 state dict)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a config mistake
            raise ConfigError(f"loss.feature_network_weights: {path} is not a readable state dict ({exc})") from None
        own = self.state_dict()
        wanted = {}
        for key in own:
            source = f"features.{key.removeprefix('features.')}"
            if source not in state or tuple(state[source].shape) != tuple(own[key].shape):
                raise ConfigError(
                    f"loss.feature_network_weights: {path} is not a torchvision VGG-16 state dict "
                    f"(no matching {source})"
                )
            wanted[key] = state[source]
        self.load_state_dict(wanted)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image.clamp(0.0, 1.0).expand(-1, 3, -1, -1) - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _VGG16_TAPS:
                taps.append(x)
        return taps


def _gram(features: torch.Tensor) -> torch.Tensor:
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, float]


class RefocusLoss(nn.Module):
    """The weighted sum of every enabled term, with each term's value reported for the training log."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.features: VGG16Features | None = None
        if config.perceptual_weight > 0 or config.gram_weight > 0:
            if config.feature_network_weights is None:
                raise ConfigError(
                    "loss.perceptual_weight / gram_weight > 0 needs loss.feature_network_weights: a local "
                    "torchvision-format VGG-16 state dict file (nothing is downloaded)"
                )
            self.features = VGG16Features(config.feature_network_weights)

    def _image_terms(
        self, prediction: torch.Tensor, target: torch.Tensor, raw: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.config.psnr_gain_weight > 0:
            terms["psnr_gain"] = self.config.psnr_gain_weight * psnr_gain_loss(prediction, target, raw)
        if self.config.l1_weight > 0:
            terms["l1"] = self.config.l1_weight * functional.l1_loss(prediction, target)
        if self.config.l2_weight > 0:
            terms["l2"] = self.config.l2_weight * functional.mse_loss(prediction, target)
        if self.config.ms_ssim_weight > 0:
            terms["ms_ssim"] = self.config.ms_ssim_weight * structural_loss(prediction, target)
        if self.features is not None:
            predicted_taps = self.features(prediction)
            target_taps = self.features(target)
            if self.config.perceptual_weight > 0:
                terms["perceptual"] = self.config.perceptual_weight * sum(
                    (functional.l1_loss(p, t) for p, t in zip(predicted_taps, target_taps, strict=True)),
                    prediction.new_zeros(()),
                )
            if self.config.gram_weight > 0:
                terms["gram"] = self.config.gram_weight * sum(
                    (functional.l1_loss(_gram(p), _gram(t)) for p, t in zip(predicted_taps, target_taps, strict=True)),
                    prediction.new_zeros(()),
                )
        return terms

    def forward(
        self,
        outputs: list[torch.Tensor],
        focus: torch.Tensor,
        target: torch.Tensor,
        defocus_um: torch.Tensor,
        raw: torch.Tensor,
    ) -> LossTerms:
        """`outputs`: the network's images, coarsest first, finest (full resolution) last; `raw`: its input."""
        terms = self._image_terms(outputs[-1], target, raw)
        if len(outputs) > 1 and self.config.multiscale_weight > 0:
            coarse_total = torch.zeros((), device=target.device)
            for output in outputs[:-1]:
                factor = target.shape[-1] // output.shape[-1]
                coarse_target = functional.avg_pool2d(target, factor)
                coarse_total = coarse_total + functional.l1_loss(output, coarse_target)
                if min(output.shape[-2:]) >= 16 and self.config.ms_ssim_weight > 0:
                    coarse_total = coarse_total + self.config.ms_ssim_weight * structural_loss(output, coarse_target)
            terms["multiscale"] = self.config.multiscale_weight * coarse_total / (len(outputs) - 1)
        if self.config.defocus_weight > 0:
            terms["defocus"] = self.config.defocus_weight * defocus_loss(
                focus, defocus_um, self.config.defocus_huber_delta_um, self.config.defocus_magnitude_loss
            )
        total = torch.stack(list(terms.values())).sum()
        return LossTerms(total=total, parts={name: float(value.detach()) for name, value in terms.items()})
