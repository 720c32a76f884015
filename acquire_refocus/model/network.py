"""The refocus networks: a U-Net that predicts the in-focus image and, from the same bottleneck features, the
signed defocus, its uncertainty and the unsigned distance to focus.

The focus head reads the bottleneck (FocusHead) or, with model.focus_input: image, the frame through a trunk of
its own (ImageFocusHead).

Every architecture shares one contract, because the engines export it to ONNX / TensorRT unchanged:
eval-mode `forward(x)` returns exactly `(image [N,1,H,W], focus [N,3])` with focus[:, 0] = defocus_um,
focus[:, 1] = log_sigma_um and focus[:, 2] = magnitude_um, the unsigned |defocus| (FOCUS_CONTRACT_VERSION 2;
version 1 had no third column). There is no data-dependent Python control flow, the head pools over the whole
frame (so any H, W that is a multiple of `stride` works), and only convolutions, batch norm, ReLU, sigmoid,
pooling, bilinear resizing by 2 and concatenation are used.

Architectures (ModelConfig.architecture):
- "unet": a compact U-Net (the default, sized for real time).
- "multiscale": the head-to-tail multi-scale U-Net: one U-Net per scale, coarsest first; each coarser scale's
  decoder output is upsampled and fused (sum or concat) into the next finer scale's encoder input.
  `forward_train` returns every scale's output for the multi-scale loss; `forward` returns the finest.
- "resnet34": a U-Net whose encoder is a ResNet-34 (torchvision parameter names, so an ImageNet state dict from a
  local file loads into `network.encoder`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from acquire_refocus.config import FocusInput, ModelConfig, MultiScaleModelConfig, UNetModelConfig
from acquire_refocus.errors import ConfigError

# The focus head predicts defocus in units of this many um, so its raw outputs stay O(1) during training.
DEFOCUS_SCALE_UM = 10.0
# Bumped whenever eval-mode forward's outputs change meaning or shape: exported engines are named by it.
FOCUS_CONTRACT_VERSION = 2
# Rows of the focus head's last layer that give the sign logit and the log sigma (train.calibrate_focus_head
# rescales them).
SIGN_LOGIT_ROW = 1
LOG_SIGMA_ROW = 2
# Share of the frame area added to the pooling weights, so a nearly empty frame does not divide by ~0.
_POOL_FLOOR = 0.01


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    return functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _masked_mean(features: torch.Tensor, weight_logits: torch.Tensor) -> torch.Tensor:
    """[N, C]: features averaged over the frame with a sigmoid weight per cell (plus a floor, see _POOL_FLOOR)."""
    weight = torch.sigmoid(weight_logits)
    floor = _POOL_FLOOR * features.shape[2] * features.shape[3]
    return (features * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + floor)


def _focus_outputs(raw: torch.Tensor) -> torch.Tensor:
    """[N, 4] training outputs from the last linear layer's three rows: defocus_um, log_sigma_um, magnitude_um,
    sign_logit (P(d > 0) = sigmoid(sign_logit))."""
    magnitude_um = functional.softplus(raw[:, 0:1]) * DEFOCUS_SCALE_UM
    sign_logit = raw[:, SIGN_LOGIT_ROW : SIGN_LOGIT_ROW + 1]
    defocus_um = magnitude_um * torch.tanh(0.5 * sign_logit)  # = magnitude * (2 P(d > 0) - 1)
    return torch.cat([defocus_um, raw[:, LOG_SIGMA_ROW : LOG_SIGMA_ROW + 1], magnitude_um, sign_logit], dim=1)


class FocusHead(nn.Module):
    """Signed defocus, log-uncertainty and unsigned defocus from bottleneck features (model.focus_input:
    bottleneck): a 1x1 convolution, pooled over the frame with learnt weights, then two linears.

    The pooling weights (a sigmoid per bottleneck cell) let the head average over the cells that show specimen:
    plain global averaging mixes in the empty background, so the same blur read as less defocus in a sparse
    whole frame than in a training patch full of cells (5.99 against 10.6 um at 8 um defocus).

    The defocus is factored as magnitude * sign: |d| shows directly as blur and is learnt fast, while the sign
    only shows in the subtle above/below asymmetry of the PSF. A single signed output trained with L1 sits at 0
    until the sign is learnt (0 is the best guess when the sign is a coin toss), so training supervises both
    factors (`forward_train` exposes them). Inference returns the product, the log sigma and the magnitude, which
    the focus controller can use on its own where the optics leave the sign ambiguous (focus.sign_source: probe).
    """

    reads_image = False

    def __init__(self, in_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True))
        self.weight = nn.Conv2d(in_channels, 1, 1)
        self.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward_train(self, image: torch.Tensor, bottom: torch.Tensor | None) -> torch.Tensor:
        """[N, 4] (see _focus_outputs) from the bottleneck; `image` is not read."""
        if bottom is None:
            raise ValueError("FocusHead reads the bottleneck features")
        return _focus_outputs(self.fc(_masked_mean(self.reduce(bottom), self.weight(bottom))))

    def forward(self, image: torch.Tensor, bottom: torch.Tensor | None) -> torch.Tensor:
        return self.forward_train(image, bottom)[:, :3]


class ImageFocusHead(nn.Module):
    """The same outputs as FocusHead, read from the normalised frame itself (model.focus_input: image) by a trunk
    of its own: six convolution stages, the first at full resolution, each pooled over the frame with learnt
    weights, then two linears.

    Why: defocus shows first in the finest detail, which five poolings down to the U-Net's bottleneck discard,
    and the bottleneck is shaped for restoring the image, not for measuring blur. Read there, |d| came out
    compressed toward ~2-4 um (2.3 um read in focus, 4.0 at 6 um). Pooling every stage lets the head compare
    fine against coarse structure, which is what blur changes. Measured (tools/reports/robust-model/README.md):
    at 20x it follows |d| better at 3-10 um but reads no lower in focus; at 60x it reads flat, as the bottleneck
    head does. Not in the shipped model."""

    reads_image = True
    widths = (16, 24, 32, 48, 64, 64)

    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        previous = 1
        for level, width in enumerate(self.widths):
            self.stages.append(_conv_block(previous, width, stride=1 if level == 0 else 2))
            previous = width
        self.weights = nn.ModuleList(nn.Conv2d(width, 1, 1) for width in self.widths)
        self.fc = nn.Sequential(nn.Linear(sum(self.widths), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward_train(self, image: torch.Tensor, bottom: torch.Tensor | None) -> torch.Tensor:
        """[N, 4] (see _focus_outputs) from the frame; `bottom` is not read."""
        pooled = []
        x = image
        for stage, weight in zip(self.stages, self.weights, strict=True):
            x = stage(x)
            pooled.append(_masked_mean(x, weight(x)))
        return _focus_outputs(self.fc(torch.cat(pooled, dim=1)))

    def forward(self, image: torch.Tensor, bottom: torch.Tensor | None) -> torch.Tensor:
        return self.forward_train(image, bottom)[:, :3]


def build_focus_head(focus_input: FocusInput, bottleneck_channels: int) -> FocusHead | ImageFocusHead:
    """The focus head `model.focus_input` names."""
    return ImageFocusHead() if focus_input == "image" else FocusHead(bottleneck_channels)


class RefocusNetwork(nn.Module, ABC):
    """What training, export and inference use of every architecture (the contract in the module docstring)."""

    focus_head: FocusHead | ImageFocusHead
    stride: int  # frame sides must be a multiple of this

    @abstractmethod
    def forward_train(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Image outputs (coarsest first where there are several) and the focus head's training outputs."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck features a bottleneck focus head reads, without the image decoder where possible."""

    def forward_focus(self, x: torch.Tensor) -> torch.Tensor:
        """The focus head's training outputs alone (training the head alone; its calibration): an image head
        runs without any of the U-Net."""
        return self.focus_head.forward_train(x, None if self.focus_head.reads_image else self.encode(x))

    @abstractmethod
    def image_decoder(self) -> nn.ModuleList:
        """The modules that shape the image and nothing the focus head reads (training.train_only: decoder)."""


