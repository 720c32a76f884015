"""Hardware focus locks (Nikon PFS, ASI CRISP, Zeiss Definite Focus, Leica AFC) as the closed loop's actuator.

Why: a lock holds the objective at a set distance from the coverslip, so stand drift never reaches the image, but
the sample can still drift relative to the coverslip. With `focus.actuator: autofocus_offset` the loop corrects
that by changing the lock's offset, the way Micro-Manager's "PFS plus software" autofocus does, and never moves the
Z drive while the lock holds it (that would fight the lock).

Micro-Manager exposes locks in two ways, both supported: the core's autofocus device (`setAutoFocusOffset`,
`isContinuousFocusLocked`; DemoCamera's DAutoFocus, most vendor adapters), or an offset stage device (Nikon's
`PFSOffset`) with the lock state as a property (`focus.lock_offset_device`, `focus.lock_status`).
"""

from __future__ import annotations

from typing import Any, Protocol

from acquire_refocus.config import FocusConfig
from acquire_refocus.errors import UserError


class FocusLock(Protocol):
    """A hardware focus lock whose offset the loop moves."""

    def locked(self) -> bool: ...

    def offset_um(self) -> float: ...

    def set_offset_um(self, offset_um: float) -> None: ...


class CoreAutofocusLock:
    """The core's autofocus device: `setAutoFocusOffset` / `getAutoFocusOffset`, `isContinuousFocusLocked`;
    `um_per_unit` micrometres of focus per unit of its offset."""

    def __init__(self, core: Any, um_per_unit: float = 1.0) -> None:
        self._core = core
        self._um_per_unit = um_per_unit

    def locked(self) -> bool:
        return bool(self._core.isContinuousFocusLocked())

    def offset_um(self) -> float:
        return float(self._core.getAutoFocusOffset()) * self._um_per_unit

    def set_offset_um(self, offset_um: float) -> None:
        self._core.setAutoFocusOffset(offset_um / self._um_per_unit)
        self._core.waitForSystem()


class OffsetDeviceLock:
    """An offset stage device (like PFSOffset), the lock state read from a device property (or, without one, the
    core's `isContinuousFocusLocked`)."""

    def __init__(
        self, core: Any, offset_device: str, status: tuple[str, str, str] | None, um_per_unit: float = 1.0
    ) -> None:
        self._core = core
        self._device = offset_device
        self._status = status
        self._um_per_unit = um_per_unit

    def locked(self) -> bool:
        if self._status is None:
            return bool(self._core.isContinuousFocusLocked())
        device, prop, value = self._status
        return str(self._core.getProperty(device, prop)) == value

    def offset_um(self) -> float:
        return float(self._core.getPosition(self._device)) * self._um_per_unit

    def set_offset_um(self, offset_um: float) -> None:
        self._core.setPosition(self._device, offset_um / self._um_per_unit)
        self._core.waitForDevice(self._device)


def focus_lock_for(core: Any, focus: FocusConfig) -> FocusLock:
    """The lock `focus` names on this core; UserError when the core lacks the devices it names."""
    loaded = set(core.getLoadedDevices())
    if focus.lock_status is not None and focus.lock_status[0] not in loaded:
        raise UserError(
            f"focus.lock_status: device {focus.lock_status[0]!r} is not loaded (devices: {', '.join(sorted(loaded))})"
        )
    if focus.lock_offset_device is not None:
        if focus.lock_offset_device not in loaded:
            raise UserError(
                f"focus.lock_offset_device {focus.lock_offset_device!r} is not loaded "
                f"(devices: {', '.join(sorted(loaded))})"
            )
        return OffsetDeviceLock(core, focus.lock_offset_device, focus.lock_status, focus.lock_um_per_unit)
    if not core.getAutoFocusDevice():
        raise UserError(
            "focus.actuator autofocus_offset: the hardware configuration has no autofocus device "
            "(Core-AutoFocus); set focus.lock_offset_device (e.g. PFSOffset) and focus.lock_status"
        )
    return CoreAutofocusLock(core, focus.lock_um_per_unit)
