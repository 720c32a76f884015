"""Shared test material: simulator presets, helpers and test doubles (fixtures stay in conftest.py).

Test files import it as `from support import ...`: pytest puts tests/ on sys.path for the test files there
(rootdir conftest, prepend import mode), a test file run as a child process has tests/ as its script directory, and
the tools that use it insert tests/ themselves. The doubles stand in for the network only; sockets, files and the
Micro-Manager core around them stay real.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # the package is imported where used, so that conftest (which imports this) stays light
    from acquire_refocus.config import AppConfig
    from acquire_refocus.pipeline import FrameResult, RefocusOutput

# A small, fast simulated microscope: 128 x 128 frames, a specimen just larger than the frame, a clock that
# advances 2 s per frame (so drift shows within a few frames whatever the machine's speed).
FAST_SIMULATOR: dict[str, Any] = {
    "camera": {"width_px": 128, "height_px": 128, "exposure_ms": 10},
    "specimen": {"field_size_um": [200, 200], "photons_per_um3": 1500, "nuclei_per_mm2": 4000},
    "focus_z_um": 100.0,
    "z_limits_um": [50, 150],
    "time_per_frame_s": 2.0,
    "drift": {"model": "none"},
}

# 256 x 256 frames of a field with enough nuclei that sharpness and the closed loop have something to see.
SMALL_FIELD_SIMULATOR: dict[str, Any] = {
    **FAST_SIMULATOR,
    "camera": {"width_px": 256, "height_px": 256, "exposure_ms": 10},
    "specimen": {"field_size_um": [260, 260], "photons_per_um3": 1500, "nuclei_per_mm2": 3000},
}

# The daemon tests' acquisition: 2 positions x 4 time points on FAST_SIMULATOR.
SEQUENCE: dict[str, Any] = {
    "time_plan": {"interval": 0, "loops": 4},
    "stage_positions": [{"x": 0, "y": 0, "z": 100}, {"x": 40, "y": 20, "z": 100}],
    "axis_order": "tp",
}


def free_tcp_address() -> str:
    """A loopback address whose port was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def daemon_config(weights: Path, **sections: dict[str, Any]) -> AppConfig:
    """FAST_SIMULATOR running SEQUENCE, `weights` on torch with one thread, free loopback ports, focus observe;
    each of `sections` is merged into its top-level section."""
    from acquire_refocus.config import parse_config

    data: dict[str, Any] = {
        "simulator": FAST_SIMULATOR,
        "model": {"weights": str(weights)},
        "engine": {"backend": "torch", "num_threads": 1},
        "publishing": {"pub_address": free_tcp_address(), "control_address": free_tcp_address()},
        "focus": {"mode": "observe", "z_limits_um": [50, 150]},
        "acquisition": {"backend": "simulator", "sequence": SEQUENCE},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


def write_serve_config(path: Path, weights: Path, sequence: dict[str, Any], **sections: Any) -> Path:
    """A config file for a real `serve --once` subprocess: FAST_SIMULATOR, `weights` on torch with one thread, free
    loopback ports, focus observe, the simulator backend running `sequence`; `sections` replace or add top-level
    sections (e.g. focus, storage, log_file)."""
    import yaml

    config = {
        "simulator": FAST_SIMULATOR,
        "model": {"weights": str(weights)},
        "engine": {"backend": "torch", "num_threads": 1},
        "publishing": {"pub_address": free_tcp_address(), "control_address": free_tcp_address()},
        "focus": {"mode": "observe"},
        "acquisition": {"backend": "simulator", "sequence": sequence},
        **sections,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def serve_once_command(config: Path, output: Path) -> list[str]:
    """`acquire-refocus serve --config CONFIG --once --output OUTPUT` in a fresh interpreter of this venv."""
    return [
        sys.executable,
        "-m",
        "acquire_refocus.cli",
        "serve",
        "--config",
        str(config),
        "--once",
        "--output",
        str(output),
    ]


def written_planes(series: dict[str, Any]) -> int:
    """Planes holding data (the simulated camera's offset makes every real frame non-zero)."""
    return sum(int(np.count_nonzero(arr[:].reshape(arr.shape[0], -1).any(axis=1))) for arr in series.values())


@dataclass
class PassThroughOutput:
    image: npt.NDArray[np.float32]
    defocus_um: float
    confidence: float
    defocus_magnitude_um: float


class PassThrough:
    """Stands in for the network where what is under test is around it (acquisition intake, sinks, the daemon's
    own cost): the frame back as float32, in focus, fully confident."""

    engine_name = "passthrough"

    def __call__(self, frame: npt.NDArray[Any], pixel_size_um: float | None = None) -> PassThroughOutput:
        return PassThroughOutput(frame.astype(np.float32), 0.0, 1.0, 0.0)


class GatedCorrector:
    """A real corrector (the Refocuser), started only once `gate` is set: an engine that is (deterministically)
    behind the camera."""

    def __init__(self, refocuser: Any) -> None:
        self._refocuser = refocuser
        self.engine_name: str = refocuser.engine_name
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, frame: npt.NDArray[Any], pixel_size_um: float | None = None) -> RefocusOutput:
        self.started.set()
        if not self.gate.wait(60):
            raise TimeoutError("test gate never opened")
        output: RefocusOutput = self._refocuser(frame, pixel_size_um=pixel_size_um)
        return output


class Recorder:
    """A sink that keeps what it got, from any thread (a real sink: the pipeline cannot tell it from the store)."""

    def __init__(self) -> None:
        self.results: list[FrameResult] = []
        self.closed = False
        self.thread_names: set[str] = set()
        self._lock = threading.Lock()

    def on_frame(self, result: FrameResult) -> None:
        with self._lock:
            self.thread_names.add(threading.current_thread().name)
            self.results.append(result)

    def close(self) -> None:
        self.closed = True

    def by_frame(self) -> dict[int, FrameResult]:
        return {r.frame: r for r in self.results}


class Collector:
    """Subscribes (a real ZeroMQ SUB socket) before the run and keeps every header until `expected` messages came
    (or 60 s of silence); each message's pixels must have the shape its header gives."""

    def __init__(self, address: str, expected: int) -> None:
        from acquire_refocus.client import Subscriber

        self.sub = Subscriber(address, timeout_s=60.0)
        self.expected = expected
        self.headers: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.sub:
            while len(self.headers) < self.expected and (message := self.sub.receive()) is not None:
                header, pixels = message
                if pixels is not None:
                    assert list(pixels.shape) == header["shape"]
                self.headers.append(header)

    def topics(self) -> Counter[str]:
        return Counter(h["topic"] for h in self.headers)