class UNetCore(nn.Module):
    """Encoder-decoder with skip connections; returns (decoder features at full resolution, bottleneck)."""

    def __init__(self, in_channels: int, base_channels: int, depth: int, max_channels: int = 256) -> None:
        super().__init__()
        widths: list[int] = [min(base_channels * 2**level, max_channels) for level in range(depth + 1)]
        self.widths = widths
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths[:-1]:
            self.encoders.append(_conv_block(previous, width))
            previous = width
        self.bottleneck = _conv_block(widths[-2], widths[-1])
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.decoders.append(_conv_block(widths[level + 1] + widths[level], widths[level]))

    @property
    def out_channels(self) -> int:
        return self.widths[0]

    @property
    def bottleneck_channels(self) -> int:
        return self.widths[-1]

    def forward(self, x: torch.Tensor, inject: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`inject` (same shape as the first encoder block's output) is added to it: head-to-tail sum fusion."""
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level == 0 and inject is not None:
                x = x + inject
            skips.append(x)
            x = functional.max_pool2d(x, 2)
        bottom = self.bottleneck(x)
        x = bottom
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([_upsample2(x), skip], dim=1))
        return x, bottom

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck alone (what the focus head reads), without the decoder."""
        for encoder in self.encoders:
            x = functional.max_pool2d(encoder(x), 2)
        bottom: torch.Tensor = self.bottleneck(x)
        return bottom


class RefocusUNet(RefocusNetwork):
    """The default network: U-Net predicting a residual on the (normalised) input, plus the focus head."""

    def __init__(self, base_channels: int = 16, depth: int = 4, focus_input: FocusInput = "bottleneck") -> None:
        super().__init__()
        self.core = UNetCore(1, base_channels, depth)
        self.to_image = nn.Conv2d(self.core.out_channels, 1, 1)
        self.focus_head = build_focus_head(focus_input, self.core.bottleneck_channels)
        self.stride = 2**depth

    def forward_train(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features, bottom = self.core(x)
        return [x + self.to_image(features)], self.focus_head.forward_train(x, bottom)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, bottom = self.core(x)
        return x + self.to_image(features), self.focus_head(x, bottom)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.encode(x)

    def image_decoder(self) -> nn.ModuleList:
        """The modules that shape the image and nothing the focus head reads (training.train_only: decoder)."""
        return nn.ModuleList([self.core.decoders, self.to_image])


class MultiScaleUNet(RefocusNetwork):
    """Head-to-tail multi-scale U-Net: coarse-to-fine, each coarser scale's decoder output feeds the finer
    scale's encoder (by summation after a 1x1 projection, or by concatenation)."""

    def __init__(
        self,
        base_channels: int = 16,
        depth: int = 4,
        scales: int = 3,
        fusion: str = "sum",
        focus_input: FocusInput = "bottleneck",
    ) -> None:
        super().__init__()
        if fusion not in ("sum", "concat"):
            raise ConfigError(f"model.fusion must be 'sum' or 'concat', got {fusion!r}")
        self.scales = scales
        self.fusion = fusion
        self.stride = 2 ** (depth + scales - 1)
        self.cores = nn.ModuleList()
        self.to_images = nn.ModuleList()
        for scale in range(scales):  # 0 = coarsest
            # concat: the coarser decoder features join the input channels; sum: they are added to the output of
            # the first encoder block (both have base_channels channels).
            in_channels = 1 + base_channels if scale > 0 and fusion == "concat" else 1
            core = UNetCore(in_channels, base_channels, depth)
            self.cores.append(core)
            self.to_images.append(nn.Conv2d(core.out_channels, 1, 1))
        self.focus_head = build_focus_head(focus_input, core.bottleneck_channels)  # the finest scale's bottleneck

    def _pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [x]
        for _ in range(self.scales - 1):
            levels.append(functional.avg_pool2d(levels[-1], 2))
        return levels[::-1]  # coarsest first

    def _scales(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs: list[torch.Tensor] = []
        coarse_features: torch.Tensor | None = None
        bottom = x
        for scale, level in enumerate(self._pyramid(x)):
            if coarse_features is None:
                features, bottom = self.cores[scale](level)
            elif self.fusion == "sum":
                features, bottom = self.cores[scale](level, inject=_upsample2(coarse_features))
            else:
                features, bottom = self.cores[scale](torch.cat([level, _upsample2(coarse_features)], dim=1))
            outputs.append(level + self.to_images[scale](features))
            coarse_features = features
        return outputs, bottom

    def forward_train(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs at every scale (coarsest first, each at its own resolution) and the focus of the finest."""
        outputs, bottom = self._scales(x)
        return outputs, self.focus_head.forward_train(x, bottom)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, bottom = self._scales(x)
        return outputs[-1], self.focus_head(x, bottom)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The finest scale's bottleneck (its encoder needs every coarser decoder)."""
        return self._scales(x)[1]

    def image_decoder(self) -> nn.ModuleList:
        """The finest scale's decoder: every coarser one feeds the encoder the focus head reads."""
        return nn.ModuleList([cast(UNetCore, self.cores[-1]).decoders, self.to_images[-1]])


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's parameter names (conv1, bn1, conv2, bn2, downsample.0/1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        activated: torch.Tensor = self.relu(out + identity)
        return activated


class ResNet34Encoder(nn.Module):
    """ResNet-34 without its classifier, named like torchvision's so ImageNet state dicts load by name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 3, 1)
        self.layer2 = self._layer(64, 128, 4, 2)
        self.layer3 = self._layer(128, 256, 6, 2)
        self.layer4 = self._layer(256, 512, 3, 2)

    @staticmethod
    def _layer(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 2, 4, 8, 16, 32."""
        x0 = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x0, x1, x2, x3, x4]

    def load_pretrained(self, path: Path) -> None:
        """Load a torchvision-format ResNet-34 state dict (the `fc.*` classifier is ignored)."""
        if not Path(path).is_file():
            raise ConfigError(f"model.pretrained_encoder: {path} not found (a local torchvision ResNet-34 state dict)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a config mistake
            raise ConfigError(
                f"model.pretrained_encoder: {path} is not a readable PyTorch state dict ({exc})"
            ) from None
        if not isinstance(state, dict):
            raise ConfigError(f"model.pretrained_encoder: {path} does not hold a state dict")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"model.pretrained_encoder: {path} is not a torchvision ResNet-34 state dict "
                f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ConfigError(
                    f"model.pretrained_encoder: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
        self.load_state_dict(state)


class ResNet34UNet(RefocusNetwork):
    """U-Net with a ResNet-34 encoder. The grey input is repeated to the three channels ImageNet weights expect."""

    def __init__(self, base_channels: int = 16, focus_input: FocusInput = "bottleneck") -> None:
        super().__init__()
        self.encoder = ResNet34Encoder()
        self.stride = 32
        enc = [64, 64, 128, 256, 512]
        dec = [base_channels * 8, base_channels * 4, base_channels * 2, base_channels * 2, base_channels]
        self.decoders = nn.ModuleList()
        previous = enc[4]
        for skip, width in zip([enc[3], enc[2], enc[1], enc[0]], dec[:4], strict=True):
            self.decoders.append(_conv_block(previous + skip, width))
            previous = width
        self.full_res = _conv_block(previous + 1, dec[4])
        self.to_image = nn.Conv2d(dec[4], 1, 1)
        self.focus_head = build_focus_head(focus_input, enc[4])

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x.expand(-1, 3, -1, -1))
        y = features[4]
        for decoder, skip in zip(self.decoders, [features[3], features[2], features[1], features[0]], strict=True):
            y = decoder(torch.cat([_upsample2(y), skip], dim=1))
        y = self.full_res(torch.cat([_upsample2(y), x], dim=1))
        return x + self.to_image(y), features[4]

    def forward_train(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        image, bottom = self._decode(x)
        return [image], self.focus_head.forward_train(x, bottom)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, bottom = self._decode(x)
        return image, self.focus_head(x, bottom)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        bottom: torch.Tensor = self.encoder(x.expand(-1, 3, -1, -1))[4]
        return bottom

    def image_decoder(self) -> nn.ModuleList:
        """The modules that shape the image and nothing the focus head reads (training.train_only: decoder)."""
        return nn.ModuleList([self.decoders, self.full_res, self.to_image])


def build_network(model_config: ModelConfig, *, load_pretrained: bool = True) -> RefocusNetwork:
    """The network named by `model_config.architecture`, freshly initialised (ImageNet encoder weights only from
    `model_config.pretrained_encoder`, and only when `load_pretrained`)."""
    if isinstance(model_config, UNetModelConfig):
        return RefocusUNet(model_config.base_channels, model_config.depth, model_config.focus_input)
    if isinstance(model_config, MultiScaleModelConfig):
        return MultiScaleUNet(
            model_config.base_channels,
            model_config.depth,
            model_config.scales,
            model_config.fusion,
            model_config.focus_input,
        )
    network = ResNet34UNet(model_config.base_channels, model_config.focus_input)
    if load_pretrained and model_config.pretrained_encoder is not None:
        network.encoder.load_pretrained(model_config.pretrained_encoder)
    return network


def parameter_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())
