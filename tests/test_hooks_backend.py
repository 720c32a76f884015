"""The acquisition-backend table and the pymmcore-plus backend on the real simulated Micro-Manager core (UniMMCore)."""

from __future__ import annotations

import threading
import typing

import pytest
import useq

from acquire_refocus.config import AcquisitionConfig, AppConfig, PipelineConfig, parse_config
from acquire_refocus.errors import ConfigError, UserError
from acquire_refocus.hooks.backend import AcquisitionBackend, FrameFormat, RunRequest, create_backend
from acquire_refocus.hooks.pycromanager_backend import PycromanagerBackend
from acquire_refocus.hooks.pymmcore_plus_backend import PymmcorePlusBackend
from acquire_refocus.pipeline import FrameCorrector, FramePipeline, FrameResult

pytestmark = pytest.mark.timeout(120)

SIMULATOR = {
    "camera": {"width_px": 96, "height_px": 64, "exposure_ms": 10},
    "specimen": {"field_size_um": [100, 100]},
    "channels": {"Nuclei": {}, "Cytoplasm": {}},
    "drift": {"model": "none"},
}


def simulator_config(**acquisition: object) -> AppConfig:
    return parse_config({"simulator": SIMULATOR, "acquisition": {"backend": "simulator", **acquisition}})


@pytest.mark.parametrize("name", typing.get_args(AcquisitionConfig.model_fields["backend"].annotation))
def test_every_configurable_backend_has_an_implementation(name: str) -> None:
    backend = create_backend(parse_config({"acquisition": {"backend": name}}))
    expected = PycromanagerBackend if name == "pycromanager" else PymmcorePlusBackend
    assert isinstance(backend, expected)
    for method in ("prepare", "check", "raw_frame_log", "run", "cancel", "close"):
        assert callable(getattr(backend, method))
    backend.close()  # nothing was loaded: nothing to release


def test_the_simulator_backend_checks_a_sequence_against_its_core_and_releases_it_on_close() -> None:
    backend = create_backend(simulator_config())
    assert isinstance(backend, PymmcorePlusBackend)
    frames = backend.check(useq.MDASequence(channels=["Nuclei"]))
    core = backend.core()
    assert frames == FrameFormat(64, 96, core.getBytesPerPixel(), core.getPixelSizeUm() or None)
    assert backend.scope is not None
    with pytest.raises(UserError, match="'DAPI' is not a preset"):
        backend.check(useq.MDASequence(channels=["DAPI"]))
    assert len(core.getLoadedDevices()) > 1
    backend.close()
    assert list(core.getLoadedDevices()) == ["Core"]  # the simulated devices were unloaded
    backend.cancel()  # after close: nothing runs, nothing to cancel
    backend.close()


def test_the_hardware_backend_without_a_config_file_says_which_key_is_missing() -> None:
    backend: AcquisitionBackend = create_backend(parse_config({"acquisition": {"backend": "pymmcore-plus"}}))
    with pytest.raises(ConfigError, match=r"acquisition\.mm_config_file"):
        backend.prepare()


class CancelAfter:
    """A sink that stops the run from the pipeline's dispatch thread once `frames` frames arrived, as the daemon's
    watch or a signal's thread does: the run's stop event, then the backend's cancel."""

    def __init__(self, backend: AcquisitionBackend, stop: threading.Event, frames: int) -> None:
        self._backend, self._stop, self._frames, self.seen = backend, stop, frames, 0

    def on_frame(self, result: FrameResult) -> None:
        self.seen += 1
        if self.seen == self._frames:
            self._stop.set()
            self._backend.cancel()

    def close(self) -> None:
        pass


def test_cancel_stops_a_run_in_progress(tiny_refocuser: FrameCorrector) -> None:
    backend = create_backend(simulator_config())
    backend.prepare()
    stop = threading.Event()
    pipeline = FramePipeline(tiny_refocuser, [CancelAfter(backend, stop, 3)], PipelineConfig())
    sequence = useq.MDASequence(time_plan={"interval": 0.05, "loops": 400})
    pipeline.start()
    try:
        backend.run(RunRequest(sequence, pipeline, None, tiny_refocuser, None, False, stop, None))
    finally:
        stats = pipeline.close(drain=True)
        backend.close()
    assert 3 <= stats.seen < 400
