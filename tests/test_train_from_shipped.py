"""A model for new optics starts from the shipped one: `training.initial_weights: shipped` (the default) fine-tunes
the packaged model when the model section does not contradict its architecture, and defocus settings the config
leaves out scale with the optics' depth of field."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support import FAST_SIMULATOR

from acquire_refocus.config import AppConfig, parse_config
from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS, load_weights
from acquire_refocus.model.train import train

OIL_100X = {"numerical_aperture": 1.45, "magnification": 100, "immersion_index": 1.515, "camera_pixel_size_um": 13.0}


def test_defocus_settings_left_out_scale_with_the_depth_of_field() -> None:
    default = AppConfig()
    assert default.training.initial_weights == "shipped"
    assert default.training.defocus_range_um == (-35.0, 35.0)
    assert (default.simulator.max_defocus_um, default.simulator.psf_z_step_um) == (40.0, 0.25)
    oil = parse_config({"optics": OIL_100X})
    scale = oil.optics.depth_of_field_um / default.optics.depth_of_field_um
    assert oil.training.defocus_range_um == (round(-35 * scale, 1), round(35 * scale, 1)) == (-5.5, 5.5)
    assert oil.simulator.max_defocus_um == round(40 * scale, 1)
    assert oil.simulator.psf_z_step_um == round(oil.optics.depth_of_field_um / 5, 2)
    # what the file says is kept, and a dumped config reads back unchanged (scaled once, not twice)
    explicit = parse_config(
        {
            "optics": OIL_100X,
            "training": {"defocus_range_um": [-8, 8]},
            "simulator": {"max_defocus_um": 9, "psf_z_step_um": 0.1},
        }
    )
    assert explicit.training.defocus_range_um == (-8.0, 8.0)
    assert (explicit.simulator.max_defocus_um, explicit.simulator.psf_z_step_um) == (9.0, 0.1)
    assert parse_config(oil.model_dump(mode="json")) == oil


def _config(**sections: object) -> AppConfig:
    return parse_config(
        {
            "simulator": FAST_SIMULATOR,
            "training": {
                "patch_size_px": 64,
                "batch_size": 2,
                "learning_rate": 1e-9,
                "validation_every": 1000,
                "train_fields": 2,
                "validation_fields": 1,
                "defocus_range_um": [-10.0, 10.0],
                "num_threads": 1,
                "seed": 1,
            },
            **sections,
        }
    )


def test_training_starts_from_the_shipped_model_by_default(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    result = train(_config(), out_dir=tmp_path / "run", steps=1, progress=False)
    trained, shipped = load_weights(result.weights_path), load_weights(DEFAULT_WEIGHTS)
    assert trained.metadata["training"]["initial_weights"]["file"] == DEFAULT_WEIGHTS.name
    assert trained.metadata["training"]["initial_weights"]["fresh_parameters"] == []
    # one step at a negligible learning rate: the refocusing network's weights are still the shipped ones (its
    # normalisation statistics move with the data seen, whatever the learning rate)
    after, before = dict(trained.network.named_parameters()), dict(shipped.network.named_parameters())
    refocusing = [name for name in before if not name.startswith("focus_head.")]
    assert refocusing
    for name in refocusing:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0, msg=name)


def test_a_model_section_of_another_architecture_starts_fresh_and_says_so(
    tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(1)
    config = _config(model={"architecture": "unet", "base_channels": 4, "depth": 3})
    with engine_log.at_level(logging.INFO, logger="acquire_refocus"):
        result = train(config, out_dir=tmp_path / "run", steps=1, progress=False)
    assert load_weights(result.weights_path).metadata["training"]["initial_weights"] is None
    assert "event=initial_weights_fresh" in engine_log.text
    assert "given=architecture:unet,base_channels:4,depth:3" in engine_log.text
