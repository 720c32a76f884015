"""Config files: every mistake gives one clear message naming the file, the key and what is expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from acquire_refocus import cli
from acquire_refocus.config import PROJECT_ROOT, AppConfig, dump_config, load_config, parse_config
from acquire_refocus.errors import ConfigError

# (file content, words the message must contain besides the file name)
BAD_CONFIGS = {
    "unknown_key": ("optics:\n  numerical_apperture: 0.5\n", ["optics.numerical_apperture", "unknown key"]),
    "wrong_type": ("simulator:\n  camera:\n    width_px: big\n", ["simulator.camera.width_px", "integer", "'big'"]),
    "na_above_n": ("optics:\n  numerical_aperture: 1.2\n", ["numerical_aperture", "immersion_index", "smaller"]),
    "z_limits_reversed": ("simulator:\n  z_limits_um: [200, 0]\n", ["z_limits_um", "low < high"]),
    "invalid_yaml": ("optics: [1, 2\n", ["not valid YAML"]),
    "not_a_mapping": ("- 1\n- 2\n", ["expected a mapping", "list"]),
    "one_address_for_two_sockets": (
        "publishing:\n  pub_address: tcp://127.0.0.1:6000\n  control_address: tcp://127.0.0.1:6000\n",
        ["pub_address and control_address are both tcp://127.0.0.1:6000"],
    ),
    "negative_seed": ("simulator:\n  seed: -5\n", ["simulator.seed", "greater than or equal to 0"]),
    "defocus_range_reversed": ("training:\n  defocus_range_um: [35, -35]\n", ["defocus_range_um", "low < high"]),
    "focus_offset_beyond_the_sharpness_fit": (
        "focus:\n  fine_source: sharpness\n  target_offset_um: 3.0\n",
        ["focus.target_offset_um", "+-2.00 um", "sharpness_range_um"],
    ),
}


pytestmark = pytest.mark.usefixtures("restore_logging")


def _write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BAD_CONFIGS[name][0], encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_gives_one_clear_error(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for word in BAD_CONFIGS[name][1]:
        assert word in message, f"{word!r} missing from: {message}"


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(path)


@pytest.mark.parametrize("name", [*sorted(BAD_CONFIGS), "missing"])
def test_simulate_cli_rejects_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = tmp_path / "missing.yaml" if name == "missing" else _write(tmp_path, name)
    out_dir = tmp_path / "out"
    code = cli.main(["simulate", "--config", str(path), "--out", str(out_dir), "--fields", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("acquire-refocus simulate: error: ")
    assert str(path) in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out_dir.exists(), "nothing may be written for a bad config"


def test_console_script_bad_config_exit_code_and_no_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, "na_above_n")
    result = subprocess.run(
        [sys.executable, "-m", "acquire_refocus.cli", "simulate", "--config", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "numerical_aperture" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "focus",
    [
        {"fine_source": "sharpness", "target_offset_um": 2.0},  # "+-2 um" as the docs say (the limit is 1.9992)
        {"fine_source": "sharpness", "target_offset_um": -1.5, "sharpness_range_um": 3.0},
        {"sign_source": "probe", "dead_band_um": 2.5, "target_offset_um": 3.0},  # no sharpness: no limit
    ],
)
def test_focus_offsets_within_the_limits_are_accepted(focus: dict) -> None:
    assert parse_config({"focus": focus}).focus.target_offset_um == focus["target_offset_um"]


def test_several_problems_are_listed_together(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("optics:\n  magnification: -1\nengine:\n  backend: cuda\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "optics.magnification" in str(info.value) and "engine.backend" in str(info.value)


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, AppConfig)
    assert parse_config(yaml.safe_load(dump_config(config))) == config


def test_shipped_configs_exist() -> None:
    assert list((PROJECT_ROOT / "configs").glob("*.yaml")), "configs/ must ship at least one YAML config"
