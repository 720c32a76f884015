"""acquire-refocus: acquisition-side focus correction for fluorescence microscopes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RefocusResult", "Refocuser", "__version__"]

if TYPE_CHECKING:
    from acquire_refocus.refocuser import Refocuser, RefocusResult


def __getattr__(name: str) -> Any:
    # Lazy, so `import acquire_refocus` (and the CLI's --help) does not pay for importing torch.
    if name in ("Refocuser", "RefocusResult"):
        from acquire_refocus import refocuser

        return getattr(refocuser, name)
    raise AttributeError(f"module 'acquire_refocus' has no attribute {name!r}")
