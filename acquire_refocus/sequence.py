"""useq-schema sequences in one place: reading one from a config, a file or a request (checked), its size by
arithmetic, and an event's indices as a plain `{axis: index}` dict.

Kept free of the daemon, the hooks and the stores, so that a client (`acquire-refocus run FILE`) can check a
sequence without importing them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import useq
from pydantic import ValidationError

from acquire_refocus.errors import ConfigError
from acquire_refocus.yaml_safe import load_yaml

# More events than any acquisition of one run (10 million frames of 2048 x 2048 uint16 are 80 TB): a typo in the
# time plan, refused before anything starts.
MAX_SEQUENCE_EVENTS = 10_000_000


def axes_dict(index: Mapping[Any, Any]) -> dict[str, int]:
    """`{"t": 3, "p": 0}` from a useq index, whose keys may be `useq.Axis` members or strings."""
    return {str(getattr(axis, "value", axis)): int(i) for axis, i in index.items()}


def event_axes(event: useq.MDAEvent) -> dict[str, int]:
    """The event's indices as `{axis: index}`."""
    return axes_dict(event.index)


def _plan_size(plan: Any) -> int:
    """Items of one useq plan, by arithmetic: `MDASequence.sizes` lists every item, and a time plan of 1e8 loops
    then takes 35 s and 4 GB. A grid given by edges or area without a field of view counts as useq iterates it
    (a 1 um field)."""
    if plan is None:
        return 0
    if hasattr(plan, "num_timepoints"):
        return int(plan.num_timepoints())
    if hasattr(plan, "num_positions"):
        try:
            return int(plan.num_positions())
        except ValueError:  # GridFromEdges / GridWidthHeight without fov_width / fov_height
            return int(
                plan.model_copy(
                    update={"fov_width": plan.fov_width or 1.0, "fov_height": plan.fov_height or 1.0}
                ).num_positions()
            )
    return len(plan)


def axis_sizes(sequence: useq.MDASequence) -> dict[str, int]:
    """Size of each of the sequence's axes ("t", "p", "g", "c", "z"; 0 when unused) in `axis_order`, computed
    without listing any axis; ValueError, ZeroDivisionError or OverflowError for a plan whose size is undefined."""
    plans = {
        "t": sequence.time_plan,
        "p": sequence.stage_positions,
        "g": sequence.grid_plan,
        "c": sequence.channels,
        "z": sequence.z_plan,
    }
    return {str(axis): _plan_size(plans[str(axis)]) for axis in sequence.axis_order}


def z_planes(sequence: useq.MDASequence) -> int:
    """Planes per time point of the sequence's z-plan (1 without one)."""
    return len(list(sequence.z_plan)) if sequence.z_plan is not None else 1


def nested_event_count(sequence: useq.MDASequence) -> int:
    """Events in the full nest of the sequence's axes (fewer where channels skip time points or stacks), without
    listing them: useq yields one in ~0.1 ms, and a long time-lapse has hundreds of thousands. A position with its
    own sub-sequence counts as that sub-sequence's events (an upper bound where the two share axes)."""
    sizes = axis_sizes(sequence)
    positions = sequence.stage_positions
    if any(p.sequence is not None for p in positions):
        sizes["p"] = sum(max(1, nested_event_count(p.sequence)) if p.sequence is not None else 1 for p in positions)
    return math.prod(n for n in sizes.values() if n)


def parse_sequence(value: Any, source: str = "acquisition.sequence") -> useq.MDASequence:
    """An MDASequence from a mapping, a YAML/JSON text, a file path or an MDASequence; ConfigError otherwise."""
    if isinstance(value, useq.MDASequence):
        return value
    if isinstance(value, Path):
        if not value.is_file():
            raise ConfigError(f"{source}: sequence file not found: {value}")
        source = str(value)
        value = value.read_text(encoding="utf-8")
    if isinstance(value, str):
        value = load_yaml(value, source)  # YAML is a superset of JSON
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: expected a useq-schema MDASequence mapping, got {type(value).__name__}")
    try:
        sequence = useq.MDASequence.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{source}: not a valid useq-schema MDASequence: {problems}") from None
    # useq ignores keys it does not know: a misspelt plan or channel setting would silently acquire otherwise
    unknown = _unknown_keys(value, sequence.model_dump(mode="json", exclude_unset=True))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} (misspelt?); see the useq-schema "
            "MDASequence for the keys of each plan"
        )
    try:
        events = nested_event_count(sequence)
    except (MemoryError, ValueError, ZeroDivisionError, OverflowError) as exc:  # useq lists every z / grid position
        raise ConfigError(
            f"{source}: the sequence's size cannot be worked out ({type(exc).__name__}: {exc}); "
            "check the z_plan range and step, the grid_plan and the time_plan"
        ) from None
    if events > MAX_SEQUENCE_EVENTS:
        sizes = ", ".join(f"{axis}={n}" for axis, n in axis_sizes(sequence).items() if n)
        raise ConfigError(
            f"{source}: {events:,} events ({sizes}) is more than one run takes "
            f"({MAX_SEQUENCE_EVENTS:,}); check the loops, or split the acquisition into runs"
        )
    return sequence


def _unknown_keys(given: Any, parsed: Any, path: str = "") -> list[str]:
    """Keys of the mapping the user wrote that the parsed sequence's dump (its set fields) lacks: what useq
    dropped. Compared where both sides are mappings, and item by item in lists of the same length."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        missing = [f"{path}{key}" for key in given if str(key) not in parsed]
        for key, item in given.items():
            if str(key) in parsed:
                missing += _unknown_keys(item, parsed[str(key)], f"{path}{key}.")
        return missing
    if isinstance(given, list) and isinstance(parsed, list) and len(given) == len(parsed):
        pairs = enumerate(zip(given, parsed, strict=True))
        return [key for i, (a, b) in pairs for key in _unknown_keys(a, b, f"{path}{i}.")]
    return []
