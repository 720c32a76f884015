"""Config and sequence files that look valid but are not (issue 17, part 3): each is one clear ConfigError naming
the file, found before anything starts, and loading never grows with what an alias expands to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from acquire_refocus.config import load_config
from acquire_refocus.errors import ConfigError
from acquire_refocus.sequence import parse_sequence
from acquire_refocus.yaml_safe import MAX_DEPTH, MAX_NODES

pytestmark = pytest.mark.timeout(120)


def alias_bomb(key: str, levels: int = 9) -> str:
    """The classic "billion laughs": each level repeats the previous one 9 times (9**9 = 387 million strings)."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_an_alias_bomb_in_the_model_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n" + "".join(f"  {line}\n" for line in alias_bomb("architecture").splitlines()))
    with pytest.raises(
        ConfigError,
        match=rf"^{path}: .* values once its aliases \(\*name\) are expanded; at most "
        f"{MAX_NODES:,}",
    ):
        load_config(path)


def test_an_alias_bomb_in_a_sequence_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "time_plan: {interval: 0, loops: 2}\n" + alias_bomb("metadata"), "sequence.yaml")
    with pytest.raises(ConfigError, match="values once its aliases"):
        parse_sequence(path)


def test_a_list_nested_5000_deep_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  architecture: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"nested more than {MAX_DEPTH} levels deep"):
        load_config(path)


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "acquisition:\n  sequence: &s {metadata: {again: *s}}\n")
    with pytest.raises(ConfigError, match=r"an alias .* inside the value it names"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "focus:\n  mode: correct\n  dead_band_um: 0.3\n  mode: observe\n")
    with pytest.raises(ConfigError, match="found duplicate key 'mode'"):
        load_config(path)


def test_mode_off_unquoted_means_off(tmp_path: Path) -> None:
    """The shipped configs' comment says `mode: off`; YAML 1.1 made that False."""
    path = write(tmp_path, "focus:\n  mode: off\npublishing:\n  enabled: true\n  publish_raw: false\n")
    config = load_config(path)
    assert config.focus.mode == "off" and config.publishing.publish_raw is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("focus:\n  dead_band_um: .inf\n", "focus.dead_band_um: Input should be a finite number"),
        ("focus:\n  max_step_um: .nan\n", "focus.max_step_um: Input should be a finite number"),
        (
            "simulator:\n  drift: {amplitude_um: .nan}\n",
            "simulator.drift.amplitude_um: Input should be a finite number",
        ),
        ("publishing:\n  pub_address: tcp://127.0.0.1:99999\n", "port '99999' is not a number from 1 to 65535"),
        ("publishing:\n  control_address: tcp://127.0.0.1\n", "no port (tcp://HOST:PORT)"),
        ("publishing:\n  pub_address: udp://127.0.0.1:5556\n", "not a ZeroMQ address"),
        ("publishing:\n  pub_address: tcp://0.0.0.0:5556\n", "binds beyond loopback"),
        ("publishing:\n  control_address: tcp://*:5557\n", "binds beyond loopback"),
    ],
    ids=["inf-dead-band", "nan-step", "nan-drift", "port-99999", "no-port", "udp", "all-interfaces", "wildcard"],
)
def test_numbers_and_addresses_that_cannot_work_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}: invalid configuration:") as error:
        load_config(path)
    assert message in str(error.value)


def test_an_address_beyond_loopback_is_accepted_with_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f"publishing:\n  pub_address: tcp://0.0.0.0:5556\n  keys_dir: {tmp_path / 'keys'}\n")
    assert load_config(path).publishing.pub_address == "tcp://0.0.0.0:5556"


def test_the_cli_reports_an_alias_bomb_in_one_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "acquisition:\n  sequence:\n" + "".join(f"    {line}\n" for line in alias_bomb("metadata").splitlines()),
    )
    done = subprocess.run(
        [sys.executable, "-m", "acquire_refocus.cli", "serve", "--config", str(path), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"acquire-refocus serve: error: {path}: ")
