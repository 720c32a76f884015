"""Errors a user can fix. The CLI prints their message alone, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in input the user controls: a config, a file, a frame, an argument."""


class ConfigError(UserError):
    """A configuration file that cannot be used as written."""


class InputError(UserError):
    """A frame or file that cannot be processed."""


class WeightsError(UserError):
    """A weights file that is not an acquire-refocus model, or is damaged."""


class EngineError(RuntimeError):
    """An inference backend that cannot be built or run here; callers fall back to the next one."""
