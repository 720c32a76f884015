"""The configuration's schema: frozen sections changed by validated copies, the model and training sections keyed
on `architecture` and `data`, and the `version` key (files without it, and weights written before it, still load)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from acquire_refocus.config import (
    CONFIG_VERSION,
    PROJECT_ROOT,
    AppConfig,
    MultiScaleModelConfig,
    OpticsConfig,
    ResNet34ModelConfig,
    SimulatedTrainingConfig,
    StoredTrainingConfig,
    UNetModelConfig,
    dump_config,
    load_config,
    parse_config,
    parse_model_section,
    replace,
)
from acquire_refocus.errors import ConfigError, WeightsError
from acquire_refocus.model.checkpoint import (
    CONFIG_VERSION_KEY,
    DEFAULT_WEIGHTS,
    load_weights,
    read_payload,
    save_weights,
    write_payload,
)
from acquire_refocus.model.network import build_network

SHIPPED_YAML = sorted(
    [
        *(PROJECT_ROOT / "configs").glob("*.yaml"),
        *(PROJECT_ROOT / "configs" / "optics").glob("*.yaml"),
        *(PROJECT_ROOT / "tools" / "reports").rglob("*.yaml"),
    ]
)


def _load_text(tmp_path: Path, text: str) -> AppConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load_text(tmp_path, text)
    return str(info.value)


def test_the_shipped_yaml_files_are_found() -> None:
    names = {path.name for path in SHIPPED_YAML}
    assert {"simulator.yaml", "100x-1.45-oil.yaml", "train-multiscale.yaml", "evaluate.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_every_shipped_yaml_loads_and_round_trips(path: Path) -> None:
    config = load_config(path)
    assert config.version == CONFIG_VERSION
    dumped = yaml.safe_load(dump_config(config))
    assert dumped["version"] == CONFIG_VERSION
    assert parse_config(dumped) == config


def test_stored_training_without_a_dataset_fails_when_the_file_loads(tmp_path: Path) -> None:
    message = _error(tmp_path, "training:\n  data: stored\n  in_focus_index: 16\n")
    assert "training.dataset_dir: required with data: stored" in message


def test_stored_training_with_a_dataset_loads_relative_to_the_file(tmp_path: Path) -> None:
    config = _load_text(tmp_path, "training:\n  data: stored\n  dataset_dir: bbbc006\n  z_step_um: 2.0\n")
    assert isinstance(config.training, StoredTrainingConfig)
    assert config.training.dataset_dir == tmp_path / "bbbc006"


def test_a_key_of_another_kind_is_refused_in_a_version_2_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "version: 2\nmodel:\n  architecture: unet\n  scales: 3\n")
    assert "model.scales: unknown key with architecture: unet" in message
    message = _error(tmp_path, "version: 2\ntraining:\n  data: simulated\n  dataset_dir: /data\n")
    assert "training.dataset_dir: unknown key with data: simulated" in message


def test_a_version_1_file_drops_the_keys_it_ignored(tmp_path: Path) -> None:
    """Version 1 accepted every model and training key whatever the architecture and data; they had no effect."""
    config = _load_text(tmp_path, "model:\n  architecture: unet\n  depth: 5\n  scales: 2\n  fusion: concat\n")
    assert config.model == UNetModelConfig(depth=5)
    config = _load_text(tmp_path, "training:\n  steps: 10\n  dataset_dir: null\n  z_order: increasing\n")
    expected = SimulatedTrainingConfig(steps=10, checkpoint_dir=tmp_path / "runs" / "train")  # relative to the file
    assert config.training == expected


def test_a_misspelt_key_stays_an_error_in_a_version_1_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "model:\n  architecture: multiscale\n  scale: 2\n")
    assert "model.scale: unknown key with architecture: multiscale" in message


def test_an_unknown_architecture_names_the_choices(tmp_path: Path) -> None:
    message = _error(tmp_path, "model:\n  architecture: vit\n")
    assert "model.architecture: expected one of unet, multiscale, resnet34 (got 'vit')" in message


def test_a_newer_version_is_a_clear_error(tmp_path: Path) -> None:
    message = _error(tmp_path, f"version: {CONFIG_VERSION + 1}\n")
    assert f"version: this acquire-refocus reads configuration versions 1 to {CONFIG_VERSION}" in message
    assert "update acquire-refocus" in message


def test_sections_are_frozen_and_replace_validates() -> None:
    config = AppConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.focus.mode = "correct"  # type: ignore[misc]
    changed = replace(config, focus=replace(config.focus, mode="correct"))
    assert changed.focus.mode == "correct" and config.focus.mode == "observe"
    with pytest.raises(ValidationError, match="dead_band_um"):
        replace(config.focus, dead_band_um=-1.0)
    with pytest.raises(ValidationError, match="low < high"):
        replace(config.focus, z_limits_um=(10.0, 0.0))


def test_replace_keeps_defaults_that_follow_the_optics() -> None:
    """A 100x oil objective scales the training range; a copy with another change neither loses nor repeats it."""
    oil = parse_config({"optics": {"numerical_aperture": 1.4, "immersion_index": 1.515, "magnification": 100}})
    assert oil.training.defocus_range_um != AppConfig().training.defocus_range_um
    copy = replace(oil, log_level="DEBUG")
    assert copy.training.defocus_range_um == oil.training.defocus_range_um
    assert copy.simulator.max_defocus_um == oil.simulator.max_defocus_um


def test_one_config_is_read_by_many_threads_while_copies_are_made() -> None:
    config = AppConfig()
    seen: list[str] = []

    def reader() -> None:
        for _ in range(200):
            seen.append(config.focus.mode)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(50):
        replace(config, focus=replace(config.focus, mode="correct"))
    for thread in threads:
        thread.join()
    assert set(seen) == {"observe"} and len(seen) == 800


def test_weights_of_version_1_still_load(tmp_path: Path) -> None:
    """Weights written before config version 2 (the shipped default until 2026-12-07) carry no version and a model
    section with every architecture's keys; they load as the architecture they name."""
    model_config = UNetModelConfig(base_channels=4, depth=2)
    path = tmp_path / "weights.pt"
    save_weights(path, build_network(model_config), model_config, OpticsConfig(), {})
    payload = torch.load(path, weights_only=True)
    del payload[CONFIG_VERSION_KEY]
    payload["model_config"] = {
        "architecture": "unet",
        "base_channels": 4,
        "depth": 2,
        "scales": 3,
        "fusion": "sum",
        "pretrained_encoder": None,
        "weights": None,
    }  # the shipped default's section as version 1 wrote it
    write_payload(path, payload)
    loaded = load_weights(path)
    assert isinstance(loaded.model_config, UNetModelConfig) and loaded.model_config.depth == 2


