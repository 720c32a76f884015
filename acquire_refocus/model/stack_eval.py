"""Evaluate a model on the user's own z-stack: does it help at each distance from focus on *their* microscope?

Each field's plane the user calls in focus is the reference. Every other plane, raw and refocused, is scored
against it: PSNR gain = PSNR(refocused) - PSNR(raw), per |defocus| (mean over both signs and all fields), and the
unsigned estimate `defocus_magnitude_um` against the plane's true |defocus|. The reference is itself a noisy frame
(not the noiseless image a simulator gives): its noise adds the same error to both PSNRs, so the gains measured
here are pulled towards 0 dB, positive and negative alike; their sign, and so the verdict's direction, holds. The
in-focus plane gets no gain (it is the reference) but its |d| reading is reported.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acquire_refocus.errors import InputError
from acquire_refocus.logs import kv
from acquire_refocus.model.verdict import RangeVerdict, range_verdicts, verdict, verdict_lines

log = logging.getLogger(__name__)

# frame -> (refocused frame in the frame's units, unsigned defocus estimate in um)
StackModel = Callable[[np.ndarray], tuple[np.ndarray, float]]
_SAME_Z_UM = 1e-6


@dataclass(frozen=True)
class StackRow:
    """One plane of one field, scored against that field's in-focus plane."""

    field: str
    z_um: float  # signed, 0 = the plane called in focus
    psnr_raw_db: float  # NaN for the reference plane itself
    psnr_model_db: float
    magnitude_um: float  # the model's unsigned estimate

    @property
    def gain_db(self) -> float:
        return self.psnr_model_db - self.psnr_raw_db


@dataclass(frozen=True)
class DistanceSummary:
    distance_um: float
    frames: int
    psnr_raw_db: float
    psnr_model_db: float
    gain_db: float
    magnitude_um: float
    magnitude_error_um: float


