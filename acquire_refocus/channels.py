"""Which channels drive the focus loop and which ones the network refocuses.

Why: a time-lapse images a nuclear stain beside other labels. The focus loop must fit one channel's frames (a
DAPI and a GFP frame at the same Z differ in sharpness, so pooling them biases the fit), and a network trained for
one stain and wavelength must not be trusted on another: those frames are kept raw (saved, published, logged as
skipped with the reason) unless the user asks for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import useq

from acquire_refocus.config import FocusConfig, OpticsConfig, PipelineConfig
from acquire_refocus.errors import ConfigError
from acquire_refocus.pipeline import ChannelPolicy

# A model is trusted for emission wavelengths within this fraction of the one it was trained for. The PSF's width
# and its defocus blur scale with the wavelength; 10% (415-507 nm for the shipped 461 nm model: DAPI / Hoechst
# but not GFP) is a conservative choice, not a measured limit of the network.
WAVELENGTH_ENVELOPE_FRACTION = 0.10


def sequence_channels(sequence: useq.MDASequence) -> list[str]:
    """The channel preset names of a sequence, in its order; none when its axis_order leaves out the channel
    axis (useq then acquires no channel at all)."""
    if "c" not in sequence.axis_order:
        return []
    return [channel.config for channel in sequence.channels]


def driving_channel(focus: FocusConfig, channels: Sequence[str]) -> str | None:
    """The channel whose frames drive the focus loop: the first of `focus.channel` the sequence has, else the
    sequence's first channel; None for a sequence without channels (every frame drives it). ConfigError when
    `focus.channel` names none of the sequence's channels."""
    if not channels:
        return None
    if focus.channel is None:
        return channels[0]
    wanted = [focus.channel] if isinstance(focus.channel, str) else list(focus.channel)
    for name in wanted:
        if name in channels:
            return name
    raise ConfigError(
        f"focus.channel: none of {', '.join(wanted)} is a channel of the sequence (channels: {', '.join(channels)})"
    )


def model_wavelength_nm(corrector: object) -> float | None:
    """The emission wavelength a corrector's model was trained for (a Refocuser's weights record it), else None."""
    loaded = getattr(corrector, "loaded", None)
    optics = getattr(loaded, "optics", None)
    wavelength_nm = getattr(optics, "emission_wavelength_nm", None)
    return float(wavelength_nm) if isinstance(wavelength_nm, (int, float)) else None


class ModelChannelPolicy:
    """pipeline.ChannelPolicy: a channel is refocused when `pipeline.channels` includes it (null: any) and its
    emission wavelength lies within the envelope of the model that refocuses it (its own in
    `model.weights_per_channel`, else the default one), or `refocus_any_wavelength` is set."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        optics: OpticsConfig,
        model_wavelength_nm: float | None,
        channel_wavelengths_nm: Mapping[str, float | None] | None = None,
    ) -> None:
        """`channel_wavelengths_nm`: the trained wavelength of each channel's own model (model.weights_per_channel)."""
        self._wanted = None if pipeline.channels is None else set(pipeline.channels)
        self._any_wavelength = pipeline.refocus_any_wavelength
        self._optics = optics
        self._model_nm = model_wavelength_nm
        self._channel_nm = dict(channel_wavelengths_nm or {})

    def model_nm(self, channel: str | None) -> float | None:
        """The wavelength the model refocusing this channel was trained for (None: its weights do not say)."""
        return self._channel_nm[channel] if channel in self._channel_nm else self._model_nm

    def envelope_nm(self, channel: str | None = None) -> tuple[float, float] | None:
        model_nm = self.model_nm(channel)
        if model_nm is None:
            return None
        return (model_nm * (1 - WAVELENGTH_ENVELOPE_FRACTION), model_nm * (1 + WAVELENGTH_ENVELOPE_FRACTION))

    def __call__(self, channel: str | None) -> str | None:
        if channel is None:
            return None
        if self._wanted is not None and channel not in self._wanted:
            return f"channel {channel} not in pipeline.channels"
        envelope = self.envelope_nm(channel)
        wavelength_nm = self._optics.for_channel(channel).emission_wavelength_nm
        if self._any_wavelength or envelope is None or envelope[0] <= wavelength_nm <= envelope[1]:
            return None
        whose = "its model.weights_per_channel model" if channel in self._channel_nm else "the model"
        return (
            f"channel {channel} emits at {wavelength_nm:g} nm, outside {whose}'s {envelope[0]:.0f}-"
            f"{envelope[1]:.0f} nm (trained for {self.model_nm(channel):g} nm); pipeline.refocus_any_wavelength "
            "refocuses it anyway"
        )


def refocus_policy(
    pipeline: PipelineConfig, optics: OpticsConfig, corrector: object, channel_correctors: Mapping[str, object]
) -> ModelChannelPolicy:
    """The channel policy for the default corrector and the channels' own ones (model.weights_per_channel)."""
    return ModelChannelPolicy(
        pipeline,
        optics,
        model_wavelength_nm(corrector),
        {channel: model_wavelength_nm(model) for channel, model in channel_correctors.items()},
    )


class WithheldModels:
    """pipeline.ChannelPolicy: frames whose model's recorded evaluation says it harms (model/verdict.py) are kept
    raw with that reason; the others follow `policy`. A channel with its own model is judged by that model."""

    def __init__(self, policy: ChannelPolicy, refusal: str | None, channel_refusals: Mapping[str, str | None]) -> None:
        self._policy = policy
        self._refusal = refusal
        self._channel_refusals = dict(channel_refusals)

    def __call__(self, channel: str | None) -> str | None:
        refusal = self._channel_refusals[channel] if channel in self._channel_refusals else self._refusal
        return refusal or self._policy(channel)
