"""Which channel drives the focus loop and which channels the network refocuses (acquire_refocus.channels)."""

from __future__ import annotations

import pytest
import useq

from acquire_refocus.channels import ModelChannelPolicy, driving_channel, sequence_channels
from acquire_refocus.config import FocusConfig, OpticsConfig, PipelineConfig
from acquire_refocus.errors import ConfigError

OPTICS = OpticsConfig(
    channels={
        "DAPI": {"emission_wavelength_nm": 461},
        "GFP": {"emission_wavelength_nm": 510},
        "BFP": {"emission_wavelength_nm": 450},
    }
)


def test_the_first_preferred_channel_the_sequence_has_drives_the_loop() -> None:
    assert driving_channel(FocusConfig(), ["GFP", "DAPI"]) == "GFP"  # default: the sequence's first
    assert driving_channel(FocusConfig(channel=["Hoechst", "DAPI"]), ["GFP", "DAPI"]) == "DAPI"
    assert driving_channel(FocusConfig(channel="DAPI"), []) is None  # no channels: every frame drives it
    with pytest.raises(ConfigError, match="none of Hoechst is a channel of the sequence"):
        driving_channel(FocusConfig(channel="Hoechst"), ["GFP", "DAPI"])


def test_a_sequence_whose_axis_order_leaves_out_channels_has_none() -> None:
    channels = [{"config": "DAPI"}, {"config": "GFP"}]
    assert sequence_channels(useq.MDASequence(channels=channels, axis_order="tpcz")) == ["DAPI", "GFP"]
    assert sequence_channels(useq.MDASequence(channels=channels, axis_order="tz")) == []


def test_channels_outside_the_model_wavelength_envelope_are_kept_raw_unless_asked_for() -> None:
    policy = ModelChannelPolicy(PipelineConfig(), OPTICS, 461.0)
    assert policy("DAPI") is None and policy("BFP") is None and policy(None) is None
    assert policy("Unlisted") is None  # no wavelength given: the optics' own
    reason = policy("GFP")
    assert reason is not None and "GFP emits at 510 nm, outside the model's 415-507 nm" in reason
    only_dapi = ModelChannelPolicy(PipelineConfig(channels=["DAPI"]), OPTICS, 461.0)
    assert only_dapi("BFP") == "channel BFP not in pipeline.channels"
    forced = ModelChannelPolicy(PipelineConfig(channels=["GFP"], refocus_any_wavelength=True), OPTICS, 461.0)
    assert forced("GFP") is None and forced("DAPI") is not None
    assert ModelChannelPolicy(PipelineConfig(), OPTICS, None)("GFP") is None  # a model that does not say
