"""Structured logging: one `key=value` line per event, so logs can be grepped and parsed on a scope PC."""

from __future__ import annotations

import logging
import sys
from typing import Any

_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is now, so a redirected or closed stderr (tests, daemons) never breaks it."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """Send our log lines to stderr once; repeated calls only change the level."""
    root = logging.getLogger("acquire_refocus")
    root.setLevel(level.upper())
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.propagate = False


def kv(event: str, **fields: Any) -> str:
    """Format an event and its fields as `event=... key=value ...`, quoting values with spaces."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() for c in text) or '"' in text:
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
