"""Load a real Micro-Manager hardware configuration into a pymmcore-plus core (the "pymmcore-plus" backend).

pymmcore-plus does the loading (`CMMCorePlus.loadSystemConfiguration`); this module finds the device adapters,
checks what a user can get wrong (the file, the adapter folder, an adapter the file needs but the folder lacks,
a device-interface version that does not match the installed pymmcore) and turns each into a `UserError` that says
what to fix, instead of MMCore's bare RuntimeError.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from pymmcore_plus import CMMCorePlus, find_micromanager

from acquire_refocus.core_lifetime import release_core, track_core
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)

_ADAPTER_HELP = (
    "set acquisition.mm_app_path to the Micro-Manager folder that holds the device adapters "
    "(mmgr_dal_*.dll on Windows, libmmgr_dal_* on Linux/macOS), or install them with `mmcore install`"
)


def _config_adapters(mm_config_file: Path) -> set[str]:
    """Adapter (library) names the config's `Device,<label>,<adapter>,<device>` lines need."""
    needed: set[str] = set()
    for line in mm_config_file.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0] == "Device":
            needed.add(parts[2])
    return needed


def _device_interface_version(core: CMMCorePlus) -> int | None:
    try:
        return int(core.getAPIVersionInfo().split(",")[0].split()[-1])
    except (ValueError, IndexError):
        return None


def load_hardware_core(
    mm_config_file: str | Path,
    mm_app_path: str | Path | None = None,
    *,
    focus_device: str | None = None,
) -> CMMCorePlus:
    """A CMMCorePlus with `mm_config_file` loaded, device adapters taken from `mm_app_path`.

    `mm_app_path` None uses pymmcore-plus's own search (MICROMANAGER_PATH, `mmcore install`, the default install
    folder). `focus_device`, when given, becomes the core's focus device (the Z stage the daemon drives).
    Call `release_core(core)` when done (or use `hardware_core`); cores still alive when Python exits are
    released at exit (`acquire_refocus.core_lifetime` says why).
    """
    config = Path(mm_config_file).expanduser()
    if not config.is_file():
        raise UserError(
            f"Micro-Manager hardware config not found: {config} (acquisition.mm_config_file: the .cfg file "
            "saved by Micro-Manager's Hardware Configuration Wizard)"
        )
    if mm_app_path is not None:
        app = Path(mm_app_path).expanduser()
        if not app.is_dir():
            raise UserError(f"Micro-Manager folder not found: {app} (acquisition.mm_app_path); {_ADAPTER_HELP}")
        adapter_dir: str | None = str(app.resolve())
    else:
        adapter_dir = find_micromanager()
        if adapter_dir is None:
            raise UserError(f"no Micro-Manager installation found; {_ADAPTER_HELP}")

    core = track_core(CMMCorePlus(mm_path=adapter_dir))
    available = set(core.getDeviceAdapterNames())
    missing = sorted(_config_adapters(config) - available)
    if missing:
        raise UserError(
            f"{config} needs device adapters {', '.join(missing)}, which are not in {adapter_dir} "
            f"(found: {', '.join(sorted(available)) or 'none'}); {_ADAPTER_HELP}"
        )
    try:
        core.loadSystemConfiguration(str(config.resolve()))
    except (RuntimeError, OSError) as exc:
        release_core(core)
        version = _device_interface_version(core)
        hint = (
            f" If an adapter failed to load, check that the adapters were built for device interface version "
            f"{version} (the installed pymmcore's); Micro-Manager nightly builds and pymmcore must match."
            if version is not None
            else ""
        )
        raise UserError(f"{config}: Micro-Manager could not load this hardware configuration: {exc}.{hint}") from None

    if not core.getCameraDevice():
        release_core(core)
        raise UserError(
            f"{config}: this hardware configuration has no camera (Core-Camera is not set); "
            "acquire-refocus needs one to acquire"
        )
    if focus_device is not None:
        stages = list(core.getLoadedDevicesOfType(5))  # 5 = DeviceType.StageDevice (single-axis stages)
        if focus_device not in stages:
            release_core(core)
            raise UserError(
                f"acquisition.focus_device {focus_device!r} is not a Z stage in {config} "
                f"(Z stages: {', '.join(stages) or 'none'})"
            )
        core.setFocusDevice(focus_device)
    log.info(
        kv(
            "mm_hardware_loaded",
            config=config,
            adapters=adapter_dir,
            camera=core.getCameraDevice() or "none",
            focus=core.getFocusDevice() or "none",
            pixel_size_um=core.getPixelSizeUm(),
        )
    )
    return core


@contextlib.contextmanager
def hardware_core(
    mm_config_file: str | Path,
    mm_app_path: str | Path | None = None,
    *,
    focus_device: str | None = None,
) -> Iterator[CMMCorePlus]:
    """`load_hardware_core` for a `with` block: the devices are unloaded (stages, camera released) at its end."""
    core = load_hardware_core(mm_config_file, mm_app_path, focus_device=focus_device)
    try:
        yield core
    finally:
        release_core(core)
