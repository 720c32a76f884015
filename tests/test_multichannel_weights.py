"""Per-channel weights (model.weights_per_channel) on the simulated microscope's real Micro-Manager core: each
channel's frames are refocused by its own model, checked by the sha256 recorded per frame and against that model's
own output; the wavelength envelope is that model's; a missing or damaged file is refused before any frame."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
import yaml
from support import SMALL_FIELD_SIMULATOR, serve_once_command

from acquire_refocus.config import load_config, parse_config
from acquire_refocus.daemon import Daemon
from acquire_refocus.errors import ConfigError
from acquire_refocus.storage import FOCUS_LOG, RAW_STORE, RUN_RECORD, read_focus_log

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
OPTICS = {"channels": {"Nuclei": {"emission_wavelength_nm": 461}, "Cytoplasm": {"emission_wavelength_nm": 510}}}
STAINS = {"Nuclei": {"stain": "nuclei"}, "Cytoplasm": {"stain": "cytoplasm", "brightness": 1.5}}
CHANNELS = [{"config": "Nuclei", "group": "Channel"}, {"config": "Cytoplasm", "group": "Channel"}]


@pytest.fixture(scope="module")
def cytoplasm_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained network recorded as trained for 510 nm (a cytoplasm stain's emission)."""
    import torch

    from acquire_refocus.config import OpticsConfig, UNetModelConfig
    from acquire_refocus.model.checkpoint import save_weights
    from acquire_refocus.model.network import build_network

    torch.manual_seed(1)
    model_config = UNetModelConfig(base_channels=4, depth=2)
    path = tmp_path_factory.mktemp("weights") / "cytoplasm.pt"
    save_weights(
        path, build_network(model_config), model_config, OpticsConfig(emission_wavelength_nm=510), {"purpose": "tests"}
    )
    return path


def _config(weights_per_channel: dict[str, Any], **focus: Any) -> Any:
    return parse_config(
        {
            "optics": OPTICS,
            "simulator": {**SMALL_FIELD_SIMULATOR, "channels": STAINS, "time_per_frame_s": 1.0},
            "model": {"weights_per_channel": weights_per_channel},
            "engine": {"backend": "torch"},
            "publishing": {"enabled": False},
            "focus": {"mode": "observe", "channel": "Nuclei", **focus},
        }
    )