def _psnr_db(reference: np.ndarray, image: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((reference - image.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def evaluate_stack(fields: Sequence[tuple[str, np.ndarray]], z_um: np.ndarray, model: StackModel) -> list[StackRow]:
    """Run the model on every plane of every field; InputError when no plane lies at z = 0 (the reference)."""
    reference_index = np.flatnonzero(np.abs(z_um) < _SAME_Z_UM)
    if reference_index.size != 1:
        raise InputError("the stack needs exactly one plane at the in-focus position (give --in-focus-index)")
    rows: list[StackRow] = []
    for name, planes in fields:
        started = time.monotonic()
        reference = planes[int(reference_index[0])].astype(np.float64)
        data_range = float(reference.max() - reference.min())
        if data_range <= 0:
            raise InputError(f"{name}: the in-focus plane is constant; nothing to compare the planes with")
        for z, plane in zip(z_um, planes, strict=True):
            image, magnitude_um = model(plane)
            at_focus = abs(z) < _SAME_Z_UM
            rows.append(
                StackRow(
                    name,
                    float(z),
                    math.nan if at_focus else _psnr_db(reference, plane, data_range),
                    math.nan if at_focus else _psnr_db(reference, image, data_range),
                    float(magnitude_um),
                )
            )
        log.info(kv("stack_field_evaluated", field=name, planes=len(planes), seconds=round(time.monotonic() - started)))
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def per_distance(rows: Sequence[StackRow]) -> list[DistanceSummary]:
    """Means per |defocus| (both signs, all fields), nearest first."""
    summaries = []
    for distance_um in sorted({round(abs(r.z_um), 6) for r in rows}):
        mine = [r for r in rows if round(abs(r.z_um), 6) == distance_um]
        scored = [r for r in mine if not math.isnan(r.psnr_raw_db)]
        summaries.append(
            DistanceSummary(
                distance_um,
                len(mine),
                _mean([r.psnr_raw_db for r in scored]),
                _mean([r.psnr_model_db for r in scored]),
                _mean([r.gain_db for r in scored]),
                _mean([r.magnitude_um for r in mine]),
                _mean([abs(r.magnitude_um - distance_um) for r in mine]),
            )
        )
    return summaries


def stack_ranges(summaries: Sequence[DistanceSummary]) -> list[RangeVerdict]:
    return range_verdicts({s.distance_um: s.gain_db for s in summaries})


def table_lines(summaries: Sequence[DistanceSummary]) -> list[str]:
    """The per-distance table, fixed-width for the terminal."""
    lines = [
        f"{'|d| (um)':>9} {'frames':>6} {'PSNR raw':>9} {'PSNR model':>11} {'gain (dB)':>10} "
        f"{'|d| read (um)':>14} {'|d| error (um)':>15}  verdict"
    ]
    for s in summaries:
        scored = not math.isnan(s.gain_db)
        lines.append(
            f"{s.distance_um:>9.2f} {s.frames:>6d} "
            + (
                f"{s.psnr_raw_db:>9.2f} {s.psnr_model_db:>11.2f} {s.gain_db:>+10.2f} "
                if scored
                else f"{'-':>9} {'-':>11} {'(reference)':>10} "
            )
            + f"{s.magnitude_um:>14.2f} {s.magnitude_error_um:>15.2f}  {verdict(s.gain_db) if scored else '-'}"
        )
    return lines


def write_csv(rows: Sequence[tuple[str, StackRow]], path: Path) -> None:
    """One line per (model, plane, field)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "field", "z_um", "psnr_raw_db", "psnr_model_db", "psnr_gain_db", "magnitude_um"])
        for label, r in rows:
            writer.writerow(
                [
                    label,
                    r.field,
                    f"{r.z_um:g}",
                    f"{r.psnr_raw_db:.3f}",
                    f"{r.psnr_model_db:.3f}",
                    f"{r.gain_db:.3f}",
                    f"{r.magnitude_um:.3f}",
                ]
            )


def plot(rows: Sequence[StackRow], title: str, path: Path) -> None:
    """Gain against signed Z (each plane, and the mean over fields) over the verdict bands; |d| read against true."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from acquire_refocus.model.verdict import HARMS_BELOW_GAIN_DB, HELPS_MIN_GAIN_DB

    scored = [r for r in rows if not math.isnan(r.gain_db)]
    fig, (gain_ax, read_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    z = [r.z_um for r in scored]
    low = min([HARMS_BELOW_GAIN_DB - 1.0] + [r.gain_db - 0.5 for r in scored])
    high = max([HELPS_MIN_GAIN_DB + 1.0] + [r.gain_db + 0.5 for r in scored])
    gain_ax.axhspan(low, HARMS_BELOW_GAIN_DB, color="tab:red", alpha=0.12, label="harms")
    gain_ax.axhspan(HARMS_BELOW_GAIN_DB, HELPS_MIN_GAIN_DB, color="0.6", alpha=0.12, label="neutral")
    gain_ax.axhspan(HELPS_MIN_GAIN_DB, high, color="tab:green", alpha=0.12, label="helps")
    gain_ax.scatter(z, [r.gain_db for r in scored], s=12, color="k", alpha=0.6, label="plane")
    planes_z = sorted(set(z))
    gain_ax.plot(
        planes_z,
        [_mean([r.gain_db for r in scored if r.z_um == p]) for p in planes_z],
        "-",
        color="tab:blue",
        label="mean over fields",
    )
    gain_ax.set(
        ylim=(low, high),
        xlabel="plane Z - in-focus plane Z (um)",
        ylabel="PSNR gain over raw (dB)",
        title="gain against the in-focus plane (noisy: compressed towards 0)",
    )
    gain_ax.legend(fontsize=7)
    top = max(abs(r.z_um) for r in rows) + 0.5
    read_ax.plot([0, top], [0, top], "k--", lw=1)
    read_ax.scatter([abs(r.z_um) for r in rows], [r.magnitude_um for r in rows], s=12, alpha=0.6)
    read_ax.set(xlabel="true |d| (um)", ylabel="defocus_magnitude_um", title="unsigned distance estimate")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_header(source: str) -> list[str]:
    return [
        "# Evaluation on your z-stack",
        "",
        source,
        "",
        "Gain: PSNR of the refocused plane minus that of the raw plane, both against the plane called in focus, "
        "mean over both signs of defocus and all fields. The in-focus plane is a noisy frame, not a noiseless "
        "truth: its noise lowers both PSNRs alike, so these gains are pulled towards 0 dB (a model's real gain "
        "is larger, and its real harm too); their sign holds. Verdict per |d|: helps (>= +1 dB), neutral "
        "(-0.3 to +1 dB), harms (< -0.3 dB). `|d| read`: the model's unsigned distance estimate "
        "(defocus_magnitude_um), also for the in-focus plane.",
        "",
    ]


def report_section(label: str, table: Sequence[str], ranges: Sequence[RangeVerdict], plot_name: str) -> list[str]:
    return [
        f"## {label}",
        "",
        "```",
        *table,
        "```",
        "",
        "```",
        *verdict_lines(label, ranges),
        "```",
        "",
        f"![gain and distance]({plot_name})",
        "",
    ]
