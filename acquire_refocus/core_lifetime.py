"""Releasing Micro-Manager cores (hardware or simulated) so that the process can exit cleanly.

MMCore 12 (pymmcore 12.5) delivers device notifications to pymmcore-plus's Python callback from its own C++
thread. If that thread enters Python while the interpreter is shutting down, the process dies with "FATAL:
exception not rethrown" (SIGABRT or SIGBUS) after a clean run or a clean refusal; unloading the devices alone does
not prevent it (seen in about 1 run in 6 with the DemoCamera adapters and 1 in 10 with the simulator's devices),
detaching the callback does. Every core this package creates is tracked here and released at the latest at exit.
"""

from __future__ import annotations

import atexit
import weakref
from typing import TypeVar

import pymmcore
from pymmcore_plus import CMMCorePlus

# Cores made by this package and not yet released.
_LIVE_CORES: weakref.WeakSet[CMMCorePlus] = weakref.WeakSet()

CoreT = TypeVar("CoreT", bound=CMMCorePlus)


def track_core(core: CoreT) -> CoreT:
    """Register a new core so that it is released at exit if its owner does not release it first."""
    _LIVE_CORES.add(core)
    return core


def release_core(core: CMMCorePlus) -> None:
    """Unload the devices (stages and camera released) and detach the core's Python callback. Idempotent."""
    try:
        core.unloadAllDevices()
    finally:
        pymmcore.CMMCore.registerCallback(core, None)  # pymmcore-plus's override refuses None; the base detaches
        _LIVE_CORES.discard(core)


@atexit.register
def _release_live_cores() -> None:
    for core in list(_LIVE_CORES):
        release_core(core)