class Results:
    """A sink keeping every result, as the sinks see them."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def on_frame(self, result: Any) -> None:
        self.results.append(result)

    def close(self) -> None:
        pass


def _run(config: Any, corrector: Any, output: Path) -> tuple[Any, list[Any]]:
    sink = Results()
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 3}, stage_positions=[(0, 0, 100)], channels=CHANNELS, axis_order="tpc"
    )
    with Daemon(config, output_dir=output, corrector=corrector, control=False, extra_sinks=lambda: [sink]) as daemon:
        summary = daemon.run(sequence, output / "run")
    assert not summary.error
    return summary, sink.results


def test_relative_weights_per_channel_are_relative_to_the_config_file(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "simulator-multichannel.yaml").read_text(encoding="utf-8"))
    data["model"]["weights_per_channel"] = {"Cytoplasm": "models/cytoplasm.pt", "GFP": "/abs/gfp.pt"}
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "scope.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    config = load_config(path)
    assert config.model.weights_per_channel == {
        "Cytoplasm": tmp_path / "conf" / "models" / "cytoplasm.pt",
        "GFP": Path("/abs/gfp.pt"),
    }
    assert load_config(ROOT / "configs" / "simulator-multichannel.yaml").model.weights_per_channel == {}


def test_each_channel_is_refocused_by_its_own_model(
    tiny_refocuser: Any, cytoplasm_weights: Path, tmp_path: Path
) -> None:
    """Nuclei by the default model, Cytoplasm by its 510 nm model: every frame saved raw and logged, each
    refocused frame carries its model's sha256 and equals that model's output, the loop sees only Nuclei."""
    from acquire_refocus import Refocuser

    summary, results = _run(_config({"Cytoplasm": cytoplasm_weights}), tiny_refocuser, tmp_path)
    cytoplasm_model = Refocuser.load(cytoplasm_weights, engine="torch")
    assert cytoplasm_model.model_sha256 != tiny_refocuser.model_sha256
    by_channel = {name: [r for r in results if r.info.channel == name] for name in ("Nuclei", "Cytoplasm")}
    assert len(results) == 6 and all(len(frames) == 3 for frames in by_channel.values())
    assert all(r.status == "refocused" for r in results)
    assert {r.model_sha256 for r in by_channel["Nuclei"]} == {tiny_refocuser.model_sha256}
    assert {r.model_sha256 for r in by_channel["Cytoplasm"]} == {cytoplasm_model.model_sha256}
    for channel, model in (("Nuclei", tiny_refocuser), ("Cytoplasm", cytoplasm_model)):
        result = by_channel[channel][0]
        np.testing.assert_allclose(result.image, model(result.raw).image, rtol=1e-5, atol=1e-3)
    other = tiny_refocuser(by_channel["Cytoplasm"][0].raw).image
    assert not np.allclose(by_channel["Cytoplasm"][0].image, other, rtol=1e-5, atol=1e-3)
    assert summary.focus["channel"] == "Nuclei" and summary.focus["other_channel_frames"] == 3

    rows = read_focus_log(tmp_path / "run" / FOCUS_LOG)
    assert len(rows) == 6
    assert {r["model_sha256"] for r in rows} == {tiny_refocuser.model_sha256[:12], cytoplasm_model.model_sha256[:12]}
    record = yaml.safe_load((tmp_path / "run" / RUN_RECORD).read_text(encoding="utf-8"))
    assert record["channel_models"] == {"Cytoplasm": cytoplasm_model.model_sha256}
    assert (tmp_path / "run" / RAW_STORE).is_dir()


def test_the_wavelength_check_uses_the_channel_model_optics(
    tiny_refocuser: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    """A 461 nm model listed for the 510 nm channel keeps that channel's frames raw (skipped, with the reason that
    names it); Nuclei goes on with the default model."""
    _, results = _run(_config({"Cytoplasm": tiny_weights}), tiny_refocuser, tmp_path)
    cytoplasm = [r for r in results if r.info.channel == "Cytoplasm"]
    nuclei = [r for r in results if r.info.channel == "Nuclei"]
    assert len(cytoplasm) == 3 and all(r.status == "skipped" and r.raw is not None for r in cytoplasm)
    assert all(
        "Cytoplasm emits at 510 nm, outside its model.weights_per_channel model's 415-507 nm" in r.reason
        for r in cytoplasm
    )
    assert len(nuclei) == 3 and all(r.status == "refocused" for r in nuclei)
    rows = read_focus_log(tmp_path / "run" / FOCUS_LOG)
    assert sorted(r["status"] for r in rows) == ["refocused"] * 3 + ["skipped"] * 3


def test_a_channel_model_recorded_to_harm_keeps_only_its_channel_raw(
    tiny_refocuser: Any, cytoplasm_weights: Path, tmp_path: Path
) -> None:
    """The verdict of `evaluate --record` is judged per model: the Cytoplasm model's harms, the default one has
    none; Nuclei is refocused, Cytoplasm kept raw with the verdict's reason."""
    from acquire_refocus.model.verdict import RangeVerdict, file_sha256, record_evaluation

    weights = tmp_path / "harmful.pt"
    shutil.copy(cytoplasm_weights, weights)
    record_evaluation(
        weights, file_sha256(weights), "stack: cytoplasm.tif", "my stack", [RangeVerdict(0.5, 1.0, "harms", -2.1, -0.6)]
    )
    _, results = _run(_config({"Cytoplasm": weights}), tiny_refocuser, tmp_path)
    statuses = {(r.info.channel, r.status) for r in results}
    assert statuses == {("Nuclei", "refocused"), ("Cytoplasm", "skipped")}
    assert all("allow_harmful_model" in r.reason for r in results if r.info.channel == "Cytoplasm")


@pytest.mark.parametrize("problem", ["missing", "damaged"])
def test_a_missing_or_damaged_channel_weights_file_is_refused_at_start(
    tiny_refocuser: Any, tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "cytoplasm.pt"
    if problem == "damaged":
        path.write_bytes(b"not a model" * 100)
    expected = "weights file not found" if problem == "missing" else "not a readable acquire-refocus weights file"
    with pytest.raises(ConfigError, match=rf"model\.weights_per_channel\.Cytoplasm: .*{expected}"):
        Daemon(_config({"Cytoplasm": path}), corrector=tiny_refocuser, control=False)


def test_the_command_line_says_so_in_one_line(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "simulator-multichannel.yaml").read_text(encoding="utf-8"))
    data["model"]["weights_per_channel"] = {"Cytoplasm": "cytoplasm.pt"}
    (tmp_path / "cytoplasm.pt").write_bytes(b"\x00" * 64)
    config = tmp_path / "scope.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    output = tmp_path / "out"
    done = subprocess.run(
        serve_once_command(config, output),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"model.weights_per_channel.Cytoplasm: {tmp_path / 'cytoplasm.pt'}: not a readable" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (output / RAW_STORE).exists() and not (output / RUN_RECORD).exists()