def test_the_shipped_weights_load_as_the_current_version() -> None:
    payload, _ = read_payload(DEFAULT_WEIGHTS)
    assert payload[CONFIG_VERSION_KEY] == CONFIG_VERSION
    assert isinstance(load_weights(None).model_config, UNetModelConfig)


@pytest.mark.parametrize(
    "model_config",
    [
        UNetModelConfig(base_channels=4, depth=2),
        MultiScaleModelConfig(base_channels=4, depth=2, scales=2, fusion="concat"),
        ResNet34ModelConfig(base_channels=4),
    ],
    ids=lambda config: config.architecture,
)
def test_weights_record_their_config_version(tmp_path: Path, model_config: Any) -> None:
    path = tmp_path / "weights.pt"
    save_weights(path, build_network(model_config, load_pretrained=False), model_config, OpticsConfig(), {})
    payload, _ = read_payload(path)
    assert payload[CONFIG_VERSION_KEY] == CONFIG_VERSION
    assert load_weights(path).model_config == model_config


def test_version_2_weights_with_a_key_of_another_architecture_are_refused(tmp_path: Path) -> None:
    model_config = UNetModelConfig(base_channels=4, depth=2)
    path = tmp_path / "weights.pt"
    save_weights(path, build_network(model_config), model_config, OpticsConfig(), {})
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["scales"] = 3  # what a version 1 file carried; version 2 refuses it
    write_payload(path, payload)
    with pytest.raises(WeightsError, match="scales"):
        load_weights(path)
    assert parse_model_section(payload["model_config"], version=1) == model_config
